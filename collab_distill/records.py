"""The data that flows between a task adapter, the engine and the plugins.

A task adapter turns one model and one batch into a :class:`Knowledge` record. Everything a
distillation rule needs (supervised loss, logits to distil, which image each logit row belongs
to) is in the record, so rules never need to know which task produced it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Knowledge", "SoftTarget", "TargetSet", "LossWeights", "mean_of_teachers", "per_image_mean"]


@dataclass
class Knowledge:
    """What one cohort member knows about one batch.

    Attributes:
        supervised_loss: ``[B]`` the member's own supervised loss per image (cross-entropy for
            classification, the sum of a detector's losses for detection).
        logits: ``[U, K]`` class logits over *distillation units*. For classification a unit is
            an image (``U == B``); for detection it is a region shared by every cohort member.
        unit_image: ``[U]`` index of the image each unit belongs to.
        unit_labels: ``[U]`` ground-truth class of each unit (``-1`` where there is none).
        num_images: ``B``; needed because an image may own no unit at all.
        features: optional named tensors (feature maps, box deltas) for feature-level rules.
    """

    supervised_loss: Tensor
    logits: Tensor
    unit_image: Tensor
    unit_labels: Tensor
    num_images: int
    features: dict[str, Tensor] = field(default_factory=dict)
    #: ``unit_image`` is ``arange(num_images)``: per-image averaging of unit terms is the identity
    units_are_images: bool = False

    def __post_init__(self) -> None:
        if self.supervised_loss.dim() != 1 or self.supervised_loss.shape[0] != self.num_images:
            raise ValueError(
                f"Knowledge.supervised_loss must have shape [num_images]={self.num_images}, "
                f"got {tuple(self.supervised_loss.shape)}"
            )
        if self.logits.dim() != 2:
            raise ValueError(f"Knowledge.logits must be [units, classes], got {tuple(self.logits.shape)}")
        units = self.logits.shape[0]
        if self.unit_image.shape != (units,) or self.unit_labels.shape != (units,):
            raise ValueError(
                "Knowledge.unit_image and unit_labels must both have shape [units]="
                f"{units}, got {tuple(self.unit_image.shape)} and {tuple(self.unit_labels.shape)}"
            )

    @classmethod
    def for_images(cls, logits: Tensor, labels: Tensor, **features: Tensor) -> Knowledge:
        """The record of a classifier: one unit per image, cross-entropy as supervised loss."""
        index = torch.arange(logits.shape[0], device=logits.device)
        return cls(
            supervised_loss=F.cross_entropy(logits, labels, reduction="none"),
            logits=logits,
            unit_image=index,
            unit_labels=labels,
            num_images=logits.shape[0],
            features=dict(features),
            units_are_images=True,
        )

    def detach(self) -> Knowledge:
        """A copy whose tensors carry no graph (for targets built from peers)."""
        return Knowledge(
            supervised_loss=self.supervised_loss.detach(),
            logits=self.logits.detach(),
            unit_image=self.unit_image,
            unit_labels=self.unit_labels,
            num_images=self.num_images,
            features={k: v.detach() for k, v in self.features.items()},
            units_are_images=self.units_are_images,
        )

    def per_image(self, values: Tensor) -> Tensor:
        """Average per-unit ``values`` ``[U]`` over the units of each image, ``[B]``."""
        if self.units_are_images:
            return values
        return per_image_mean(values, self.unit_image, self.num_images)


@dataclass
class SoftTarget:
    """A distribution over classes for every distillation unit, already at temperature ``tau``.

    Targets are stored as probabilities rather than logits so that rules that average
    distributions (DML, multi-teacher) and rules that combine logits (MinLogit, PooledStudent)
    fit the same hook. ``weight`` optionally scales each unit (e.g. to drop units without a
    trustworthy target); ``None`` means every unit counts fully.
    """

    probs: Tensor
    weight: Tensor | None = None

    @classmethod
    def from_logits(cls, logits: Tensor, temperature: float, weight: Tensor | None = None) -> SoftTarget:
        return cls(probs=F.softmax(logits.detach().float() / temperature, dim=-1), weight=weight)

    def kl_per_unit(self, student_logits: Tensor, temperature: float) -> Tensor:
        """``KL(target || softmax(student / tau))`` for every unit, ``[U]``."""
        log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
        p = self.probs.to(log_q.dtype)
        kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)
        if self.weight is not None:
            kl = kl * self.weight
        return kl


class TargetSet(SoftTarget):
    """Several distributions a student learns from at once (DML's peers, DGKD's guides): its KL
    term is the mean (or sum) of one KL per distribution, not the KL to their mean.

    ``probs`` holds the distributions' mean, for logging and for rules that read it.
    """

    def __init__(self, members: list[Tensor], reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"TargetSet.reduction={reduction!r}: choose mean or sum")
        super().__init__(probs=torch.stack(members).mean(dim=0))
        self.members = members
        self.reduction = reduction

    def kl_per_unit(self, student_logits: Tensor, temperature: float) -> Tensor:
        kls = torch.stack([SoftTarget(probs=p).kl_per_unit(student_logits, temperature) for p in self.members])
        return kls.sum(dim=0) if self.reduction == "sum" else kls.mean(dim=0)


def mean_of_teachers(teacher_records: Mapping[str, Knowledge], temperature: float) -> Tensor:
    """The mean over teachers of ``softmax(logits / tau)`` (the default distillation target)."""
    return torch.stack([SoftTarget.from_logits(t.logits, temperature).probs for t in teacher_records.values()]).mean(dim=0)


@dataclass
class LossWeights:
    """Per-image loss mixing for one student: ``[B]`` tensors for each term.

    ``alpha`` weighs the supervised loss, ``beta`` the distillation from the soft target
    (teacher), ``gamma`` the distillation from the consensus target. Weights produced by a
    meta-learned module keep their graph so that the bilevel step can differentiate them.
    """

    alpha: Tensor
    beta: Tensor
    gamma: Tensor
    #: ``(alpha, beta, gamma)``, each the number that weight is for every image, or ``None`` where
    #: it is per image (the tensor counts); lets the engine skip a term (and the teacher's forward
    #: pass, or the consensus hook) whose weight is exactly zero: a per-image alpha and beta with no
    #: consensus is ``LossWeights(alpha, beta, gamma, constant=(None, None, 0.0))``. ``None``: all
    #: three are per image. Where a number is given the engine uses it, not the tensor
    constant: tuple[float | None, float | None, float | None] | None = None
    #: optional per-unit factors ``[U]`` (detection: one per shared region) on the distillation and
    #: consensus terms: image ``i``'s term is ``beta_i * mean_{u in i} unit_beta_u * D_u`` (so factors
    #: with mean 1 over an image's units spread its weight over them without changing its total)
    unit_beta: Tensor | None = None
    unit_gamma: Tensor | None = None
    #: weights of the named per-image terms plugins declare (``collab_distill_loss_terms``):
    #: ``{name: [B] tensor or number}``; a declared term missing here weighs 1 (as its plugin
    #: scaled it), a term weighing the number 0 is not computed
    terms: dict[str, Tensor | float] = field(default_factory=dict)

    @classmethod
    def constant_weights(cls, num_images: int, alpha: float, beta: float, gamma: float, device: Any = None) -> LossWeights:
        """The same ``alpha, beta, gamma`` for every image."""
        full = lambda v: torch.full((num_images,), float(v), device=device)  # noqa: E731
        return cls(full(alpha), full(beta), full(gamma), constant=(float(alpha), float(beta), float(gamma)))

    #: the terms, in the order of ``alpha, beta, gamma``
    TERMS = ("supervised", "distill", "consensus")

    def uses(self, term: str) -> bool:
        """Whether ``term`` (``supervised``, ``distill``, ``consensus`` or a named term) can be non-zero."""
        if term not in self.TERMS:
            weight = self.terms.get(term, 1.0)
            return not (isinstance(weight, (int, float)) and weight == 0.0)
        if self.constant is None:
            return True
        known = self.constant[self.TERMS.index(term)]
        return known is None or known != 0.0

    def factors(self) -> tuple[Tensor | float, Tensor | float, Tensor | float]:
        """``(alpha, beta, gamma)`` as the loss uses them: the number ``constant`` gives, else the ``[B]`` tensor."""
        known = self.constant or (None, None, None)
        tensors = (self.alpha, self.beta, self.gamma)
        return tuple(t if k is None else float(k) for k, t in zip(known, tensors))  # type: ignore[return-value]

    def term_weight(self, name: str) -> Tensor | float:
        """The weight of the named term ``name``: ``[B]`` or a number (1 when not given)."""
        return self.terms.get(name, 1.0)

    def values(self) -> list[tuple[str, Tensor | float]]:
        """Every weight as the loss uses it, named: ``alpha``, ``beta``, ``gamma`` (the number
        ``constant`` gives, else the tensor), ``unit_beta``/``unit_gamma`` when given, ``terms[...]``."""
        named: list[tuple[str, Tensor | float]] = list(zip(("alpha", "beta", "gamma"), self.factors()))
        named += [(which, value) for which in ("unit_beta", "unit_gamma") if (value := getattr(self, which)) is not None]
        return named + [(f"terms[{name!r}]", value) for name, value in self.terms.items()]

    def problem(self, record: Knowledge) -> tuple[str, Any, str] | None:
        """``(which, its value, what was expected)`` of the first field that does not fit the
        student's ``record`` (type, shape, dtype: nothing that reads a value), or ``None``."""
        if not isinstance(self.terms, Mapping):
            return "terms", self.terms, "terms as {name: [num_images] tensor or number}"
        images, units = record.num_images, record.logits.shape[0]
        fields = [("alpha", self.alpha, images), ("beta", self.beta, images), ("gamma", self.gamma, images),
                  ("unit_beta", self.unit_beta, units), ("unit_gamma", self.unit_gamma, units),
                  *((f"terms[{name!r}]", value, images) for name, value in self.terms.items())]
        for which, value, size in fields:
            if (value is None and which.startswith("unit_")) or (_is_number(value) and which.startswith("terms")):
                continue
            if not isinstance(value, Tensor) or value.shape != (size,) or not value.is_floating_point():
                per = "[units] (one per unit of the student's record)" if which.startswith("unit_") else "[num_images]"
                return which, value, f"a floating-point tensor of shape {per} = ({size},)"
        known = self.constant
        if known is not None and not (isinstance(known, (tuple, list)) and len(known) == 3
                                      and all(k is None or _is_number(k) for k in known)):
            return "constant", known, "constant as (alpha, beta, gamma), each a number or None (per image), or None"
        return None

    @classmethod
    def from_tensor(cls, weights: Tensor) -> LossWeights:
        """From a ``[B, 3]`` tensor whose columns are alpha, beta, gamma."""
        return cls(weights[:, 0], weights[:, 1], weights[:, 2])

    def as_tensor(self) -> Tensor:
        return torch.stack([self.alpha, self.beta, self.gamma], dim=1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def per_image_mean(values: Tensor, unit_image: Tensor, num_images: int, counted: Tensor | None = None) -> Tensor:
    """Average per-unit values over the units of each image; images without units get 0.
    ``counted`` (``[U]``, 0 or 1) counts only some units (their values should be 0 elsewhere)."""
    total = values.new_zeros(num_images).index_add(0, unit_image, values)
    count = values.new_zeros(num_images).index_add(0, unit_image, torch.ones_like(values) if counted is None else counted)
    return total / count.clamp_min(1.0)
