"""Plugin discovery and the plugin manager.

Discovery: every entry point in the ``collab_distill`` group is loaded. An entry point that
names a :class:`Plugin` subclass is a *configurable* plugin: it appears in ``collab-distill
plugins`` and is activated by listing it under ``plugins:`` in the YAML (by ``class_path``).
An entry point that names a module or an object is an *always-on* plugin and is registered
in every run (``--disable_plugins NAME`` blocks one; the manager does not even import it),
as pytest does with its plugins.

A faulty plugin is named, never a bare traceback: an entry point that fails to import stops the
run with its name, its import error and the ``--disable_plugins`` fix; a hook implementation
whose name or arguments match no hook is a :class:`~collab_distill.task.ConfigError`; a
``collab_distill_*`` method the engine would never call is a :class:`PluginWarning`; an
exception raised inside a hook (``sys.exit`` and any BaseException too, but not Ctrl-C's
KeyboardInterrupt) becomes a :class:`PluginError` naming the plugin and the hook (through
:class:`NamedHookRelay`, the engine's ``engine.hook``).
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Optional, Protocol, cast

import pluggy

from collab_distill import hookspecs
from collab_distill.task import ConfigError

__all__ = [
    "ROLES",
    "Plugin",
    "EntryPointInfo",
    "PluginError",
    "PluginWarning",
    "NamedHookRelay",
    "NamedHookCaller",
    "named_caller",
    "discover",
    "make_plugin_manager",
    "hooks_implemented_by",
    "hook_arguments",
    "hook_problems",
]

GROUP = "collab_distill"
PREFIX = "collab_distill_"
#: the runs an engine (``engine.role``) can be: the user's run, a teacher's in-run training, a
#: stage of a staged fit (see the module docstring of :mod:`collab_distill.hookspecs`)
ROLES = ("fit", "teacher_training", "stage")


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


class PluginError(RuntimeError):
    """A plugin's hook implementation raised: the message names the plugin (as registered, e.g.
    ``MyRule#0``) and the hook, and the original exception is the ``__cause__``, so its traceback
    still points at the plugin's line."""

    def __init__(self, message: str, plugin: Optional[str], hook: str) -> None:
        super().__init__(message)
        #: the registered name of the plugin whose implementation raised (``None``: not found)
        self.plugin = plugin
        #: the hook that was being called
        self.hook = hook

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes, as exceptions should be
        return (type(self), (str(self), self.plugin, self.hook))


class PluginWarning(UserWarning):
    """A plugin defines a ``collab_distill_*`` method the engine never calls (no ``@hookimpl``,
    or a name that is no hook)."""


@dataclass
class EntryPointInfo:
    name: str
    value: str
    target: Any
    configurable: bool
    error: str | None = None
    #: the installed distribution that declares the entry point (``name version``), if known
    distribution: str | None = None
    #: named in ``--disable_plugins``: not imported (``target`` is ``None``)
    skipped: bool = False


def _distribution(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    try:
        return f"{dist.metadata['Name']} {dist.version}"
    except Exception:  # noqa: BLE001 - a malformed METADATA must not hide the plugin's own error
        return None


def discover(skip: Collection[str] = ()) -> list[EntryPointInfo]:
    """Load every entry point of the group (except those named in ``skip``, listed unloaded);
    failures are reported, not raised."""
    found: list[EntryPointInfo] = []
    for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
        if ep.name in skip:
            found.append(EntryPointInfo(ep.name, ep.value, None, False, distribution=_distribution(ep), skipped=True))
            continue
        try:
            target = ep.load()
        except Exception as err:  # a broken third-party plugin must not hide the others
            found.append(EntryPointInfo(ep.name, ep.value, None, False, f"{type(err).__name__}: {err}", _distribution(ep)))
            continue
        configurable = inspect.isclass(target) and issubclass(target, Plugin)
        found.append(EntryPointInfo(ep.name, ep.value, target, configurable, distribution=_distribution(ep)))
    return found


# ---------------------------------------------------------------------------- hook names and arguments


@functools.cache
def _spec_manager() -> pluggy.PluginManager:
    """A manager with the hook specifications only: what the hooks are, and how pluggy reads a plugin."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


@functools.cache
def hook_arguments() -> dict[str, tuple[str, ...]]:
    """``{hook name: the arguments it is called with}`` for every hook in :mod:`collab_distill.hookspecs`."""
    pm = _spec_manager()
    return {
        name: tuple(getattr(pm.hook, name).spec.argnames)
        for name in dir(hookspecs)
        if name.startswith(PREFIX) and pm.parse_hookspec_opts(hookspecs, name) is not None
    }


def _required_arguments(function: Callable[..., Any]) -> tuple[str, ...]:
    """The arguments pluggy passes to a hook implementation, by its own rule: the positional
    parameters without a default, less an implicit ``self``."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in signature.parameters.values() if p.kind in kinds and p.default is p.empty]
    if names and names[0] == "self" and not inspect.ismethod(function) and "." in getattr(function, "__qualname__", ""):
        names = names[1:]  # a function looked up on the class (``collab-distill plugins`` lists classes)
    return tuple(names)


def _did_you_mean(word: str, choices: Iterable[str], quote: bool = False) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {close[0]!r}?)" if quote else f" (did you mean {close[0]}?)"


@dataclass(frozen=True)
class _Fault:
    """Something wrong with one ``collab_distill_*`` method (or ``@hookimpl``) of a plugin."""

    method: str
    short: str  # for the ``problems`` column of ``collab-distill plugins``
    detail: str  # for the error or warning, after ``plugin 'X': ``
    fatal: bool  # ConfigError at start-up (else a PluginWarning)
    function: Any = None  # where the warning points to


def _faults(target: Any) -> list[_Fault]:
    """What keeps the engine from calling a plugin's methods as their author meant: a hook
    implementation of a hook that does not exist or with arguments the hook does not offer
    (errors), a ``collab_distill_*`` method without ``@hookimpl`` or whose name is no hook (warnings)."""
    pm, hooks = _spec_manager(), hook_arguments()
    faults: list[_Fault] = []
    for name in sorted(dir(target)):
        try:  # as pluggy registers: every attribute, read with getattr
            opts = pm.parse_hookimpl_opts(target, name)
            function = getattr(target, name, None)
        except Exception:  # noqa: BLE001 - an attribute that cannot be read is not a hook
            continue
        if opts is not None and callable(function):  # pluggy takes routines only
            hook = opts.get("specname") or name
            if hook not in hooks:
                if not opts.get("optionalhook"):
                    hint = _did_you_mean(hook, hooks)
                    faults.append(_Fault(
                        name, f"{name} is no hook{hint}",
                        f"{name} is marked @hookimpl but there is no hook of that name{hint}; "
                        "the hooks are listed in collab_distill.hookspecs", True, function))
                continue
            offered = hooks[hook]
            unknown = [a for a in _required_arguments(function) if a not in offered]
            if unknown:
                names = ", ".join(repr(a) for a in unknown)
                hints = "".join(_did_you_mean(a, offered, quote=True) for a in unknown)
                faults.append(_Fault(
                    name, f"{name} takes {names}, which the hook does not offer{hints}",
                    f"{name} takes argument(s) {names} that {'the hook' if hook == name else 'hook ' + hook} "
                    f"does not offer{hints}; "
                    f"the hook offers: {', '.join(offered)} (take any of them, by these names)", True, function))
        elif name.startswith(PREFIX) and callable(function):
            if name in hooks:
                faults.append(_Fault(
                    name, f"{name} lacks @hookimpl",
                    f"{name} is not decorated with @hookimpl, so the engine never calls it; "
                    "fix: decorate it with @collab_distill.hookimpl", False, function))
            else:
                hint = _did_you_mean(name, hooks)
                faults.append(_Fault(
                    name, f"{name} is no hook{hint}",
                    f"{name} is no hook, so the engine never calls it{hint}; "
                    "the hooks are listed in collab_distill.hookspecs", False, function))
    return faults


def hook_problems(target: Any) -> list[str]:
    """Short descriptions of what is wrong with a plugin's hook methods (``collab-distill
    plugins`` shows them): a hook that does not exist, arguments the hook does not offer, a
    ``collab_distill_*`` method without ``@hookimpl``. Empty for a sound plugin."""
    return [fault.short for fault in _faults(target)]


_warned: dict[Any, Any] = {}  # warnings' registry: a warning shown for the run is not repeated for its nested runs


def _warn(plugin: str, fault: _Fault) -> None:
    """A :class:`PluginWarning` that points at the method's own line (the line to fix)."""
    message = f"plugin {plugin!r}: {fault.detail}"
    function = inspect.unwrap(fault.function) if fault.function is not None else None
    filename, lineno = None, 0
    if function is not None:
        try:
            filename, lineno = inspect.getsourcefile(function), inspect.getsourcelines(function)[1]
        except (OSError, TypeError):  # no source (a builtin, an interactive definition)
            filename = None
    if not filename:
        warnings.warn(message, PluginWarning, stacklevel=4)
        return
    module = getattr(function, "__module__", None) or "collab_distill.plugin_manager"
    warnings.warn_explicit(message, PluginWarning, filename, lineno, module=module, registry=_warned)


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, installed: bool = False) -> None:
    """Register ``plugin`` as ``name`` after checking its hook methods (``installed``: an always-on
    plugin from an entry point, which the user may not be able to edit, only to leave out)."""
    faults = _faults(plugin)
    errors = [f"plugin {name!r}: {fault.detail}" for fault in faults if fault.fatal]
    if errors:
        if installed:
            errors.append(f"(an installed always-on plugin: --disable_plugins {name} leaves it out)")
        raise ConfigError("\n".join(errors))
    for fault in faults:
        _warn(name, fault)
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as err:  # what pluggy checks beyond names and arguments
        raise ConfigError(f"plugin {name!r} cannot be registered: {err}") from None


def _broken(info: EntryPointInfo) -> ConfigError:
    source = f", installed by {info.distribution}" if info.distribution else ""
    remove = f"uninstall {info.distribution.split()[0]}" if info.distribution else "uninstall the package that provides it"
    return ConfigError(
        f"plugin entry point {info.name!r} ({info.value}{source}) failed to import: {info.error}. "
        f"Every run loads the installed plugins, so none can start; fix: leave it out with "
        f"--disable_plugins {info.name} (Engine(disable_plugins=[{info.name!r}]) from Python), "
        f"or {remove}, or install what it imports"
    )


def make_plugin_manager(
    configured: Iterable[Any] = (), disabled: Iterable[str] = (), trace: bool = False
) -> pluggy.PluginManager:
    """Always-on plugins from entry points, then the configured plugin instances.

    Configured plugins are registered last so their hook implementations are called first
    (pluggy calls the most recently registered implementation first). ``trace`` prints every
    hook call (see :func:`trace_hook_calls`).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    disabled = set(disabled)
    found = discover(skip=disabled)
    unknown = disabled - {info.name for info in found}
    if unknown:
        raise ConfigError(
            f"--disable_plugins names {sorted(unknown)}, which are not installed plugins; "
            f"installed: {sorted(info.name for info in found)}"
        )
    for info in found:
        if info.skipped:
            continue
        if info.error is not None:
            raise _broken(info)
        if not info.configurable:
            _register(pm, info.target, info.name, installed=True)
    for i, plugin in enumerate(configured):
        _register(pm, plugin, f"{getattr(plugin, 'plugin_name', type(plugin).__name__)}#{i}")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise ConfigError(f"a plugin implements a hook that does not exist: {err}") from None
    if trace:
        from collab_distill.tracing import trace_hook_calls

        trace_hook_calls(pm)
    return pm


def hooks_implemented_by(target: Any) -> list[str]:
    """Names of the hooks a plugin class, instance or module implements."""
    names = []
    for name in dir(target):
        if not name.startswith(PREFIX):
            continue
        attr = getattr(target, name, None)
        if attr is not None and getattr(attr, hookspecs.PROJECT + "_impl", None) is not None:
            names.append(name.removeprefix(PREFIX))
    return sorted(names)


# ---------------------------------------------------------------------------- exceptions inside hooks


def _culprit(caller: pluggy.HookCaller, err: BaseException) -> Optional[str]:
    """The registered name of the plugin whose implementation raised ``err``: the outermost
    frame of the traceback that runs one of the hook's implementations."""
    impls: dict[Any, list[pluggy.HookImpl]] = {}
    for impl in caller.get_hookimpls():
        code = getattr(inspect.unwrap(impl.function), "__code__", None)
        if code is not None:
            impls.setdefault(code, []).append(impl)
    tb = err.__traceback__
    while tb is not None:
        candidates = impls.get(tb.tb_frame.f_code)
        if candidates:
            if len(candidates) > 1:  # two instances of one class: the frame's ``self`` tells them apart
                this = tb.tb_frame.f_locals.get("self")
                candidates = [i for i in candidates if i.plugin is this] or candidates
            return candidates[0].plugin_name
        tb = tb.tb_next
    return None


class NamedHookCaller(Protocol):
    """One hook of :class:`NamedHookRelay`: call it as pluggy's hook (keyword arguments); it names
    the plugin an exception came from. ``hookcaller`` is pluggy's ``HookCaller`` behind it."""

    name: str
    hookcaller: pluggy.HookCaller

    def __call__(self, **kwargs: Any) -> Any: ...

    def get_hookimpls(self) -> list[pluggy.HookImpl]: ...


def named_caller(caller: pluggy.HookCaller) -> NamedHookCaller:
    """``caller``, naming the plugin an exception inside it came from. A plain function, not an
    object with ``__call__``: calling it costs one frame and a ``try``."""

    def call(**kwargs: Any) -> Any:
        try:
            return caller(**kwargs)
        except (ConfigError, PluginError):  # already says what to fix, or names an inner hook's plugin
            raise
        except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C stops the run as ever
            raise
        except BaseException as err:  # noqa: BLE001 - a plugin's own BaseException subclass too, named like any error
            plugin = _culprit(caller, err)
            who = f"plugin {plugin!r}" if plugin is not None else "a plugin"
            if isinstance(err, SystemExit):  # would end the run with its exit code, no message, no checkpoint
                raise PluginError(
                    f"{who} called sys.exit({err.code!r}) in hook {caller.name}; a plugin must not end the process: "
                    "raise an exception that says what is wrong instead", plugin, caller.name,
                ) from err
            raise PluginError(f"{who} failed in hook {caller.name}: {type(err).__name__}: {err}", plugin, caller.name) from err

    call.__dict__.update(name=caller.name, hookcaller=caller, get_hookimpls=caller.get_hookimpls)
    call.__name__ = call.__qualname__ = caller.name
    return cast(NamedHookCaller, call)


class NamedHookRelay:
    """``engine.hook``: pluggy's hook relay (``pm.hook``), except that an exception raised inside
    a hook implementation becomes a :class:`PluginError` naming the plugin and the hook, with the
    original exception as its cause. A :class:`~collab_distill.task.ConfigError` passes unchanged.

    Hooks run every step, so a call costs one attribute look-up (the wrapper is cached on the
    instance after the first) and one ``try``; the culprit is looked for only after a failure.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._relay = pm.hook

    def __getattr__(self, name: str) -> NamedHookCaller:
        if name.startswith("_"):
            raise AttributeError(name)
        caller = named_caller(getattr(self._relay, name))  # AttributeError for a hook that does not exist
        setattr(self, name, caller)  # from now on a plain instance attribute: no __getattr__
        return caller


# ---------------------------------------------------------------------------- tracing
