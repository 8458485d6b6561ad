"""Plugin discovery and the plugin manager.

Discovery: every entry point in the ``collab_distill`` group is loaded. An entry point that
names a :class:`Plugin` subclass is a *configurable* plugin: it appears in ``collab-distill
plugins`` and is activated by listing it under ``plugins:`` in the YAML (by ``class_path``).
An entry point that names a module or an object is an *always-on* plugin and is registered
in every run (``--disable_plugins NAME`` blocks one), as pytest does with its plugins.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from collab_distill import hookspecs
from collab_distill.task import ConfigError

__all__ = ["Plugin", "EntryPointInfo", "discover", "make_plugin_manager", "hooks_implemented_by"]

GROUP = "collab_distill"


class Plugin:
    """Base class of configurable plugins (selected in YAML under ``plugins:``).

    Subclass it, implement hooks with :data:`collab_distill.hookimpl`, register the class under
    the ``collab_distill`` entry-point group, and list it in a config::

        plugins:
          - class_path: my_package.MyRule
            init_args: {strength: 0.5}
    """

    @property
    def plugin_name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass
class EntryPointInfo:
    name: str
    value: str
    target: Any
    configurable: bool
    error: str | None = None


def discover() -> list[EntryPointInfo]:
    """Load every entry point of the group; failures are reported, not raised."""
    found: list[EntryPointInfo] = []
    for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
        try:
            target = ep.load()
        except Exception as err:  # a broken third-party plugin must not hide the others
            found.append(EntryPointInfo(ep.name, ep.value, None, False, f"{type(err).__name__}: {err}"))
            continue
        configurable = inspect.isclass(target) and issubclass(target, Plugin)
        found.append(EntryPointInfo(ep.name, ep.value, target, configurable))
    return found


def make_plugin_manager(
    configured: Iterable[Any] = (), disabled: Iterable[str] = (), trace: bool = False
) -> pluggy.PluginManager:
    """Always-on plugins from entry points, then the configured plugin instances.

    Configured plugins are registered last so their hook implementations are called first
    (pluggy calls the most recently registered implementation first).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    disabled = set(disabled)
    known = set()
    for info in discover():
        known.add(info.name)
        if info.error is not None:
            raise ConfigError(f"plugin entry point {info.name!r} ({info.value}) failed to load: {info.error}")
        if info.configurable or info.name in disabled:
            continue
        pm.register(info.target, name=info.name)
    unknown = disabled - known
    if unknown:
        raise ConfigError(
            f"--disable_plugins names {sorted(unknown)}, which are not installed plugins; "
            f"installed: {sorted(known)}"
        )
    for i, plugin in enumerate(configured):
        name = f"{getattr(plugin, 'plugin_name', type(plugin).__name__)}#{i}"
        pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise ConfigError(f"a plugin implements a hook that does not exist: {err}") from None
    if trace:
        pm.trace.root.setwriter(print)
        pm.enable_tracing()
    return pm


def hooks_implemented_by(target: Any) -> list[str]:
    """Names of the hooks a plugin class, instance or module implements."""
    names = []
    for name in dir(target):
        if not name.startswith("collab_distill_"):
            continue
        attr = getattr(target, name, None)
        if attr is not None and getattr(attr, hookspecs.PROJECT + "_impl", None) is not None:
            names.append(name.removeprefix("collab_distill_"))
    return sorted(names)
