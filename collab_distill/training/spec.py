"""What a run is built from, as one value: the engine's constructor arguments. Nested runs (a
teacher's own training, the stages of a staged fit) derive theirs with :meth:`RunSpec.derive`."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from collab_distill.config import Cohort, TrainerConfig
from collab_distill.meta import BilevelConfig
from collab_distill.optim import OptimizerCallable, Schedule
from collab_distill.task import Task

__all__ = ["RunSpec", "read_only"]


@dataclass(frozen=True)
class RunSpec:
    """The arguments of :class:`~collab_distill.engine.Engine` (see there), checked and defaulted."""

    task: Task
    cohort: Cohort
    trainer: TrainerConfig
    optimizer: OptimizerCallable
    schedule: Schedule
    meta: BilevelConfig
    plugins: list[Any]
    disable_plugins: list[str]
    seed: int
    trace_plugins: bool
    config_text: Optional[str]
    run_dir: Optional[str]
    stages: Optional[list[Any]]
    role: str

    def derive(self, **changes: Any) -> RunSpec:
        return replace(self, **changes)

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments that build an engine of this spec."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def read_only(holder: str, name: str, doc: str = "") -> Any:
    """A read-only attribute that reads ``self.<holder>.<name>`` (the engine's view of its state)."""
    return property(lambda self: getattr(getattr(self, holder), name), doc=doc or f"``{holder}.{name}`` (read-only)")
