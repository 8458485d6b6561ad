"""RMC, robust model compression (Du et al., EACL 2023), as MC-Distil's paper uses it (Section 4.2):
the disagreement of several compressed models on an image measures how hard it is, and the
teacher's target is softened where they disagree.

The exact rule implemented here (the papers describe it in words only):

1. ``f_s(x)``: student ``s``'s probability of the true class at temperature 1, detached. The
   students of the cohort play the compressed models (MC-Distil's paper uses students of
   different capacities in place of models of different sparsity); they are measured online, on
   the current batch.
2. ``u(x) = clamp(strength * 4 * Var_s f_s(x), 0, 1)``: the variance over students, scaled by 4
   because a variance of numbers in [0, 1] is at most 1/4, so ``u`` spans [0, 1].
3. The teacher's distribution ``p = softmax(z_T / tau)`` (the mean of the teachers' when there
   are several) is tempered per image: ``p~_k proportional to p_k ** (1 - u(x))``. Images the
   students agree on keep the teacher's target; where they disagree most it becomes uniform.
   (This is the confidence-scaling form of Utama et al. 2020, with the students' variance as the
   per-image scale.)

It answers the soft-target (beta) hook; use it with KD's weights (``examples/methods/rmc.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from collab_distill.engine_view import EngineView
from collab_distill.hookspecs import hookimpl
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, SoftTarget, mean_of_teachers
from collab_distill.task import ConfigError

__all__ = ["RMC", "disagreement", "temper"]


def disagreement(student_logits: Tensor, labels: Tensor, strength: float = 1.0) -> Tensor:
    """``u = clamp(strength * 4 * Var_s p_s(y), 0, 1)`` per unit from ``[S, U, K]`` logits; 0 where
    a unit has no label."""
    idx = labels.clamp_min(0)[None, :, None].expand(student_logits.shape[0], -1, 1)
    true_probs = F.softmax(student_logits.detach().float(), dim=-1).gather(2, idx).squeeze(2)  # [S, U]
    u = (strength * 4.0 * true_probs.var(dim=0, unbiased=False)).clamp(0.0, 1.0)
    return torch.where(labels >= 0, u, torch.zeros_like(u))


def temper(probs: Tensor, u: Tensor) -> Tensor:
    """``p ** (1 - u)`` renormalised per row: ``u = 0`` keeps ``p``, ``u = 1`` gives uniform."""
    log_p = torch.log(probs.clamp_min(1e-12))
    return F.softmax(log_p * (1.0 - u)[:, None], dim=-1)


class RMC(Plugin):
    """The teacher's target, softened per image by the students' disagreement on the true class.

    Args:
        strength: scales the disagreement before clamping to [0, 1] (1: the rule above).
    """

    def __init__(self, strength: float = 1.0) -> None:
        if not strength >= 0:
            raise ConfigError(f"RMC.strength={strength} must be >= 0")
        self.strength = strength

    def __repr__(self) -> str:
        return f"RMC(strength={self.strength})"

    @hookimpl
    def collab_distill_configure(self, engine: EngineView) -> None:
        if not engine.cohort.teachers:
            raise ConfigError("RMC softens a teacher's target: add cohort.teachers")
        if len(engine.cohort.students) < 2:
            raise ConfigError("RMC measures the disagreement of several students: name at least two")

    @hookimpl
    def collab_distill_soft_targets(
        self, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge], temperature: float
    ) -> dict[str, SoftTarget]:
        first = next(iter(records.values()))
        teacher = mean_of_teachers(teacher_records, temperature)
        u = disagreement(torch.stack([r.logits for r in records.values()]), first.unit_labels, self.strength)
        self.last_disagreement = u
        target = SoftTarget(probs=temper(teacher, u))
        return {name: target for name in records}
