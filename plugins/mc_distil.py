"""MC-Distil (Section 3 of the paper): a meta-learned coordinator network (C-Net) that mixes each
student's loss per image, and the PooledStudent consensus target (eq. 4).

* :class:`CNet` answers ``loss_weights``: ``g_phi(x)`` gives alpha, beta, gamma for every student
  and every image. It is a meta module: the engine's bilevel step trains it (eq. 8-9) on the
  default meta objective, the sum of the students' cross-entropy on a held-out batch (eq. 6).
  With ``independent: true`` every student gets a C-Net of its own (the Meta-Distil baseline).
* :class:`PooledStudent` answers ``consensus_targets``: the true class takes the largest logit
  over the students, every other class the smallest (detached).

Unlike the authors' release, the C-Net's head is trained, gamma with PooledStudent is
implemented, and by default the weights are *normalised*: relative weights around a starting mix
(KD's) with a fixed batch-mean budget, so the meta step learns which images and terms matter
instead of a larger loss scale, and an untrained C-Net is exactly the fixed-mix baseline.
``normalize: none`` gives the unnormalised ``scale * activation`` form.

At the end of a fit the C-Net is applied to the val split (and to a training split with label
noise): ``plugins/cnet/summary.json`` holds each student's weight spread over the images (std
and quantiles per term) and, with label noise, the AUC of alpha separating clean from flipped
labels; a warning says when the weights stayed inert.

This module holds the two plugins; the network ``g_phi`` is in
:mod:`~collab_distill.plugins.mc_distil_network` and what the trained C-Net writes (weights
tables, statistics, figures, report section) in :mod:`~collab_distill.plugins.mc_distil_report`,
whose names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from collab_distill.engine_view import EngineView
from collab_distill.hookspecs import hookimpl
from collab_distill.meta import MetaModule
from collab_distill.plugin_manager import Plugin
from collab_distill.plugins.mc_distil_network import Activation, CoordinatorNetwork, Normalize
from collab_distill.plugins.mc_distil_report import TERMS as TERMS
from collab_distill.plugins.mc_distil_report import CNetOutputs, largest_spread, noise_separation, weight_statistics
from collab_distill.plugins.mc_distil_report import WeightRows as WeightRows
from collab_distill.records import Knowledge, LossWeights, SoftTarget, per_image_mean
from collab_distill.task import ConfigError, ModelFactory, TaskInfo

__all__ = [
    "CNet", "CoordinatorNetwork", "PooledStudent", "pooled_student_logits", "weight_statistics", "largest_spread",
    "noise_separation",
]


def _kd_mix(gamma: bool) -> tuple[float, float, float]:
    """KD's mix of examples/digits.yaml (lambda = 0.7); with gamma on, 0.2 of beta's share goes
    to the consensus term so that the three terms still sum to 1."""
    return (0.3, 0.5, 0.2) if gamma else (0.3, 0.7, 0.0)


class CNet(CNetOutputs, Plugin):
    """MC-Distil's coordinator network as a loss-weight provider.

    Args:
        backbone: any image classifier factory; it is built with ``embedding_dim`` outputs and
            used as the C-Net's feature extractor (default: ResNet10-s, a small ResNet as in the paper).
        embedding_dim: width of the backbone's output.
        normalize: ``batch`` (default): relative weights around ``mix`` whose batch-mean sum is
            fixed (see :class:`CoordinatorNetwork`); ``term``: each term's batch mean fixed at
            ``mix`` (per-image weighting around a fixed mix); ``none``: ``scale * activation`` as in
            the paper's text, whose scale the meta step learns as a step size.
        mix: the starting ``(alpha, beta, gamma)`` of every image and the per-image budget
            (``normalize: batch``); ``None``: KD's 0.3/0.7 (0.3/0.5/0.2 with gamma on).
        max_factor: how far one term of one image can move from ``mix`` before the batch
            rescaling (a factor in ``(1/max_factor, max_factor)``).
        hidden: width of a hidden layer in the head (0: a linear head, as in the paper).
        activation: with ``normalize: none``: ``sigmoid`` (each weight in (0, scale)),
            ``softplus`` (non-negative, unbounded) or ``softmax`` (alpha + beta + gamma = scale).
        scale: with ``normalize: none``, multiplies the activation's output.
        use_image: feed the image through ``backbone`` (the paper's ``g_phi(x)``).
        use_logits: also feed the detached students' (and teachers') logits to the head.
        use_label: also feed the one-hot label (one class per image tasks only).
        use_losses: also feed every member's per-image supervised loss (``log1p``, detached), as
            Meta-Weight-Net does: an extension beyond the paper, which lets the C-Net tell a
            label the cohort disagrees with from a clean one (the image alone cannot, when
            whether a label is wrong does not depend on the image).
        use_unit_losses: also feed every member's per-image mean cross-entropy of its unit logits
            against the unit labels (``log1p``, detached), over the image's object units and over
            its background units apart. For classification that is the supervised loss again;
            for detection it is each member's disagreement with the annotations over the shared
            regions (a flipped box shows on the object regions, a missing one on the background
            ones), teachers included, whose detection losses are not computed.
        per_region: also give every unit (detection: every shared region) its own factor on beta
            and gamma, from each member's cross-entropy on that region and whether it is
            background; an image's factors have mean 1, so they spread its distillation weight
            over its regions (``LossWeights.unit_beta``) without changing the image's total.
        gamma: learn gamma; ``false`` fixes it at 0 (MC-Distil-NoPS).
        terms: ``{name: share}``: also weigh these per-image terms that other plugins declare
            (``collab_distill_declare_loss_terms``, e.g. ``DKD(as_terms: true)``'s ``tckd`` and
            ``nckd``), starting from ``share`` like ``mix`` does for alpha, beta and gamma.
        independent: one C-Net per student, each seeing only its own student (Meta-Distil).
        lr: Adam learning rate of the C-Net (paper: 1e-3).
        weight_decay: Adam weight decay of the C-Net (paper: 1e-4).
        inert_threshold: at the end of a fit, warn when no student's weight of any term varies
            over the val images by more than this fraction of its mean (std / mean).
    """

    def __init__(
        self,
        backbone: Optional[ModelFactory] = None,
        embedding_dim: int = 64,
        normalize: Normalize = "batch",
        mix: Optional[tuple[float, float, float]] = None,
        max_factor: float = 10.0,
        hidden: int = 0,
        activation: Activation = "sigmoid",
        scale: float = 1.0,
        use_image: bool = True,
        use_logits: bool = False,
        use_label: bool = False,
        use_losses: bool = False,
        use_unit_losses: bool = False,
        per_region: bool = False,
        gamma: bool = True,
        terms: Optional[dict[str, float]] = None,
        independent: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        inert_threshold: float = 0.05,
    ) -> None:
        if embedding_dim < 1 or scale <= 0 or lr <= 0 or weight_decay < 0 or hidden < 0 or inert_threshold < 0:
            raise ConfigError("CNet: embedding_dim >= 1, scale > 0, lr > 0, weight_decay >= 0, hidden >= 0 "
                              "and inert_threshold >= 0 are required")
        if activation not in ("sigmoid", "softplus", "softmax"):
            raise ConfigError(f"CNet.activation={activation!r}: use sigmoid, softplus or softmax")
        if normalize not in ("batch", "term", "none"):
            raise ConfigError(f"CNet.normalize={normalize!r}: use batch (relative weights, fixed budget), term (each "
                              "term's batch mean fixed) or none")
        if not max_factor > 1:
            raise ConfigError(f"CNet.max_factor={max_factor} must be > 1 (1 would freeze every weight at mix)")
        if not (use_image or use_logits or use_label or use_losses or use_unit_losses):
            raise ConfigError("CNet: no input; set use_image (the paper's g_phi(x)) or one of use_logits, use_label, "
                              "use_losses, use_unit_losses")
        if per_region and normalize == "none":
            raise ConfigError("CNet.per_region needs normalize: batch or term (its factors are relative to the image's weight)")
        shares = tuple(float(m) for m in (mix if mix is not None else _kd_mix(gamma)))
        if len(shares) != 3 or not all(m >= 0 for m in shares) or sum(shares) <= 0:
            raise ConfigError(f"CNet.mix={list(shares)} must be [alpha, beta, gamma], each >= 0, not all 0")
        mix = (shares[0], shares[1], shares[2] if gamma else 0.0)
        if gamma and normalize != "none" and mix[2] == 0:
            raise ConfigError(
                "CNet: gamma is on but mix gives it 0, and in the normalised form a term that starts at 0 "
                "stays 0: give gamma a share (e.g. mix: [0.3, 0.5, 0.2]) or set gamma: false")
        if backbone is None and use_image:
            from collab_distill.tasks.classification.models import ResNet

            backbone = ResNet("s")
        self.backbone = backbone if use_image else None
        self.embedding_dim = embedding_dim
        self.normalize = normalize
        self.terms = {k: float(v) for k, v in (terms or {}).items()}
        if not all(v >= 0 for v in self.terms.values()):
            raise ConfigError(f"CNet.terms={self.terms}: every share must be >= 0")
        self.mix = mix
        self.max_factor = max_factor
        self.hidden = hidden
        self.activation = activation
        self.scale = scale
        self.use_image = use_image
        self.use_logits = use_logits
        self.use_label = use_label
        self.use_losses = use_losses
        self.use_unit_losses = use_unit_losses
        self.per_region = per_region
        self.gamma = gamma
        self.independent = independent
        self.lr = lr
        self.weight_decay = weight_decay
        self.inert_threshold = inert_threshold
        self.students: list[str] = []
        self._checked_terms = False
        self.module: Optional[nn.ModuleDict] = None

    # -- construction ---------------------------------------------------------------------

    @property
    def uses_records(self) -> bool:
        """Whether the C-Net reads the cohort's records (not only the image)."""
        return self.use_logits or self.use_label or self.use_losses or self.use_unit_losses or self.per_region

    def _network(self, info: TaskInfo, num_students: int, members: int) -> CoordinatorNetwork:
        extra = (info.num_classes * members if self.use_logits else 0) + (info.num_classes if self.use_label else 0) \
            + (members if self.use_losses else 0) + (2 * members if self.use_unit_losses else 0)
        backbone = None
        if self.backbone is not None:
            backbone_info = TaskInfo(num_classes=self.embedding_dim, in_channels=info.in_channels, image_size=info.image_size)
            backbone = self.backbone.build(backbone_info)
        return CoordinatorNetwork(backbone, self.embedding_dim, extra, num_students, (*self.mix, *self.terms.values()),
                                  self.normalize,
                                  self.max_factor, self.hidden, self.activation, self.scale,
                                  region_inputs=members + 1 if self.per_region else 0)

    @hookimpl
    def collab_distill_configure(self, engine: EngineView) -> None:
        info = engine.info
        assert info is not None  # set before configure
        self.students = list(engine.cohort.students)
        self._checked_terms = False
        self.num_classes = info.num_classes
        torch.manual_seed(engine.seed * 1_000 + 7)  # the C-Net's initialisation depends on the seed only
        teachers = len(engine.cohort.teachers)
        if self.independent:
            nets = {s: self._network(info, 1, 1 + teachers) for s in self.students}
        else:
            nets = {"shared": self._network(info, len(self.students), len(self.students) + teachers)}
        self.module = nn.ModuleDict(nets)

    @hookimpl
    def collab_distill_meta_modules(self, engine: EngineView) -> list[MetaModule]:
        assert self.module is not None
        return [MetaModule("cnet", self.module, lambda p: torch.optim.Adam(p, lr=self.lr, weight_decay=self.weight_decay))]

    # -- the hook -------------------------------------------------------------------------

    def _extras(
        self, students: list[str], records: Mapping[str, Knowledge], teachers: Mapping[str, Knowledge]
    ) -> Optional[Tensor]:
        """The detached per-image signals the C-Net reads besides the image, ``[B, D]``."""
        if not self.uses_records:
            return None
        members = [records[s] for s in students] + list(teachers.values())
        parts: list[Tensor] = []
        if (self.use_logits or self.use_label) and not members[0].units_are_images:
            raise ConfigError("CNet.use_logits / use_label need one class per image (classification); "
                              "for detection use use_image and/or use_losses")
        if self.use_logits:
            parts += [m.logits.detach().float() for m in members]
        if self.use_label:
            parts.append(F.one_hot(members[0].unit_labels.clamp_min(0), self.num_classes).float())
        if self.use_losses:
            parts.append(torch.log1p(torch.stack([m.supervised_loss.detach().float() for m in members], dim=1)))
        if self.use_unit_losses:
            parts += [torch.log1p(_unit_losses_per_image(m)) for m in members]
        if not parts:
            return None
        return torch.cat(parts, dim=1)

    def _unit_inputs(self, students: list[str], records: Mapping[str, Knowledge],
                     teachers: Mapping[str, Knowledge]) -> Tensor:
        """``[U, members + 1]``: every member's cross-entropy on each unit (``log1p``) and whether
        the unit is background (labelled with the last class)."""
        members = [records[s] for s in students] + list(teachers.values())
        losses = torch.log1p(torch.stack([_unit_cross_entropy(m) for m in members], dim=1))
        return torch.cat([losses, _background(members[0]).float()[:, None]], dim=1)

    def weights(
        self, engine: EngineView, batch: Any, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge] = {}
    ) -> dict[str, Tensor]:
        """``{student: [B, 3]}`` (alpha, beta, gamma) from the (possibly looked-ahead) C-Net."""
        return {s: w[:, :3] for s, w in self._weights(engine, batch, records, teacher_records)[0].items()}

    def _weights(
        self, engine: EngineView, batch: Any, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per student the ``[B, 3 + named terms]`` image weights and (``per_region``) the ``[U, 2]``
        region factors."""
        nets = engine.meta_modules["cnet"]
        assert isinstance(nets, nn.ModuleDict)  # self.module, which collab_distill_meta_modules declared
        images = engine.task.images(batch) if self.use_image else None
        teachers = teacher_records if self.uses_records else {}
        factors: dict[str, Tensor] = {}
        if self.independent:
            out = {s: nets[s](images, self._extras([s], records, teachers))[:, 0] for s in self.students}
            if self.per_region:
                first = records[self.students[0]]
                factors = {s: _coordinator(nets, s).region_factors(self._unit_inputs([s], records, teachers), first.unit_image,
                                                                  first.num_images)[:, 0] for s in self.students}
        else:
            w = nets["shared"](images, self._extras(self.students, records, teachers))
            out = {s: w[:, i] for i, s in enumerate(self.students)}
            if self.per_region:
                first = records[self.students[0]]
                f = _coordinator(nets, "shared").region_factors(self._unit_inputs(self.students, records, teachers),
                                                                first.unit_image, first.num_images)
                factors = {s: f[:, i] for i, s in enumerate(self.students)}
        if not self.gamma:
            out = {s: torch.cat([w[:, :2], torch.zeros_like(w[:, 2:3]), w[:, 3:]], dim=1) for s, w in out.items()}
        return out, factors

    @hookimpl
    def collab_distill_loss_weights(
        self, engine: EngineView, batch: Any, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge]
    ) -> dict[str, LossWeights]:
        if self.terms and not self._checked_terms:
            undeclared = sorted(set(self.terms) - set(engine.loss_terms))
            if undeclared:
                raise ConfigError(f"CNet.terms names {undeclared}, which no plugin declares (declared: {engine.loss_terms})")
            self._checked_terms = True
        weights, factors = self._weights(engine, batch, records, teacher_records)
        out = {}
        for s, w in weights.items():
            out[s] = LossWeights.from_tensor(w[:, :3])
            out[s].terms = {name: w[:, 3 + i] for i, name in enumerate(self.terms)}
            if s in factors:
                out[s].unit_beta, out[s].unit_gamma = factors[s][:, 0], factors[s][:, 1]
        return out

    def __repr__(self) -> str:
        inputs = [n for n, on in (("image", self.use_image), ("logits", self.use_logits), ("label", self.use_label),
                                  ("losses", self.use_losses), ("unit_losses", self.use_unit_losses)) if on]
        form = (f"normalize={self.normalize}, mix={list(self.mix)}" if self.normalize != "none"
                else f"activation={self.activation}") + (", per_region" if self.per_region else "")
        backbone = self.backbone.describe() if self.backbone is not None else None
        return (f"CNet(backbone={backbone}, inputs={inputs}, {form}, gamma={self.gamma}, "
                f"independent={self.independent})")


def _coordinator(nets: nn.ModuleDict, key: str) -> CoordinatorNetwork:
    """The C-Net ``key`` (a student's, or ``shared``) of the meta module ``cnet``."""
    net = nets[key]
    assert isinstance(net, CoordinatorNetwork)
    return net


def _background(record: Knowledge) -> Tensor:
    """``[U]`` whether each unit is labelled background (detection's last column); never for
    units that are images (classification has no background class)."""
    if record.units_are_images:
        return torch.zeros_like(record.unit_labels, dtype=torch.bool)
    return record.unit_labels == record.logits.shape[-1] - 1


def _unit_losses_per_image(record: Knowledge) -> Tensor:
    """``[B, 2]``: per image the mean cross-entropy of the member's unit logits over its units
    with an object class and over its background units (0 where it has none). Kept apart
    because a wrong class (a flipped box) shows on the object units and a missing box on the
    background ones, while most of a detection image's units are background."""
    ce = _unit_cross_entropy(record)
    background = _background(record)
    objects = (record.unit_labels >= 0) & ~background
    return torch.stack([per_image_mean(ce * objects, record.unit_image, record.num_images, objects.float()),
                        per_image_mean(ce * background, record.unit_image, record.num_images, background.float())], dim=1)


def _unit_cross_entropy(record: Knowledge) -> Tensor:
    """``[U]`` cross-entropy of a member's unit logits against the unit labels (0 where a unit has
    none), detached."""
    labels = record.unit_labels
    ce = F.cross_entropy(record.logits.detach().float(), labels.clamp_min(0), reduction="none")
    return ce * (labels >= 0)


def pooled_student_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 4: ``[S, U, K]`` student logits -> ``[U, K]``: max over students at the true class,
    min over students elsewhere. Units without a label (``-1``) take the min everywhere."""
    # no data-dependent indexing: the same ops whatever the labels, and no host synchronisation
    true_class = torch.nn.functional.one_hot(labels.clamp_min(0), logits.shape[-1]).bool() & (labels >= 0)[:, None]
    return torch.where(true_class, logits.max(dim=0).values, logits.min(dim=0).values)


class PooledStudent(Plugin):
    """The PooledStudent consensus target of MC-Distil (eq. 4), detached, for every student."""

    @hookimpl
    def collab_distill_consensus_targets(self, records: Mapping[str, Knowledge], temperature: float) -> dict[str, SoftTarget]:
        first = next(iter(records.values()))
        stacked = torch.stack([r.logits.detach() for r in records.values()])
        target = SoftTarget.from_logits(pooled_student_logits(stacked, first.unit_labels), temperature)
        return {name: target for name in records}
