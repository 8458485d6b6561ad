"""Naming the plugin behind an answer the engine cannot use (issue 22).

A hook's answers arrive merged (pluggy's list, or its first result), without the plugin that
gave each. When one is wrong, each implementation is asked again alone (pluggy's
``subset_hook_caller``, so wrappers, tracing and call monitoring still see the call): on the
error path only, so a sound run pays nothing. The error is a :class:`PluginAnswerError`, a
:class:`~collab_distill.task.ConfigError` (one CLI error line) naming the plugin, the hook and
what was expected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional, Protocol

import torch
from torch import Tensor

from collab_distill.plugin_manager import named_caller
from collab_distill.task import ConfigError

if TYPE_CHECKING:
    from pluggy import HookImpl

__all__ = ["PluginAnswerError", "AnswerSource", "in_call_order", "ask_alone", "answering_plugin", "wrong_answer",
           "described", "plugin_state"]

SAVE_STATE = "collab_distill_save_state"


class PluginAnswerError(ConfigError):
    """A plugin answered a hook with something the engine cannot use (a wrong type, shape or
    dtype, a student that does not exist, a negative weight): the message names the plugin
    (``plugin``, ``None`` when it could not be found), the hook (``hook``) and what was expected."""

    def __init__(self, message: str, plugin: Optional[str] = None, hook: str = "") -> None:
        super().__init__(message)
        self.plugin, self.hook = plugin, hook

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.plugin, self.hook))


class AnswerSource(Protocol):
    """What asking the plugins one by one needs of the engine: its plugin manager."""

    pm: Any


def in_call_order(engine: AnswerSource, hook: str) -> list[HookImpl]:
    """The implementations of ``hook`` in the order pluggy calls them, wrappers left out."""
    return [i for i in reversed(getattr(engine.pm.hook, hook).get_hookimpls()) if not (i.hookwrapper or i.wrapper)]


def ask_alone(engine: AnswerSource, hook: str, impls: list[HookImpl], impl: HookImpl, kwargs: Mapping[str, Any]) -> Any:
    """``impl``'s answer to ``hook``, through a hook caller without the other ``impls``; an
    exception inside it is a :class:`~collab_distill.plugin_manager.PluginError` naming the
    plugin, as through ``engine.hook``."""
    others = [i.plugin for i in impls if i.plugin is not impl.plugin]
    answer = named_caller(engine.pm.subset_hook_caller(hook, remove_plugins=others))(**kwargs)
    firstresult = getattr(engine.pm.hook, hook).spec.opts.get("firstresult")
    return answer if firstresult else (answer[0] if answer else None)


def answering_plugin(engine: AnswerSource, hook: str, kwargs: Mapping[str, Any],
                     wrong: Callable[[Any], bool] = lambda answer: True) -> Optional[str]:
    """The plugin whose answer to ``hook`` is ``wrong`` (by default: the first that answers, the
    one a provider hook uses), each implementation asked again alone (no grad, the CPU RNG
    untouched); ``None`` when none is found."""
    impls = in_call_order(engine, hook)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for impl in impls:
            try:
                answer = ask_alone(engine, hook, impls, impl, kwargs)
                if answer is not None and wrong(answer):
                    return impl.plugin_name
            except Exception:  # noqa: BLE001 - the answer that is wrong is the error to report
                continue
    return None


def wrong_answer(engine: AnswerSource, hook: str, kwargs: Mapping[str, Any], what: str, expected: str,
                 plugin: Optional[str] = None, wrong: Callable[[Any], bool] = lambda answer: True) -> PluginAnswerError:
    """The error for an answer the engine cannot use, naming the plugin (asked for if not known)."""
    plugin = plugin or answering_plugin(engine, hook, kwargs, wrong)
    who = f"plugin {plugin!r}" if plugin is not None else "a plugin"
    return PluginAnswerError(f"{who} answered {hook} with {what}; expected {expected}", plugin, hook)


def described(value: Any) -> str:
    """A value as an error message names it: a tensor by shape and dtype, anything else by type."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {str(value.dtype).removeprefix('torch.')}"
    return f"a {type(value).__name__}"


def plugin_state(engine: AnswerSource) -> dict[str, Any]:
    """What the plugins put into a checkpoint (``collab_distill_save_state``), each asked alone in
    pluggy's order (once per checkpoint, not per step): a plugin that replaces or removes a key an
    earlier plugin put there is a :class:`PluginAnswerError` naming both, since that plugin's state
    would otherwise be lost from the checkpoint without a word."""
    state: dict[str, Any] = {}
    owners: dict[str, str] = {}
    impls = in_call_order(engine, SAVE_STATE)
    for impl in impls:
        before = dict(state)
        ask_alone(engine, SAVE_STATE, impls, impl, {"engine": engine, "state": state})
        lost = sorted(key for key, value in before.items() if key not in state or state[key] is not value)
        if lost:
            raise PluginAnswerError(
                f"plugin {impl.plugin_name!r} replaced or removed the state {lost} that plugin(s) "
                f"{sorted({owners[key] for key in lost})} put there in {SAVE_STATE}; a plugin must only add a key of "
                "its own (e.g. state['my_plugin'] = {...}). The previous checkpoint was kept.", impl.plugin_name, SAVE_STATE)
        owners.update({key: impl.plugin_name for key in state if key not in owners})
    return state
