"""A run's state, kept apart from the code that changes it.

Two small objects hold everything a checkpoint must restore: :class:`CohortState` (what is
trained: students, teachers, optimizers, schedulers, plugin and meta modules) and
:class:`LoopState` (where the loop is: epoch, position, step, history, best-on-val weights).
Both have ``state_dict``/``load_state_dict``; :func:`save_run_state` and :func:`load_run_state`
pass them to ``fabric.save``/``fabric.load``, so the strategy decides which process writes.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from collab_distill.checkpoint import CHECKPOINT_FORMAT, rng_state, set_rng_state, versions
from collab_distill.task import ConfigError, TaskInfo
from collab_distill.wrapping import unwrap

__all__ = ["CohortState", "LoopState", "SetupResults", "StepFlags", "save_run_state", "load_run_state",
           "check_plugin_state", "task_info"]


class _Group:
    """``{name: state_dict}`` of a group of modules, optimizers or schedulers (one checkpoint entry).

    A plain class with ``state_dict``/``load_state_dict``: Fabric converts it like any stateful object."""

    def __init__(self, objects: Mapping[str, Any], what: str, required: bool = True) -> None:
        self.objects, self.what, self.required = objects, what, required

    def state_dict(self) -> dict[str, Any]:
        return {n: (unwrap(o) if isinstance(o, nn.Module) else o).state_dict() for n, o in self.objects.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, obj in self.objects.items():
            if name not in state:
                if not self.required:
                    continue
                raise ConfigError(
                    f"--resume: the checkpoint has no {self.what} {name!r} (it has {sorted(state)}); "
                    "was it written with the same cohort and plugins?"
                )
            (unwrap(obj) if isinstance(obj, nn.Module) else obj).load_state_dict(state[name])


class _NestedGroup:
    """``{student: {name: state_dict}}`` of the modules plugins attached to students."""

    def __init__(self, objects: Mapping[str, Mapping[str, nn.Module]]) -> None:
        self.objects = objects

    def state_dict(self) -> dict[str, Any]:
        return {s: _Group(mods, "").state_dict() for s, mods in self.objects.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for student, modules in self.objects.items():
            _Group(modules, f"plugin module of student {student!r}").load_state_dict(state.get(student, {}))


@dataclass
class CohortState:
    """What a run trains and learns from. Students (and trainable plugin modules) are wrapped by
    Fabric once training is prepared; teachers are frozen; meta modules belong to plugins."""

    students: dict[str, nn.Module] = field(default_factory=dict)
    teachers: dict[str, nn.Module] = field(default_factory=dict)
    optimizers: dict[str, Any] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    #: ``{student: {name: module}}`` attached by plugins (``collab_distill_student_modules``)
    plugin_modules: dict[str, dict[str, nn.Module]] = field(default_factory=dict)
    meta_modules: dict[str, nn.Module] = field(default_factory=dict)
    meta_optimizers: dict[str, Any] = field(default_factory=dict)

    def groups(self) -> dict[str, Any]:
        """The checkpoint entries, one stateful object each."""
        return {
            "students": _Group(self.students, "student"),
            "teachers": _Group(self.teachers, "teacher", required=False),
            "optimizers": _Group(self.optimizers, "optimizer"),
            "schedulers": _Group(self.schedulers, "scheduler"),
            "meta_modules": _Group(self.meta_modules, "meta module"),
            "plugin_modules": _NestedGroup(self.plugin_modules),
            "meta_optimizers": _Group(self.meta_optimizers, "meta optimizer"),
        }

    def state_dict(self) -> dict[str, Any]:
        return {key: group.state_dict() for key, group in self.groups().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, group in self.groups().items():
            group.load_state_dict(state.get(key, {}))

    def synced_modules(self) -> list[nn.Module]:
        """Meta and plugin modules: their floating buffers are averaged across ranks."""
        return [*self.meta_modules.values(), *(m for mods in self.plugin_modules.values() for m in mods.values())]


@dataclass
class LoopState:
    """Where the loop is. ``epoch`` is 0-based (the epoch being trained); ``best`` holds each
    student's best-on-val ``{"value", "epoch", "state"}``; ``meta_history`` one
    ``{"step", "loss", "grad_norm"}`` per meta step."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    meta_history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, dict[str, Any]] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
                "history": self.history, "meta_history": self.meta_history, "best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.batch_in_epoch, self.global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        self.history = list(state.get("history", []))
        self.meta_history = list(state.get("meta_history", []))
        self.best = dict(state.get("best", {}))


@dataclass
class SetupResults:
    """What set-up found: the data's shape, the members' summaries, the features' shapes and the
    plugins' meta-module specifications (``MetaModule`` by name)."""

    info: Optional[TaskInfo] = None
    model_summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    feature_shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    meta_specs: dict[str, Any] = field(default_factory=dict)
    loss_terms: list[str] = field(default_factory=list)
    done: bool = False


@dataclass
class StepFlags:
    """What the step remembers between steps (not checkpointed: each is re-derived on resume)."""

    teachers_used: bool = False  # did the last step need the teachers' records?
    leaves_checked: bool = False  # trainable tensors outside every optimizer are looked for once
    meta_trainable: bool = False
    providers_checked: bool = False  # loss-weight providers asked one by one on a real step (conflicts)
    pending_meta: list[tuple[int, Tensor]] = field(default_factory=list)  # (step, [loss, grad norm]) on the device


def task_info(info: Optional[TaskInfo]) -> Optional[dict[str, Any]]:
    """The data's shape as a checkpoint records it (checked by ``validate``/``test``)."""
    if info is None:
        return None
    return {"num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": list(info.image_size)}


class _Rng:
    """The global random generators (Python, NumPy, torch, CUDA), restored last."""

    def state_dict(self) -> dict[str, Any]:
        state = rng_state()
        kind, keys, pos, has_gauss, cached = state["numpy"]
        # a tensor, not a NumPy array: the checkpoint loads with torch.load(weights_only=True)
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        keys = keys.numpy().astype("uint32") if isinstance(keys, Tensor) else keys
        set_rng_state({**state, "numpy": (kind, keys, pos, has_gauss, cached)})


class _Proxy:
    """Hands an object's ``state_dict``/``load_state_dict`` to Fabric, which copies dataclasses it
    is given (``apply_to_collection``) and would restore the copy."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def state_dict(self) -> Any:
        return self.target.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.target.load_state_dict(state)


def _proxied(entries: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _Proxy(v) if hasattr(v, "load_state_dict") else v for k, v in entries.items()}


_PLAIN = (Tensor, int, float, bool, str, bytes, type(None))


def check_plugin_state(state: Mapping[str, Any], outcome: str = "The previous checkpoint was kept.") -> None:
    """Plugin state must be tensors, numbers, strings, lists, tuples and dicts (what
    ``torch.load(weights_only=True)`` reads back): anything else is one error naming the entry,
    before the checkpoint is written (the previous one stays)."""

    def walk(value: Any, where: str) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{where}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
        elif not isinstance(value, _PLAIN):
            raise ConfigError(
                f"plugin state {where} is a {type(value).__module__}.{type(value).__name__}; collab_distill_save_state "
                "may store tensors, numbers, strings, lists, tuples and dicts only (convert it, e.g. a NumPy array "
                f"with torch.as_tensor). {outcome}"
            )

    for key, value in state.items():
        walk(value, f"state[{key!r}]")


def save_run_state(
    fabric: Any, path: Path, cohort: CohortState, loop: LoopState, extra: Mapping[str, Any], plugins: Mapping[str, Any]
) -> None:
    """Write the checkpoint through ``fabric.save`` to a temporary file renamed into place (a kill
    mid-write leaves the previous checkpoint intact). ``extra``: stateful or plain entries
    (meta batches, model summary, config, ...)."""
    check_plugin_state(plugins)
    state = {"format": CHECKPOINT_FORMAT, **cohort.groups(), "loop": _Proxy(loop), **_proxied(extra), "rng": _Rng(),
             "versions": versions(), "plugins": dict(plugins)}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if fabric.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fabric.save(tmp, state)
        if fabric.is_global_zero:
            os.replace(tmp, path)
    except BaseException:
        if fabric.is_global_zero and tmp.exists():
            tmp.unlink()
        raise
    fabric.barrier()


def load_run_state(
    fabric: Any, path: Path, cohort: CohortState, loop: LoopState, stateful: Mapping[str, Any],
    load_plugins: Callable[[Mapping[str, Any]], None],
) -> Optional[dict[str, Any]]:
    """Restore a checkpoint through ``fabric.load`` into the state objects (and ``stateful``
    entries), then the plugins' state, then the random generators. Returns what was left over."""
    state = {**cohort.groups(), "loop": _Proxy(loop), **_proxied(stateful)}
    try:
        rest = fabric.load(path, state, strict=False)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"--resume {path}: the checkpoint holds something other than tensors and plain values "
            f"({str(err).splitlines()[0]}); a plugin stored an object in collab_distill_save_state"
        ) from None
    if "best" in rest and not loop.best:  # a checkpoint of format 1 kept these beside "loop"
        loop.best, loop.history = dict(rest.pop("best")), list(rest.pop("history", []))
        loop.meta_history = list(rest.pop("meta_history", []))
    load_plugins(rest.get("plugins", {}))
    _Rng().load_state_dict(rest["rng"])
    return rest
