"""DKD, decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang, CVPR 2022).

The KL of KD splits into a *target-class* part and a *non-target-class* part (the paper's eq. 3)::

    KD = TCKD + (1 - p_t^T) * NCKD

with ``b = [p_t, 1 - p_t]`` (the binary "target vs. rest" distribution), ``TCKD = KL(b^T || b^S)``
and ``NCKD = KL(p̂^T || p̂^S)``, ``p̂_j = p_j / (1 - p_t)`` the distribution over the non-target
classes. The factor ``1 - p_t^T`` suppresses NCKD exactly where the teacher is confident; DKD
weighs the two parts freely::

    DKD = alpha * TCKD + beta * NCKD        (times T^2; CIFAR-100: alpha 1, beta 8, T 4)

and ramps the term in: ``loss = CE + min(epoch / warmup, 1) * DKD`` (warm-up 20 of 240 epochs).

In collab-distill the term is a :class:`DecoupledTarget` whose ``kl_per_unit`` returns
``alpha * TCKD + beta * NCKD`` per unit; the engine multiplies it by ``tau^2`` and by the
per-image ``beta`` of the loss-weight provider (fixed or meta-learned), so a non-KL term takes
per-image weights like plain KD does. The ramp is the target's ``weight``. The teacher side needs
only the teacher's probabilities at ``tau``, so several teachers are averaged as for KD. Units
without a ground-truth class (label ``-1``, e.g. detection regions) get the plain KL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from collab_distill.engine_view import EngineView
from collab_distill.hookspecs import hookimpl
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, LossWeights, SoftTarget, mean_of_teachers
from collab_distill.task import ConfigError

__all__ = ["DKD", "DecoupledTarget", "dkd_per_unit", "dkd_parts_per_unit"]

#: smallest non-target mass of the teacher we divide by (a one-hot teacher has no NCKD to give)
_EPS = 1e-12


def dkd_per_unit(
    student_logits: Tensor, teacher_probs: Tensor, labels: Tensor, temperature: float, alpha: float, beta: float
) -> Tensor:
    """``alpha * TCKD + beta * NCKD`` for every unit, ``[U]`` (no ``T^2``: the engine applies it).

    ``teacher_probs`` are already at ``temperature``. Units with ``labels < 0`` get the plain
    ``KL(teacher || student)``. Computed in float32 (or float64 if given) and in log space on the
    student side, so a student sure of the target class (``1 - q_t`` underflowing) stays finite.
    """
    tckd, nckd = dkd_parts_per_unit(student_logits, teacher_probs, labels, temperature)
    labelled = labels >= 0
    # unlabelled units: nckd holds their plain KL and tckd is 0 (see dkd_parts_per_unit)
    return torch.where(labelled, alpha * tckd + beta * nckd, nckd)


def dkd_parts_per_unit(student_logits: Tensor, teacher_probs: Tensor, labels: Tensor, temperature: float
                       ) -> tuple[Tensor, Tensor]:
    """``(TCKD, NCKD)`` for every unit, ``[U]`` each (no ``T^2``); a unit with ``labels < 0`` has
    TCKD 0 and its plain ``KL(teacher || student)`` as NCKD."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    p = teacher_probs.to(dtype)
    plain = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)

    labelled = labels >= 0
    target = labels.clamp_min(0).long().unsqueeze(-1)
    gt_mask = torch.zeros_like(log_q, dtype=torch.bool).scatter_(-1, target, True)

    # TCKD: KL between the binary [target, rest] distributions
    log_q_t = log_q.gather(-1, target).squeeze(-1)
    log_q_rest = torch.logsumexp(log_q.masked_fill(gt_mask, -math.inf), dim=-1)  # log(1 - q_t), stably
    p_t = p.gather(-1, target).squeeze(-1)
    p_rest = p.masked_fill(gt_mask, 0.0).sum(dim=-1)  # 1 - p_t without the cancellation
    tckd = torch.xlogy(p_t, p_t) - p_t * log_q_t + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest

    # NCKD: KL between the distributions over the non-target classes
    log_q_hat = (log_q - log_q_rest.unsqueeze(-1)).masked_fill(gt_mask, 0.0)  # 0 * log(0) terms drop out
    p_hat = p.masked_fill(gt_mask, 0.0) / p_rest.clamp_min(_EPS).unsqueeze(-1)
    nckd = (torch.xlogy(p_hat, p_hat) - p_hat * log_q_hat).sum(dim=-1)

    # both branches are finite for every unit, so torch.where leaks no NaN into the gradient
    return torch.where(labelled, tckd, torch.zeros_like(tckd)), torch.where(labelled, nckd, plain)


class DecoupledTarget(SoftTarget):
    """The teacher's distribution plus what DKD needs beyond KD: each unit's class and the
    TCKD/NCKD weights. ``weight`` (a scalar or ``[U]``) scales the term, e.g. DKD's warm-up ramp.
    """

    def __init__(
        self,
        probs: Tensor,
        labels: Tensor,
        alpha: float = 1.0,
        beta: float = 8.0,
        weight: Optional[Union[Tensor, float]] = None,
    ) -> None:
        if weight is not None and not isinstance(weight, Tensor):
            weight = torch.tensor(float(weight), device=probs.device)
        super().__init__(probs=probs, weight=weight)
        self.labels = labels
        self.alpha = float(alpha)
        self.beta = float(beta)

    def kl_per_unit(self, student_logits: Tensor, temperature: float) -> Tensor:
        """Named for the hook the engine calls; returns the DKD term, not the KL."""
        out = dkd_per_unit(student_logits, self.probs, self.labels, temperature, self.alpha, self.beta)
        if self.weight is not None:
            out = out * self.weight.to(out.dtype)
        return out

    def __repr__(self) -> str:
        return f"DecoupledTarget(units={self.probs.shape[0]}, alpha={self.alpha}, beta={self.beta})"


class DKD(Plugin):
    """Every student distils from the teacher (the mean of the teachers' distributions) with DKD
    instead of KL. Combine with a loss-weight plugin whose ``beta`` is > 0 (``FixedLossWeights``
    with ``alpha: 1, beta: 1`` is the paper's ``CE + DKD``).

    The ramp is ``min((epoch + 1) / warmup_epochs, 1)`` with the engine's 0-based ``epoch``: this
    is the official ``min(epoch / warmup, 1)`` with mdistiller's 1-based epochs, so the first
    epoch already distils (at ``1 / warmup_epochs``). It changes once per epoch, so every step of
    an epoch (and a resumed run) sees the same weight. It is independent of
    ``trainer.warmup_epochs`` (supervised-only epochs before any distillation).

    Args:
        alpha: weight of TCKD (target-class knowledge).
        beta: weight of NCKD (non-target-class knowledge); the paper uses 8 on CIFAR-100.
        warmup_epochs: epochs over which the DKD term ramps linearly to full strength (0: none).
        as_terms: give TCKD and NCKD to the engine as two named per-image terms, ``tckd`` (times
            ``alpha``) and ``nckd`` (times ``beta``), each ``T^2``-scaled and ramped, instead of
            one soft target posing as a KL: the loss-weight provider then weighs each per image
            (``FixedLossWeights.terms``, ``CNet.terms``), and ``beta`` of ``LossWeights`` is unused.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, warmup_epochs: float = 0.0, as_terms: bool = False) -> None:
        for key, value in (("alpha", alpha), ("beta", beta), ("warmup_epochs", warmup_epochs)):
            if not (value >= 0 and math.isfinite(value)):  # also refuses NaN
                raise ConfigError(f"DKD.{key}={value} must be a finite number >= 0")
        if alpha == 0 and beta == 0:
            raise ConfigError("DKD.alpha and DKD.beta are both 0: the distillation term would vanish; set one > 0")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.warmup_epochs = float(warmup_epochs)
        self.as_terms = as_terms

    def __repr__(self) -> str:
        terms = ", as_terms=True" if self.as_terms else ""
        return f"DKD(alpha={self.alpha}, beta={self.beta}, warmup_epochs={self.warmup_epochs}{terms})"

    def ramp(self, epoch: int) -> float:
        """The warm-up factor of the DKD term in the (0-based) ``epoch``."""
        if self.warmup_epochs <= 0:
            return 1.0
        return min((epoch + 1) / self.warmup_epochs, 1.0)

    @hookimpl
    def collab_distill_configure(self, engine: EngineView) -> None:
        if not (engine.teachers or engine.cohort.teachers):
            raise ConfigError("DKD needs a teacher to distil from: add cohort.teachers (DKD has no teacher-free variant)")

    @hookimpl
    def collab_distill_soft_targets(
        self, engine: EngineView, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge], temperature: float
    ) -> Optional[dict[str, SoftTarget]]:
        if not teacher_records or self.as_terms:
            return None
        probs = mean_of_teachers(teacher_records, temperature)
        ramp = self.ramp(engine.epoch)
        weight = None if ramp == 1.0 else torch.tensor(ramp, device=probs.device)
        return {
            name: DecoupledTarget(probs, rec.unit_labels, self.alpha, self.beta, weight) for name, rec in records.items()
        }

    @hookimpl
    def collab_distill_declare_loss_terms(self, engine: EngineView) -> Optional[list[str]]:
        return ["tckd", "nckd"] if self.as_terms else None

    @hookimpl
    def collab_distill_loss_terms(
        self, engine: EngineView, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge],
        weights: Mapping[str, LossWeights], temperature: float,
    ) -> Optional[dict[str, dict[str, Tensor]]]:
        if not self.as_terms or not teacher_records:
            return None
        probs = mean_of_teachers(teacher_records, temperature)
        scale = self.ramp(engine.epoch) * temperature * temperature
        out: dict[str, dict[str, Tensor]] = {}
        for name, rec in records.items():
            if not (weights[name].uses("tckd") or weights[name].uses("nckd")):
                continue
            tckd, nckd = dkd_parts_per_unit(rec.logits, probs, rec.unit_labels, temperature)
            out[name] = {"tckd": rec.per_image(self.alpha * scale * tckd).to(rec.logits.dtype),
                         "nckd": rec.per_image(self.beta * scale * nckd).to(rec.logits.dtype)}
        return out
