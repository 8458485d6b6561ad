"""Runs inside a run: a teacher's own cross-entropy training and the stages of a staged fit.

Both build an ordinary :class:`~collab_distill.engine.Engine` that shares the parent's Fabric
(and so its processes and devices), writes into a sub-folder of the parent's run and keeps
loggers of its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

import yaml
from torch import nn

from collab_distill import console
from collab_distill.checkpoint import atomic_save, load_weights, versions, write_json
from collab_distill.config import Cohort
from collab_distill.wrapping import unwrap

if TYPE_CHECKING:
    from collab_distill.training.spec import RunSpec
    from collab_distill.training.state import LoopState

__all__ = ["nested_fit", "train_teachers", "teacher_cache_path", "NestedRun"]


class NestedRun(Protocol):
    """What a nested run's engine offers its parent: set-up, fit, its students and loop state."""

    @property
    def students(self) -> Mapping[str, nn.Module]: ...

    @property
    def loop(self) -> LoopState: ...

    def build(self) -> None: ...

    def fit(self, resume: Optional[str] = None, allow_changes: bool = False) -> dict[str, Any]: ...


#: builds an engine from a spec's arguments and a ``fabric`` (the engine class itself)
MakeEngine = Callable[..., NestedRun]


def nested_fit(
    spec: RunSpec,
    fabric: Any,
    make_engine: MakeEngine,
    cohort: Cohort,
    folder: Path,
    *,
    role: str,
    plugins: Optional[list[Any]] = None,
    disable_plugins: Optional[list[str]] = None,
    resume: Optional[str] = None,
    config_text: Optional[str] = None,
    before_fit: Optional[Callable[[NestedRun], None]] = None,
    **trainer_changes: Any,
) -> tuple[NestedRun, dict[str, Any]]:
    """Fit ``cohort`` as a run of its own in ``folder`` with the parent ``spec``'s task, optimizer,
    schedule, meta settings and seed, on the parent's ``fabric``; ``trainer_changes`` override the
    parent's trainer fields. ``before_fit(engine)`` runs after set-up (e.g. to load initial
    weights). ``role`` is the nested engine's ``engine.role`` (``"teacher_training"``, ``"stage"``)."""
    trainer = replace(spec.trainer, root_dir=str(folder.parent), name=folder.name, **trainer_changes)
    sub_spec = spec.derive(cohort=cohort, trainer=trainer, plugins=list(plugins or []),
                           disable_plugins=list(disable_plugins or []), config_text=config_text, run_dir=str(folder),
                           stages=None, role=role)
    sub = make_engine(**sub_spec.arguments(), fabric=fabric)
    if before_fit is not None:
        sub.build()
        before_fit(sub)
    # the parent run checked (or was allowed) any config change when it resumed
    return sub, sub.fit(resume=resume, allow_changes=True)


#: trainer settings that change how a teacher trains (the rest only say where and how it logs)
_TEACHER_TRAINING_FIELDS = (
    "accelerator", "devices", "num_nodes", "precision", "gradient_clip", "limit_train_batches",
    "limit_eval_batches", "val_every_n_epochs", "detect_nonfinite", "compile", "channels_last",
)


def _teacher_training_inputs(config_text: Optional[str], name: str) -> dict[str, Any]:
    """Everything a teacher's in-run training depends on, from the run's config."""
    config = yaml.safe_load(config_text or "") or {}
    teacher = dict((config.get("cohort") or {}).get("teachers", {}).get(name) or {})
    for key in ("cache_dir", "checkpoint"):
        teacher.pop(key, None)
    trainer = config.get("trainer") or {}
    return {
        "teacher": teacher,
        "task": config.get("task"),
        "optimizer": config.get("optimizer"),
        "schedule": config.get("schedule"),
        "seed": config.get("seed"),
        "disable_plugins": config.get("disable_plugins"),
        "trainer": {k: trainer.get(k) for k in _TEACHER_TRAINING_FIELDS},
        "versions": {k: v for k, v in versions().items() if k in ("collab-distill", "torch", "torchvision")},
    }


def teacher_cache_path(spec: RunSpec, fabric: Any, name: str) -> Optional[Path]:
    """Where teacher ``name``'s in-run training is cached (``cohort.teachers.NAME.cache_dir``):
    ``<cache_dir>/<name>-<hash of its training inputs>.pt``; ``None`` without a cache or a config."""
    folder = spec.cohort.teachers[name].cache_dir
    if folder is None:
        return None
    if spec.config_text is None:
        console.plain(fabric, f"[warning] cohort.teachers.{name}.cache_dir needs the run's config (a CLI run); not cached")
        return None
    inputs = json.dumps(_teacher_training_inputs(spec.config_text, name), sort_keys=True, default=str)
    return Path(folder) / f"{name}-{hashlib.sha256(inputs.encode()).hexdigest()[:16]}.pt"


def train_teachers(spec: RunSpec, fabric: Any, run_dir: Path, teachers: Mapping[str, nn.Module], make_engine: MakeEngine) -> None:
    """Teachers with ``train_epochs`` and no checkpoint are first trained with their task's own
    loss, as their own run inside ``run_dir``; the result is loaded into ``teachers`` and stored as
    their checkpoint. (A teacher whose factory loads trained weights and has no ``train_epochs``
    is used as built.)"""
    trained_here = [n for n, t in spec.cohort.teachers.items() if t.checkpoint is None and t.train_epochs > 0]
    for name, teacher in spec.cohort.teachers.items():
        if name not in trained_here:
            continue
        target = run_dir / "teachers" / name / "teacher.pt"
        if target.is_file():  # already trained by the run we resume
            load_weights(teachers[name], target, member=name, field=f"cohort.teachers.{name}")
            continue
        cached = teacher_cache_path(spec, fabric, name)
        if cached is not None and cached.is_file():
            console.info(fabric, f"teacher {name!r}: trained weights from the cache, {cached}")
            load_weights(teachers[name], cached, member=name, field=f"cohort.teachers.{name}.cache_dir")
            if fabric.is_global_zero:  # the run folder stays complete on its own
                atomic_save(teachers[name].state_dict(), target)
            fabric.barrier()
            continue
        console.info(fabric, f"training teacher {name!r} on its task's loss for {teacher.train_epochs} epochs")
        initial = teachers[name].state_dict()

        def load_initial(sub: NestedRun, name: str = name, initial: dict[str, Any] = initial) -> None:
            sub.students[name].load_state_dict(initial)

        sub, _ = nested_fit(
            spec, fabric, make_engine, Cohort(students={name: teacher.model}), run_dir / "teachers" / name,
            role="teacher_training",
            plugins=[], disable_plugins=spec.disable_plugins,  # the run's always-on plugins, less those it disabled
            before_fit=load_initial,
            # a run killed while training this teacher continues its teacher run from its checkpoint
            resume=str(last) if (last := run_dir / "teachers" / name / "checkpoints" / "last.ckpt").is_file() else None,
            max_epochs=teacher.train_epochs, warmup_epochs=0, max_steps=None, loggers=["csv"],
        )
        weights = sub.loop.best.get(name, {}).get("state") or unwrap(sub.students[name]).state_dict()
        if fabric.is_global_zero:
            atomic_save(weights, target)
            if cached is not None:
                atomic_save(weights, cached)
                write_json({"run": str(run_dir), "trained_with": _teacher_training_inputs(spec.config_text, name)},
                           cached.with_suffix(".json"))
        fabric.barrier()
        teachers[name].load_state_dict(weights)
    if trained_here:
        # the cohort's training starts from the same random state whether its teachers were just
        # trained or loaded from an interrupted run's teacher.pt (a resume is then bit-identical)
        fabric.seed_everything(spec.seed, verbose=False)
