"""The engine's state as plugins read it: read-only properties over the objects that hold it
(:class:`RunSpec`, :class:`SetupResults`, :class:`CohortState`, :class:`LoopState`, the open
run folder), kept apart from the loop and the step that change them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, cast

from collab_distill.training.build import warmup_until
from collab_distill.training.spec import RunSpec, read_only
from collab_distill.training.state import CohortState, LoopState, SetupResults

__all__ = ["StateView"]


class StateView:
    """What :class:`~collab_distill.engine_view.EngineView` reads, as properties; a subclass sets
    ``spec``, ``built``, ``state``, ``loop`` and ``run``."""

    spec: RunSpec
    built: SetupResults
    state: CohortState
    loop: LoopState
    run: Any

    task = read_only("spec", "task")
    cohort = read_only("spec", "cohort")
    trainer = read_only("spec", "trainer")
    meta_config = read_only("spec", "meta")
    seed = read_only("spec", "seed")
    role = read_only("spec", "role", "which run this is: ``fit``, ``teacher_training`` or ``stage``")
    info = read_only("built", "info")
    model_summary = read_only("built", "model_summary")
    feature_shapes = read_only("built", "feature_shapes")
    loss_terms = read_only("built", "loss_terms")
    students = read_only("state", "students")
    teachers = read_only("state", "teachers")
    optimizers = read_only("state", "optimizers")
    meta_modules = read_only("state", "meta_modules")
    meta_optimizers = read_only("state", "meta_optimizers")
    plugin_modules = read_only("state", "plugin_modules")
    epoch = read_only("loop", "epoch")
    global_step = read_only("loop", "global_step")
    batch_in_epoch = read_only("loop", "batch_in_epoch")
    meta_history = read_only("loop", "meta_history")

    @property
    def run_dir(self) -> Optional[Path]:
        return cast(Path, self.run.path) if self.run is not None else None

    @property
    def task_selection_metric(self) -> str:
        return cast(str, getattr(self.task, "selection_metric", "top1"))

    def warming_up(self, student: str) -> bool:
        """Whether ``student`` is still in its supervised-only warm-up."""
        return self.loop.epoch < warmup_until(self.trainer, student)

    @property
    def in_warmup(self) -> bool:
        """Some student is still warming up (meta steps wait for all of them)."""
        return any(self.warming_up(s) for s in self.cohort.students)

    @property
    def has_meta(self) -> bool:
        return bool(self.state.meta_modules)
