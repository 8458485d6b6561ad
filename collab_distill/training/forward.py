"""Forward passes of cohort members: a member's records with the features requested in this
phase, run normally or at given (looked-ahead) parameters, and teachers' records computed lazily."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from collab_distill.records import Knowledge
from collab_distill.task import Task

if TYPE_CHECKING:
    from collab_distill.engine_view import EngineView
    from collab_distill.features import FeatureCapture

__all__ = ["MemberForward", "LazyRecords"]


class _TaskCall(nn.Module):
    """Lets ``functional_call`` swap a model's parameters while the task runs it.

    The task may call submodules of the model directly (detectors do), so parameters are
    replaced on the whole model for the duration of :meth:`Task.knowledge`.
    """

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, batch: Any, view: int, context: Any) -> Knowledge:
        return self.task.knowledge(self.model, batch, view=view, context=context)


class MemberForward:
    """``task.knowledge`` of a member plus the features some request wants in ``phase`` (the
    caller sets grad mode and autocast). ``view``: the engine as feature requests see it."""

    def __init__(self, task: Task, features: Optional[FeatureCapture], view: EngineView) -> None:
        self.task, self.features, self.view = task, features, view

    def __call__(self, name: str, model: Any, batch: Any, *, view: int, context: Any, phase: str,
                 state: Optional[Mapping[str, Tensor]] = None) -> Knowledge:
        """With ``state``, the model runs at those parameters and buffers (``functional_call``)."""

        def run() -> Knowledge:
            if state is None:
                return self.task.knowledge(model, batch, view=view, context=context)
            call = _TaskCall(self.task, model)
            return functional_call(call, {f"model.{k}": v for k, v in state.items()}, (batch, view, context), strict=False)

        wanted = self.features.active(name, self.view, phase) if self.features is not None else []
        if not wanted:
            return run()
        assert self.features is not None
        with self.features.recording(name, wanted) as captured:
            record = run()
        record.features.update(captured)
        return record


    def lazy_teachers(self, fabric: Any, teachers: Mapping[str, nn.Module], batch: Any, context: Any) -> LazyRecords:
        """The frozen teachers' records of ``batch``, computed (no grad, under the run's autocast,
        with requested features) when first read."""

        def compute(name: str, model: nn.Module) -> Knowledge:
            with torch.no_grad(), fabric.autocast():  # teachers are not wrapped by Fabric
                return self(name, model, batch, view=0, context=context, phase="train")

        return LazyRecords(teachers, compute)


class LazyRecords(Mapping[str, Knowledge]):
    """The frozen teachers' records, computed (without grad) on first access only.

    A step whose rule never looks at a teacher (CE, a warm-up epoch) skips its forward pass.
    """

    def __init__(self, teachers: Mapping[str, nn.Module], compute: Callable[[str, nn.Module], Knowledge]) -> None:
        self._teachers, self._compute = teachers, compute
        self._records: Optional[dict[str, Knowledge]] = None

    def _computed(self) -> dict[str, Knowledge]:
        if self._records is None:
            self._records = {name: self._compute(name, model) for name, model in self._teachers.items()}
        return self._records

    @property
    def resolved(self) -> bool:
        return self._records is not None

    def resolve(self) -> None:
        self._computed()

    def __getitem__(self, name: str) -> Knowledge:
        return self._computed()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._teachers)

    def __len__(self) -> int:
        return len(self._teachers)

    def __bool__(self) -> bool:
        return bool(self._teachers)
