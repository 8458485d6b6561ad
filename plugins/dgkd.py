"""DGKD, densely guided knowledge distillation (Son et al., ICCV 2021): a student learns from the
teacher and every trained teacher assistant at once, and each step some guides are dropped at
random so that the student does not lean on any one of them.

The soft target of every student is the set of the step's kept guides; its distillation term is
the mean over kept guides of ``KL(guide || student)`` (``reduction: sum`` gives the paper's sum,
which grows with the number of guides; the mean keeps ``beta`` comparable to KD's). Each guide is
dropped with probability ``drop_rate`` independently, and at least one is always kept. The draw
depends only on the run's seed and the step, so every DDP rank drops the same guides and a
resumed run repeats the draws.

The assistants are frozen teachers. With a staged run (``examples/methods/dgkd.yaml``) the
students of earlier stages become the assistants of later ones: teacher -> s; {teacher, s} -> xs;
{teacher, s, xs} -> xxs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from collab_distill.engine_view import EngineView
from collab_distill.hookspecs import hookimpl
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, SoftTarget, TargetSet
from collab_distill.task import ConfigError

__all__ = ["DGKD", "kept_guides"]


def kept_guides(names: list[str], drop_rate: float, seed: int, step: int) -> list[str]:
    """The guides kept at ``step``: each dropped with ``drop_rate``, never all of them."""
    if len(names) <= 1 or drop_rate == 0:
        return list(names)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    keep = torch.rand(len(names), generator=generator) >= drop_rate
    if not keep.any():
        keep[int(torch.randint(len(names), (1,), generator=generator))] = True
    return [n for n, k in zip(names, keep.tolist()) if k]


class DGKD(Plugin):
    """Every student distils from all the cohort's teachers (teacher + assistants), dropping
    some at random each step.

    Args:
        drop_rate: probability of dropping each guide at a step (at least one is kept).
        reduction: ``mean`` (default) or ``sum`` of the kept guides' KL terms.
    """

    def __init__(self, drop_rate: float = 0.5, reduction: Literal["mean", "sum"] = "mean") -> None:
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"DGKD.drop_rate={drop_rate} must be in [0, 1)")
        if reduction not in ("mean", "sum"):
            raise ConfigError(f"DGKD.reduction={reduction!r}: choose mean or sum")
        self.drop_rate = drop_rate
        self.reduction = reduction
        self.last_kept: list[str] = []

    def __repr__(self) -> str:
        return f"DGKD(drop_rate={self.drop_rate}, reduction={self.reduction!r})"

    @hookimpl
    def collab_distill_configure(self, engine: EngineView) -> None:
        if not engine.cohort.teachers:
            raise ConfigError("DGKD distils from teachers and assistants: add cohort.teachers "
                              "(or stages whose teachers are earlier students)")

    @hookimpl
    def collab_distill_soft_targets(
        self, engine: EngineView, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge], temperature: float
    ) -> dict[str, SoftTarget]:
        names = list(teacher_records)
        self.last_kept = kept_guides(names, self.drop_rate, engine.seed, engine.global_step)
        guides = [SoftTarget.from_logits(teacher_records[n].logits, temperature).probs for n in self.last_kept]
        target = TargetSet(guides, self.reduction)
        return {name: target for name in records}
