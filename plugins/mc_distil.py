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
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from collab_distill import console
from collab_distill.engine_view import EngineView
from collab_distill.hookspecs import hookimpl
from collab_distill.meta import MetaModule
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, LossWeights, SoftTarget, per_image_mean
from collab_distill.report import ReportSection
from collab_distill.task import ConfigError, ModelFactory, TaskInfo

__all__ = [
    "CNet", "CoordinatorNetwork", "PooledStudent", "pooled_student_logits", "weight_statistics", "largest_spread",
    "noise_separation",
]

Activation = Literal["sigmoid", "softplus", "softmax"]
Normalize = Literal["batch", "term", "none"]
TERMS = ("alpha", "beta", "gamma")


def _kd_mix(gamma: bool) -> tuple[float, float, float]:
    """KD's mix of examples/digits.yaml (lambda = 0.7); with gamma on, 0.2 of beta's share goes
    to the consensus term so that the three terms still sum to 1."""
    return (0.3, 0.5, 0.2) if gamma else (0.3, 0.7, 0.0)


class CoordinatorNetwork(nn.Module):
    """``g_phi``: per image, features (the image through ``backbone``, and/or detached per-image
    signals of the cohort) and a head with 3 outputs (alpha, beta, gamma) per student.

    ``normalize="batch"`` (the default) turns the head's outputs into *relative* weights: each
    term's weight is its starting ``mix`` times a factor in ``(1/max_factor, max_factor)`` that is
    exactly 1 while the head is zero (as it is at initialisation), and each student's weights are rescaled
    so that their sum over the three terms has batch mean ``sum(mix)``. The network can shift
    weight between images and between terms but cannot change the loss scale: a one-step
    lookahead otherwise learns a larger step (every weight saturates), not a different mix.
    ``normalize="term"`` rescales each term on its own to batch mean ``mix``: the mix itself stays
    the fixed one (e.g. KD's, chosen on val) and the network only decides, per image, which term
    each image's share goes to (trust the label here, the teacher there). A greedy one-step
    lookahead cannot then drift the mix toward the supervised term, which its meta objective
    (the supervised loss) favours whatever the horizon.
    A term whose ``mix`` is 0 stays 0. ``normalize="none"`` is the unnormalised form
    ``scale * activation(head)``.

    With ``region_inputs`` a second head reads per-unit (per-region) signals and gives each region
    a factor on beta and gamma (:meth:`region_factors`).
    """

    mix: Tensor  # ``[S, W]`` (W = 3 + named terms), a (non-persistent) buffer: see ``__init__``

    def __init__(
        self,
        backbone: Optional[nn.Module],
        embedding_dim: int,
        extra_inputs: int,
        num_students: int,
        mix: tuple[float, ...],
        normalize: Normalize = "batch",
        max_factor: float = 10.0,
        hidden: int = 0,
        activation: Activation = "sigmoid",
        scale: float = 1.0,
        region_inputs: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_students = num_students
        self.normalize = normalize
        self.activation = activation
        self.scale = scale
        self.max_factor = max_factor
        width = (embedding_dim if backbone is not None else 0) + extra_inputs
        layers: list[nn.Module] = [nn.Linear(width, hidden), nn.ReLU()] if hidden else []
        self.terms = len(mix)  # alpha, beta, gamma and any named terms (``CNet.terms``)
        last = nn.Linear(hidden or width, self.terms * num_students)
        self.head = nn.Sequential(*layers, last)
        if normalize in ("batch", "term"):
            # a zero head gives every image exactly ``mix``: doing nothing is the fixed-mix baseline
            nn.init.zeros_(last.weight)
        else:
            # start near the same weights for every image (0.5 * scale for sigmoid); small non-zero
            # head weights so the backbone gets a meta-gradient from the first meta step on
            nn.init.normal_(last.weight, std=1e-2)
        nn.init.zeros_(last.bias)
        self.register_buffer("mix", torch.tensor(mix, dtype=torch.float32).expand(num_students, self.terms).clone(),
                             persistent=False)
        self.regions: Optional[nn.Sequential] = None
        if region_inputs:
            # per-region factors on beta and gamma; a zero last layer spreads every image's weight evenly
            region_last = nn.Linear(hidden or region_inputs, 2 * num_students)
            nn.init.zeros_(region_last.weight)
            nn.init.zeros_(region_last.bias)
            region_layers: list[nn.Module] = [nn.Linear(region_inputs, hidden), nn.ReLU()] if hidden else []
            self.regions = nn.Sequential(*region_layers, region_last)

    def region_factors(self, unit_inputs: Tensor, unit_image: Tensor, num_images: int) -> Tensor:
        """``[U, S, 2]`` factors on beta and gamma for every unit (region) and student, each in
        ``(1/max_factor, max_factor)`` before being rescaled to mean 1 over each image's units,
        so they move an image's distillation weight between its regions, never its total."""
        assert self.regions is not None, "built without region_inputs"
        raw = self.regions(unit_inputs.float()).view(-1, self.num_students, 2)
        factor = torch.exp(math.log(self.max_factor) * torch.tanh(raw))
        flat = factor.flatten(1)
        mean = flat.new_zeros(num_images, flat.shape[1]).index_add(0, unit_image, flat)
        count = flat.new_zeros(num_images).index_add(0, unit_image, torch.ones_like(flat[:, 0])).clamp_min(1.0)
        return (flat / (mean / count[:, None])[unit_image]).view_as(factor)

    def forward(self, images: Optional[Tensor], extras: Optional[Tensor] = None) -> Tensor:
        """``[B, S, W]`` weights (alpha, beta, gamma, then the named terms) for ``S`` students."""
        parts = ([self.backbone(images)] if self.backbone is not None else []) + ([extras] if extras is not None else [])
        raw = self.head(torch.cat(parts, dim=1).float() if len(parts) > 1 else parts[0].float())
        raw = raw.view(-1, self.num_students, self.terms)
        if self.normalize in ("batch", "term"):
            # a factor in (1/max_factor, max_factor), exactly 1 at raw = 0 (so is the rescaling below:
            # a zero head reproduces the fixed mix bit for bit)
            factor = torch.exp(math.log(self.max_factor) * torch.tanh(raw))
            if self.normalize == "term":  # every term keeps its batch mean: only images are traded
                return self.mix * (factor / factor.mean(dim=0, keepdim=True))
            budget = self.mix.sum(dim=-1)  # [S]
            relative = (self.mix * factor).sum(dim=-1) / budget  # [B, S]
            return self.mix * (factor / relative.mean(dim=0)[None, :, None])
        if self.activation == "sigmoid":
            return self.scale * torch.sigmoid(raw)
        if self.activation == "softplus":
            return self.scale * F.softplus(raw)
        return self.scale * torch.softmax(raw, dim=-1)  # the three terms of a student sum to scale


class CNet(Plugin):
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

    # -- applying the C-Net to a data set --------------------------------------------------

    def apply(self, engine: EngineView, split: str) -> list[tuple[int, int, str, float, float, float]]:
        """The C-Net's weights for every image of ``split`` (this rank's shard) as rows
        ``(index, label, student, alpha, beta, gamma)``; every module is left in its previous mode.
        With ``normalize: batch`` the weights are those of the split's batches."""
        assert self.module is not None
        loader = engine.batches(split)
        # the C-Net and the students whose losses it may read, in eval mode (BatchNorm's running
        # statistics), so that applying it after a fit and from a checkpoint give the same weights
        modules = [self.module, *engine.students.values()]
        modes = [[m.training for m in module.modules()] for module in modules]
        for module in modules:
            module.eval()
        rows = []
        with torch.no_grad():
            for batch in loader:
                batch = engine.task.move_batch(batch, engine.fabric)
                records: dict[str, Knowledge] = {}
                teachers: Mapping[str, Knowledge] = {}
                if self.uses_records:
                    # the units the cohort shares in training (detection: the region source's proposals)
                    context = engine.task.shared_context(batch, engine.teachers, engine.students)
                    records = {s: engine.task.knowledge(m, batch, context=context) for s, m in engine.students.items()}
                    teachers = engine.teacher_records(batch, context)
                targets = batch.get("targets") if isinstance(batch, dict) else None
                # one class per image (classification) is shown in the grid; -1 otherwise
                labels = targets.tolist() if isinstance(targets, Tensor) and targets.dim() == 1 else [-1] * len(batch["index"])
                for student, w in self.weights(engine, batch, records, teachers).items():
                    for index, label, (a, b, g) in zip(batch["index"].tolist(), labels, w.float().cpu().tolist()):
                        rows.append((int(index), int(label), student, a, b, g))
        for module, module_modes in zip(modules, modes):
            for m, mode in zip(module.modules(), module_modes):
                m.training = mode
        return rows

    def write_weights(self, engine: EngineView, split: str, per_side: int = 8) -> Path:
        """``plugins/cnet/<split>_weights.csv`` and ``<split>_extremes.png`` in the run folder: the
        weights of every image, and per student the ``per_side`` images whose loss leans most on
        the teacher (largest beta / (alpha + beta)) and most on the label (smallest). Also adds
        the split's weight statistics (and, for a training split with label noise, how well
        alpha separates clean from flipped labels) to ``plugins/cnet/summary.json``."""
        rows = self.apply(engine, split)
        assert engine.run_dir is not None  # called inside a fit or on a finished run's folder
        folder = engine.run_dir / "plugins" / "cnet"
        folder.mkdir(parents=True, exist_ok=True)
        flipped = _flipped_flags(engine, split)
        table = folder / f"{split}_weights.csv"
        if flipped is None:
            table.write_text("index,label,student,alpha,beta,gamma\n"
                             + "".join(f"{i},{y},{s},{a:.6g},{b:.6g},{g:.6g}\n" for i, y, s, a, b, g in rows))
        else:
            table.write_text("index,label,student,alpha,beta,gamma,flipped\n"
                             + "".join(f"{i},{y},{s},{a:.6g},{b:.6g},{g:.6g},{int(flipped[i])}\n" for i, y, s, a, b, g in rows))
        summary: dict[str, Mapping[str, Any]] = {"students": weight_statistics(rows, self.students)}
        noise = noise_separation(rows, self.students, flipped) if flipped is not None else None
        if noise is not None:
            summary["label_noise"] = noise
        _update_summary(folder / "summary.json", split, summary)
        try:
            _extremes_grid(engine, split, rows, self.students, per_side, folder / f"{split}_extremes.png")
            if noise is not None:
                _clean_vs_flipped_histogram(rows, self.students, flipped, noise,
                                            folder / f"{split}_alpha_clean_vs_flipped.png")
        except ImportError:  # matplotlib is a dependency, but a figure is never worth failing a run for
            pass
        return table

    def inert(self, statistics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> bool:
        """No student's weight of any learned term varies over the images by more than
        ``inert_threshold`` of its mean: the C-Net weighs every image alike."""
        return largest_spread(statistics) <= self.inert_threshold

    @hookimpl
    def collab_distill_fit_end(self, engine: EngineView) -> None:
        """Apply the trained C-Net to the val split (and to a training split with label noise)
        for ``collab-distill report``; warn when its weights stayed inert."""
        assert engine.fabric is not None
        if not engine.fabric.is_global_zero or self.module is None:
            return
        self.write_weights(engine, "val")
        if _flipped_flags(engine, "train") is not None:
            self.write_weights(engine, "train")
        assert engine.run_dir is not None  # write_weights wrote there
        summary = json.loads((engine.run_dir / "plugins" / "cnet" / "summary.json").read_text())
        val = summary["val"]["students"]
        if self.inert(val):
            spread = largest_spread(val)
            message = (
                f"CNet: the C-Net's weights stayed inert: over the val images no student's alpha, beta or gamma "
                f"varies by more than {spread:.2%} of its mean (threshold {self.inert_threshold:.0%}), so it weighed "
                f"every image alike after {len(engine.meta_history)} meta steps. Give it more meta steps "
                "(meta.every_n_steps), a larger CNet.lr, or per-image signals (CNet.use_losses).")
            warnings.warn(message, stacklevel=1)
            console.plain(engine.fabric, f"[warning] {message}")

    @hookimpl
    def collab_distill_report_sections(self, engine: EngineView) -> Optional[list[ReportSection]]:
        """The report's C-Net section: how the learned weights spread over the val images (and,
        with label noise, how alpha separates clean from flipped training labels), the weights'
        distribution per student and term (``plugins/cnet/val_weights_distribution.png``, drawn
        here from ``val_weights.csv``) and the figures ``fit_end`` wrote."""
        if self.module is None or engine.run_dir is None:
            return None
        assert engine.fabric is not None
        if not engine.fabric.is_global_zero:
            return None
        folder = engine.run_dir / "plugins" / "cnet"
        table, summary_path = folder / "val_weights.csv", folder / "summary.json"
        if not table.is_file() or not summary_path.is_file():
            return None
        try:
            _distribution_figure(table, folder / "val_weights_distribution.png")
        except ImportError:  # matplotlib is a dependency, but a figure is never worth failing a run for
            pass
        names = ("val_weights_distribution.png", "val_extremes.png", "train_extremes.png", "train_alpha_clean_vs_flipped.png")
        figures = [f"plugins/cnet/{name}" for name in names if (folder / name).is_file()]
        summary = json.loads(summary_path.read_text())
        text = self._report_text(summary, len(engine.meta_history))
        return [ReportSection("MC-Distil: the C-Net's loss weights", text, figures)]

    def _report_text(self, summary: Mapping[str, Any], meta_steps: int) -> str:
        """Markdown: the inert/spread verdict, each student's weights over the val images and,
        with label noise, alpha's separation of clean and flipped training labels."""
        val = summary["val"]["students"]
        spread = largest_spread(val)
        verdict = ("**inert**, the C-Net weighs every image alike" if self.inert(val)
                   else "the C-Net weighs images differently")
        lines = [f"`{self!r}`, {meta_steps} meta steps. Over the val images the largest spread of a weight is "
                 f"{spread:.2%} of its mean (std / mean; inert at or below {self.inert_threshold:.0%}), so {verdict}.", "",
                 "| student | alpha mean (std) | beta mean (std) | gamma mean (std) | alpha 5-95% |", "|---|---|---|---|---|"]
        for student, terms in val.items():
            cells = [f"{terms[t]['mean']:.3f} ({terms[t]['std']:.3f})" for t in TERMS]
            lines.append(f"| {student} | " + " | ".join(cells) + f" | {terms['alpha']['q5']:.3f}-{terms['alpha']['q95']:.3f} |")
        noise = summary.get("train", {}).get("label_noise")
        if noise:
            lines += ["", "With label noise, on the training split: how well alpha (the label's weight) ranks clean labels "
                      "above flipped ones (AUC 0.5: blind, 1: perfect).", "",
                      "| student | alpha AUC clean vs flipped | mean alpha clean | mean alpha flipped | flipped / images |",
                      "|---|---|---|---|---|"]
            for student, n in noise.items():
                lines.append(f"| {student} | {n['alpha_auc_clean_vs_flipped']:.3f} | {n['alpha_mean_clean']:.3f} | "
                             f"{n['alpha_mean_flipped']:.3f} | {n['flipped']} / {n['images']} |")
        return "\n".join(lines)

    @hookimpl
    def collab_distill_evaluation_end(self, engine: EngineView, split: str) -> None:
        """``collab-distill validate|test`` of a finished run: apply its C-Net to that split too."""
        if engine.fitting or engine.run_dir is None:
            return
        assert engine.fabric is not None
        if engine.fabric.is_global_zero and engine.meta_modules.get("cnet") is not None:
            self.write_weights(engine, split)

    def __repr__(self) -> str:
        inputs = [n for n, on in (("image", self.use_image), ("logits", self.use_logits), ("label", self.use_label),
                                  ("losses", self.use_losses), ("unit_losses", self.use_unit_losses)) if on]
        form = (f"normalize={self.normalize}, mix={list(self.mix)}" if self.normalize != "none"
                else f"activation={self.activation}") + (", per_region" if self.per_region else "")
        backbone = self.backbone.describe() if self.backbone is not None else None
        return (f"CNet(backbone={backbone}, inputs={inputs}, {form}, gamma={self.gamma}, "
                f"independent={self.independent})")


#: ``(index, label, student, alpha, beta, gamma)`` per image and student
WeightRows = list[tuple[int, int, str, float, float, float]]


def weight_statistics(rows: WeightRows, students: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per student and term: mean, std and the 5/25/50/75/95% quantiles over the images."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for student in students:
        mine = torch.tensor([r[3:] for r in rows if r[2] == student], dtype=torch.float64).view(-1, 3)
        if mine.shape[0] == 0:
            continue
        q = torch.quantile(mine, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64), dim=0)
        out[student] = {
            term: {"mean": float(mine[:, k].mean()), "std": float(mine[:, k].std(unbiased=False)),
                   **{f"q{p}": float(q[j, k]) for j, p in enumerate((5, 25, 50, 75, 95))}}
            for k, term in enumerate(TERMS)
        }
    return out


def largest_spread(statistics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> float:
    """The largest std / mean over students and (non-zero) terms of :func:`weight_statistics`."""
    return max((t["std"] / t["mean"] for s in statistics.values() for name, t in s.items()
                if name in TERMS and t["mean"] > 0), default=0.0)


def noise_separation(rows: WeightRows, students: list[str], flipped: Any) -> dict[str, dict[str, float]]:
    """Per student: the AUC of alpha ranking clean labels above flipped ones (0.5: blind, 1:
    every clean image gets more label weight than every flipped one) and the mean alpha of each."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for student in students:
        mine = [(r[3], bool(flipped[r[0]])) for r in rows if r[2] == student]
        alpha = [a for a, _ in mine]
        clean = [not f for _, f in mine]
        if len(set(clean)) < 2:
            continue
        out[student] = {
            "alpha_auc_clean_vs_flipped": float(roc_auc_score(clean, alpha)),
            "alpha_mean_clean": float(sum(a for a, c in mine if not c) / max(1, sum(not c for _, c in mine))),
            "alpha_mean_flipped": float(sum(a for a, c in mine if c) / max(1, sum(c for _, c in mine))),
            "flipped": int(sum(f for _, f in mine)),
            "images": len(mine),
        }
    return out


def _coordinator(nets: nn.ModuleDict, key: str) -> CoordinatorNetwork:
    """The C-Net ``key`` (a student's, or ``shared``) of the meta module ``cnet``."""
    net = nets[key]
    assert isinstance(net, CoordinatorNetwork)
    return net


def _flipped_flags(engine: EngineView, split: str) -> Optional[Any]:
    """Which samples of ``split`` a noise option corrupted (indexed like the split): flipped
    labels (classification), images with any corrupted box (detection); ``None`` when the
    split's data set has no such record."""
    flipped = getattr(engine.task.dataset(split), "flipped", None)
    return flipped if flipped is not None and len(flipped) else None


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


def _update_summary(path: Path, split: str, summary: Mapping[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[split] = summary
    path.write_text(json.dumps(data, indent=2))


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


def _extremes_grid(engine: EngineView, split: str, rows: list[tuple[int, int, str, float, float, float]],
                   students: list[str], per_side: int, path: Path) -> None:
    """Two rows of images per student: most teacher-weighted, then most label-weighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = engine.task.dataset(split)
    fig, axes = plt.subplots(2 * len(students), per_side, figsize=(1.3 * per_side, 2.9 * len(students)), squeeze=False)
    for k, student in enumerate(students):
        mine = sorted((r for r in rows if r[2] == student), key=lambda r: r[4] / max(r[3] + r[4], 1e-12))
        sides = (("teacher", mine[::-1][:per_side]), ("label", mine[:per_side]))
        for j, (side, picked) in enumerate(sides):
            for col in range(per_side):
                ax = axes[2 * k + j][col]
                ax.set_xticks([])
                ax.set_yticks([])
                if col >= len(picked):
                    ax.axis("off")
                    continue
                index, label, _, a, b, g = picked[col]
                image = engine.task.images(engine.task.collate([dataset[index]]))[0].float().cpu()
                image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
                if image.shape[0] == 1:
                    ax.imshow(image[0].numpy(), cmap="gray")
                else:
                    ax.imshow(image[:3].permute(1, 2, 0).numpy())
                ax.set_title((f"y={label}\n" if label >= 0 else "") + f"α{a:.2f} β{b:.2f}", fontsize=7)
                if col == 0:
                    ax.set_ylabel(f"{student}\nmost {side}", fontsize=8)
    fig.suptitle(f"C-Net on {split}: per student, the images weighted most towards the teacher (β/(α+β) largest) "
                 f"and towards the label (smallest)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _distribution_figure(table: Path, path: Path) -> None:
    """Per term, histograms of the weights in ``<split>_weights.csv`` over the images, one per
    student (terms that are 0 for every image are left out)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with table.open() as f:
        rows = list(csv.DictReader(f))
    students = list(dict.fromkeys(r["student"] for r in rows))
    terms = [t for t in TERMS if any(float(r[t]) != 0 for r in rows)] or ["alpha"]
    fig, axes = plt.subplots(1, len(terms), figsize=(4.3 * len(terms), 3.6), squeeze=False)
    for ax, term in zip(axes[0], terms):
        values = [float(r[term]) for r in rows]
        low, high = min(values), max(values)
        bins = [low + (high - low) * k / 30 for k in range(31)] if high > low else 30  # the same bins for every student
        for student in students:
            ax.hist([float(r[term]) for r in rows if r["student"] == student], bins=bins, alpha=0.5, label=student)
        ax.set_title(term)
        ax.set_xlabel("weight")
    axes[0][0].set_ylabel("images")
    axes[0][0].legend(fontsize=8)
    split = table.name.removesuffix("_weights.csv")
    fig.suptitle(f"C-Net weights over the {split} images at the end of training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _clean_vs_flipped_histogram(rows: list[tuple[int, int, str, float, float, float]], students: list[str], flipped: Any,
                                separation: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Per student, histograms of alpha for images whose label is clean and for flipped ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(students), figsize=(3.6 * len(students), 2.8), squeeze=False)
    for ax, student in zip(axes[0], students):
        mine = [(r[3], bool(flipped[r[0]])) for r in rows if r[2] == student]
        for is_flipped, colour, name in ((False, "tab:blue", "clean"), (True, "tab:red", "flipped")):
            values = [a for a, f in mine if f == is_flipped]
            if values:
                ax.hist(values, bins=30, alpha=0.6, color=colour, label=f"{name} ({len(values)})", density=True)
        auc = separation.get(student, {}).get("alpha_auc_clean_vs_flipped")
        ax.set_title(f"{student}: alpha AUC {auc:.2f}" if auc is not None else student, fontsize=9)
        ax.set_xlabel("alpha (label weight)")
        ax.legend(fontsize=7)
    fig.suptitle("C-Net on the training split: label weight of images with clean vs flipped labels", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
