"""What a plugin may read from (and call on) the engine it receives in every hook.

:class:`~collab_distill.engine.Engine` satisfies this protocol; hook specifications are typed
with it, so a type checker flags a plugin that reaches for anything else. Everything not
listed here is the engine's own business and may change between releases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

from torch import nn

if TYPE_CHECKING:
    from lightning_fabric import Fabric

    from collab_distill.config import Cohort, TrainerConfig
    from collab_distill.meta import BilevelConfig
    from collab_distill.records import Knowledge
    from collab_distill.task import Task, TaskInfo

__all__ = ["EngineView"]


@runtime_checkable
class EngineView(Protocol):
    """The engine as plugins see it.

    Read-only properties (plugins cannot reassign them) and methods:

    * ``task`` (:class:`~collab_distill.task.Task`), ``info`` (its :class:`~collab_distill.task.TaskInfo`),
      ``cohort`` (the configured students and teachers), ``trainer`` (loop settings: ``temperature``,
      ``max_epochs``, ``warmup_epochs``, ...), ``meta_config``, ``seed``;
    * ``fabric``: the Lightning ``Fabric`` (device, ``world_size``, ``is_global_zero``, ``all_reduce``,
      ``autocast``); log through ``engine.log_dict``, which writes to the run's own loggers;
    * ``students`` / ``teachers``: ``{name: module}`` (students wrapped by Fabric once training is
      set up; :func:`collab_distill.unwrap` gives the user's module); ``meta_modules`` and their
      ``meta_optimizers``; ``meta_history`` (one ``{"step", "loss", "grad_norm"}`` per meta step,
      complete at logging steps, epoch ends and checkpoints);
    * ``epoch`` (0-based, the epoch being trained), ``global_step``, ``batch_in_epoch``;
    * ``run_dir``: the run folder (``None`` before the fit opens it); write plugin files under
      ``run_dir / "plugins" / <your name>`` on rank 0 only;
    * ``fitting``: True inside ``fit``; False when a checkpoint is only validated or tested;
    * ``role``: which run of a ``fit`` this engine is: ``"fit"`` (the user's run),
      ``"teacher_training"`` (a teacher's own cross-entropy run inside it; always-on plugins only)
      or ``"stage"`` (a stage of a staged fit). Every hook runs on every DDP rank: read
      ``fabric.global_rank`` / ``fabric.is_global_zero`` (see docs/plugins.md);
    * ``loss_terms``: the names of the per-image terms plugins declared
      (``collab_distill_declare_loss_terms``), which ``LossWeights.terms`` may weigh;
    * ``feature_shapes``: ``{member: {feature: shape without the batch dimension}}`` of every
      requested feature, measured on two real images at setup (see
      ``collab_distill_feature_requests``); available from ``collab_distill_student_modules`` on.
    """

    @property
    def task(self) -> Task: ...
    @property
    def info(self) -> Optional[TaskInfo]: ...
    @property
    def cohort(self) -> Cohort: ...
    @property
    def trainer(self) -> TrainerConfig: ...
    @property
    def meta_config(self) -> BilevelConfig: ...
    @property
    def seed(self) -> int: ...
    @property
    def role(self) -> str: ...
    @property
    def students(self) -> dict[str, nn.Module]: ...
    @property
    def teachers(self) -> dict[str, nn.Module]: ...
    @property
    def meta_modules(self) -> dict[str, nn.Module]: ...
    @property
    def meta_optimizers(self) -> dict[str, Any]: ...
    @property
    def epoch(self) -> int: ...
    @property
    def global_step(self) -> int: ...
    @property
    def batch_in_epoch(self) -> int: ...
    @property
    def meta_history(self) -> list[dict[str, float]]: ...
    @property
    def run_dir(self) -> Optional[Path]: ...
    @property
    def feature_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]: ...
    @property
    def loss_terms(self) -> list[str]: ...

    fabric: Optional[Fabric]
    fitting: bool

    def warming_up(self, student: str) -> bool:
        """Whether ``student`` is still in its supervised-only warm-up."""
        ...

    @property
    def in_warmup(self) -> bool:
        """Some student is still warming up."""
        ...

    @property
    def has_meta(self) -> bool:
        """Some plugin declared meta-learned modules."""
        ...

    def student_module(self, student: str, name: str) -> Callable[..., Any]:
        """The trainable module ``name`` a plugin attached to ``student`` (through
        ``collab_distill_student_modules``), ready to call in the current phase: Fabric/DDP-wrapped
        in the real step, evaluated at the looked-ahead parameters inside the bilevel step."""
        ...

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        """Log numbers to the run's loggers (CSV, TensorBoard, any configured Logger); rank 0 writes."""
        ...

    def evaluate(self, split: str, members: Optional[Mapping[str, nn.Module]] = None) -> dict[str, dict[str, float]]:
        """Metrics of every student (or of ``members``) on ``split`` (``val`` or ``test``; also
        ``train`` and ``meta`` once training is prepared), gathered over ranks; calls every
        plugin's ``evaluation_end``."""
        ...

    def batches(self, split: str) -> Any:
        """The data loader of ``split`` (each rank's share, in eval order), for plugins that
        measure something of their own on a split."""
        ...

    def splits(self) -> list[str]:
        """The splits :meth:`batches` serves now: ``train``, ``meta``, ``val``, ``test`` once
        training is prepared; only the evaluated one in ``collab-distill validate|test``."""
        ...

    def hook_implementers(self, hook: str) -> list[Any]:
        """The plugin objects that implement ``hook`` (e.g. ``"collab_distill_soft_targets"``):
        to check at ``configure`` that something provides what this plugin relies on."""
        ...

    def teacher_records(self, batch: Any, context: Any = None) -> Mapping[str, Knowledge]:
        """The frozen teachers' records of ``batch`` (no grad, under the run's autocast),
        computed on first access."""
        ...
