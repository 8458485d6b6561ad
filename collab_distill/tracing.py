"""``--trace_plugins``: every hook call printed with its arguments and each plugin's answer,
described without reading values (a traced run does what an untraced one does)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath
from typing import Any

import pluggy

from collab_distill import console

__all__ = ["summarise", "trace_hook_calls"]


def summarise(value: Any, width: int = 6, depth: int = 3) -> str:
    """A one-line description of a hook argument or answer: a tensor by its shape, dtype and
    device (never its values), containers and dataclasses recursively (at most ``width`` items,
    ``depth`` levels), a mapping that is no dict by its keys only (reading the teachers' records
    would compute them), any other object by its type's name (the engine: ``Engine``). Reading
    nothing else keeps a traced run doing what an untraced one does."""
    import torch

    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, PurePath):
        return repr(str(value))
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={list(value.shape)}, dtype={str(value.dtype).removeprefix('torch.')}, device={value.device})"
    if isinstance(value, Mapping) and not isinstance(value, dict):
        # e.g. the teachers' records, computed on first access: reading the values would compute them
        keys = [repr(k) for k in list(value)[:width]] + ([f"... +{len(value) - width} more"] if len(value) > width else [])
        return f"{type(value).__name__}(keys=[{', '.join(keys)}])"
    if isinstance(value, (dict, list, tuple)) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        if depth <= 0:
            return f"{type(value).__name__}(...)"
        if isinstance(value, dict):
            items: Sequence[tuple[str, Any]] = [(repr(k), v) for k, v in value.items()]
            opening, closing, separator = "{", "}", ": "
        elif isinstance(value, (list, tuple)):
            items = [("", v) for v in value]
            opening, closing, separator = ("[", "]", "") if isinstance(value, list) else ("(", ")", "")
        else:
            items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
            opening, closing, separator = f"{type(value).__name__}(", ")", "="
        parts = [f"{key}{separator}{summarise(v, width, depth - 1)}" for key, v in items[:width]]
        if len(items) > width:
            parts.append(f"... +{len(items) - width} more")
        return opening + ", ".join(parts) + closing
    return type(value).__name__


class _HookTracer:
    """Prints each hook call with its arguments summarised, then every implementation that was
    called with its answer summarised (``None``: it did not answer), on rank 0."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, Any]]] = []  # answers of the hook calls in progress (hooks nest)

    def record(self, function: Callable[..., Any], plugin: str) -> Callable[..., Any]:
        """``function`` (a hook implementation), keeping its answer for the trace."""

        @functools.wraps(function)
        def recorded(*args: Any) -> Any:
            value = function(*args)
            if self.calls:
                self.calls[-1].append((plugin, value))
            return value

        recorded.collab_distill_traced = True  # type: ignore[attr-defined]
        return recorded

    def before(self, hook: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        for impl in impls:  # wrapped on first call, so plugins registered later are traced too
            if not (impl.hookwrapper or impl.wrapper or getattr(impl.function, "collab_distill_traced", False)):
                # pluggy reports only the hook's overall result; which plugin answered what is seen
                # by wrapping each implementation (typed Final by pluggy, hence setattr)
                setattr(impl, "function", self.record(impl.function, impl.plugin_name))  # noqa: B010
        self.calls.append([])
        engine = kwargs.get("engine")
        role = getattr(engine, "role", None)
        arguments = ", ".join(f"{k}={summarise(v)}" for k, v in kwargs.items())
        console.plain(getattr(engine, "fabric", None), f"[trace{':' + role if role else ''}] {hook}({arguments})")

    def after(self, outcome: pluggy.Result[Any], hook: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        fabric = getattr(kwargs.get("engine"), "fabric", None)
        for plugin, value in self.calls.pop():
            console.plain(fabric, f"  {plugin} -> {summarise(value)}")
        if outcome.exception is not None:
            console.plain(fabric, f"  raised {type(outcome.exception).__name__}: {outcome.exception}")


def trace_hook_calls(pm: pluggy.PluginManager) -> Callable[[], None]:
    """Print every hook call of ``pm`` (``--trace_plugins``): the hook, its arguments summarised
    (:func:`summarise`), and which plugins answered what. Returns the function that stops it."""
    tracer = _HookTracer()
    return pm.add_hookcall_monitoring(tracer.before, tracer.after)
