"""Feature-level distillation on named intermediate outputs: FitNets hints and attention transfer.

Both read features by module path (``layer3``, ``backbone.fpn[1]``; see
:mod:`collab_distill.features`), so they work on any student and teacher without editing them,
classifiers and detectors alike. Each adds one term per student to the cohort loss, logged as
``<student>/hint`` or ``<student>/attention``, and is off while the student warms up.

* :class:`FitNets` (Romero et al. 2015, the hint term as RepDistiller trains it alongside the
  logit loss): a trainable regressor maps the student's feature to the teacher's channels and the
  mean squared error to the teacher's feature is added with ``weight``. The regressor is a
  plugin-owned module (``collab_distill_student_modules``): trained with its student, checkpointed,
  left out of export. On a detector's FPN level this is feature imitation.
* :class:`AttentionTransfer` (Zagoruyko & Komodakis 2017): the spatial attention map
  ``normalize(mean_c |F|^p)`` of each listed layer is matched to the teacher's (squared L2,
  ``weight`` = the paper's beta/2 convention of RepDistiller: 1000); no parameters.

Per-image loss weights: with ``per_image_weight: beta`` the term of image ``i`` is scaled by the
student's ``beta_i`` of that step (a C-Net then decides per image how much the teacher's features
count, as it does for the logits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from collab_distill.engine_view import EngineView
from collab_distill.features import FeatureRequest, parse_feature
from collab_distill.hookspecs import hookimpl
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, LossWeights
from collab_distill.task import ConfigError

__all__ = ["FitNets", "AttentionTransfer", "hint_loss_per_image", "attention_map", "attention_loss_per_image", "make_regressor"]


def make_regressor(in_channels: int, out_channels: int, kind: str) -> nn.Module:
    """FitNets' regressor from the student's to the teacher's channels.

    ``conv``: 1x1 conv + BatchNorm + ReLU (RepDistiller's ConvReg for maps of equal size);
    ``linear``: a 1x1 conv only.
    """
    if kind == "linear":
        return nn.Conv2d(in_channels, out_channels, 1)
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())
    raise ConfigError(f"FitNets.adaptor={kind!r}: choose conv, linear or none")


def hint_loss_per_image(student: Tensor, teacher: Tensor, normalize: str = "none") -> Tensor:
    """``mean_{c,h,w} (student - teacher)^2`` per image, ``[B]`` (the regressor already applied).

    ``normalize="channel"`` first standardises every channel of every image over its positions
    (zero mean, unit variance), student and teacher alike, as PKD (Cao et al., NeurIPS 2022) does
    for detectors: the term is then ``2 * (1 - Pearson correlation)`` averaged over channels,
    between 0 and 4 whatever the features' scale (an FPN level trained from scratch can be in the
    tens), and a teacher channel's offset or magnitude no longer dominates the hint."""
    s, t = student.float(), teacher.detach().float()
    if normalize == "channel":
        s, t = _standardise(s), _standardise(t)
    return (s - t).pow(2).flatten(1).mean(dim=1)


def _standardise(feature: Tensor, eps: float = 1e-5) -> Tensor:
    """Each channel of each image to zero mean and unit variance over its positions."""
    flat = feature.flatten(2)
    mean = flat.mean(dim=2, keepdim=True)
    std = flat.var(dim=2, unbiased=False, keepdim=True).add(eps).sqrt()
    return ((flat - mean) / std).view_as(feature)


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """``normalize(mean_c |F|^p)`` flattened over space, ``[B, H*W]``."""
    return F.normalize(feature.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_loss_per_image(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """``mean_hw (at(S) - at(T))^2`` per image, ``[B]``; the larger map is average-pooled to the
    smaller one's size first (as RepDistiller does)."""
    hs, ht = student.shape[-2:], teacher.shape[-2:]
    if hs[0] > ht[0]:
        student = F.adaptive_avg_pool2d(student, (ht[0], ht[1]))
    elif ht[0] > hs[0]:
        teacher = F.adaptive_avg_pool2d(teacher, (hs[0], hs[1]))
    return (attention_map(student, p) - attention_map(teacher.detach(), p)).pow(2).mean(dim=1)


class _FeaturePairs(Plugin):
    """Pairs of (student feature, teacher feature) for every selected student."""

    term = "features"

    def __init__(
        self,
        student_features: Sequence[str],
        teacher_features: Optional[Sequence[str]],
        teacher: Optional[str],
        students: Optional[Sequence[str]],
        weight: float,
        per_image_weight: str,
    ) -> None:
        name = type(self).__name__
        if not student_features:
            raise ConfigError(f"{name}: give at least one feature (a module path such as layer3)")
        for spec in [*student_features, *(teacher_features or [])]:
            parse_feature(spec)
        if teacher_features is not None and len(teacher_features) != len(student_features):
            raise ConfigError(
                f"{name}: {len(student_features)} student feature(s) {list(student_features)} but "
                f"{len(teacher_features)} teacher feature(s) {list(teacher_features)}; they are matched in order"
            )
        if not weight >= 0:
            raise ConfigError(f"{name}.weight={weight} must be >= 0")
        if per_image_weight not in ("none", "beta"):
            raise ConfigError(f"{name}.per_image_weight={per_image_weight!r}: choose none or beta")
        self.student_features = list(student_features)
        self.teacher_features = list(teacher_features) if teacher_features is not None else list(student_features)
        self.teacher = teacher
        self.students = list(students) if students is not None else None
        self.weight = float(weight)
        self.per_image_weight = per_image_weight

    def _selected(self, engine: EngineView) -> list[str]:
        return self.students if self.students is not None else list(engine.cohort.students)

    @hookimpl
    def collab_distill_configure(self, engine: EngineView) -> None:
        name = type(self).__name__
        teachers = list(engine.cohort.teachers)
        if not teachers:
            raise ConfigError(f"{name} distils a teacher's features but the cohort has no teacher (cohort.teachers)")
        if self.teacher is None:
            if len(teachers) > 1:
                raise ConfigError(f"{name}: the cohort has teachers {teachers}; say which one with {name}.teacher")
            self.teacher = teachers[0]
        elif self.teacher not in teachers:
            raise ConfigError(f"{name}.teacher={self.teacher!r} is not a teacher of the cohort ({teachers})")
        unknown = set(self._selected(engine)) - set(engine.cohort.students)
        if unknown:
            raise ConfigError(f"{name}.students names {sorted(unknown)}, "
                              f"not students of the cohort ({sorted(engine.cohort.students)})")

    @hookimpl
    def collab_distill_feature_requests(self, engine: EngineView) -> list[FeatureRequest]:
        # a student's features are captured once *it* is past its warm-up (per-student
        # warmup_epochs), the teacher's while any selected student is
        def student_done(student: str) -> Callable[[EngineView, str], bool]:
            return lambda engine, phase: phase != "meta" and not engine.warming_up(student)

        def any_done(engine: EngineView, phase: str) -> bool:
            return phase != "meta" and any(not engine.warming_up(s) for s in self._selected(engine))

        teacher = self.teacher
        assert teacher is not None  # chosen at configure
        requests = [FeatureRequest(teacher, f, any_done) for f in self.teacher_features]
        for student in self._selected(engine):
            requests += [FeatureRequest(student, f, student_done(student)) for f in self.student_features]
        return requests

    def pair_loss(self, engine: EngineView, student: str, index: int, feature: Tensor, target: Tensor) -> Tensor:
        """``[B]`` loss of one feature pair."""
        raise NotImplementedError

    @hookimpl
    def collab_distill_auxiliary_losses(
        self, engine: EngineView, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge],
        weights: Mapping[str, LossWeights], phase: str,
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for student in self._selected(engine):
            if engine.warming_up(student) or student not in records:
                continue
            record = records[student]
            if self.student_features[0] not in record.features:
                continue  # not captured in this step
            teacher = teacher_records[self.teacher].features  # type: ignore[index]
            per_image = sum(
                self.pair_loss(engine, student, i, record.features[fs], teacher[ft])
                for i, (fs, ft) in enumerate(zip(self.student_features, self.teacher_features))
            )
            if self.per_image_weight == "beta":
                per_image = per_image * weights[student].beta
            out[f"{student}/{self.term}"] = self.weight * per_image.mean()  # type: ignore[union-attr]
        return out


class FitNets(_FeaturePairs):
    """FitNets hints with a trainable regressor per student and feature.

    Args:
        student_features: the students' guided layers (module path, optionally ``[key]``).
        teacher_features: the teacher's hint layers, matched in order (default: the same paths).
        teacher: which teacher (default: the only one).
        students: which students (default: all).
        weight: the hint term's weight (RepDistiller's FitNet: 100 with the mean squared error).
        adaptor: ``conv`` (1x1 conv + BN + ReLU), ``linear`` (1x1 conv) or ``none`` (the shapes must
            already agree).
        per_image_weight: ``none`` or ``beta`` (scale each image's term by the student's beta).
        normalize: ``none`` (FitNets' plain mean squared error) or ``channel`` (both features
            standardised per channel and image first, as PKD does for detectors; the term is then
            between 0 and 4, ``2 * (1 - Pearson correlation)``, whatever the features' scale).
    """

    term = "hint"

    def __init__(
        self,
        student_features: Sequence[str] = ("layer3",),
        teacher_features: Optional[Sequence[str]] = None,
        teacher: Optional[str] = None,
        students: Optional[Sequence[str]] = None,
        weight: float = 100.0,
        adaptor: Literal["conv", "linear", "none"] = "conv",
        per_image_weight: Literal["none", "beta"] = "none",
        normalize: Literal["none", "channel"] = "none",
    ) -> None:
        super().__init__(student_features, teacher_features, teacher, students, weight, per_image_weight)
        if adaptor not in ("conv", "linear", "none"):
            raise ConfigError(f"FitNets.adaptor={adaptor!r}: choose conv, linear or none")
        if normalize not in ("none", "channel"):
            raise ConfigError(f"FitNets.normalize={normalize!r}: choose none or channel")
        self.adaptor = adaptor
        self.normalize = normalize

    @hookimpl
    def collab_distill_student_modules(self, engine: EngineView) -> dict[str, dict[str, nn.Module]]:
        assert self.teacher is not None  # chosen at configure
        shapes = engine.feature_shapes
        modules: dict[str, dict[str, nn.Module]] = {}
        for student in self._selected(engine):
            for i, (fs, ft) in enumerate(zip(self.student_features, self.teacher_features)):
                s_shape, t_shape = shapes[student][fs], shapes[self.teacher][ft]
                where = (f"FitNets: student {student!r} feature {fs!r} {s_shape} "
                         f"vs teacher {self.teacher!r} feature {ft!r} {t_shape}")
                if len(s_shape) != 3 or len(t_shape) != 3:
                    raise ConfigError(f"{where}: FitNets needs [C, H, W] feature maps; pick convolutional layers")
                if s_shape[1:] != t_shape[1:]:
                    raise ConfigError(f"{where}: the spatial sizes differ; pick layers of equal resolution")
                if self.adaptor == "none":
                    if s_shape != t_shape:
                        raise ConfigError(f"{where}: the shapes differ and FitNets.adaptor is none; use adaptor: conv or linear")
                    continue
                modules.setdefault(student, {})[f"fitnets_regressor_{i}"] = make_regressor(s_shape[0], t_shape[0], self.adaptor)
        return modules

    def pair_loss(self, engine: EngineView, student: str, index: int, feature: Tensor, target: Tensor) -> Tensor:
        if self.adaptor != "none":
            feature = engine.student_module(student, f"fitnets_regressor_{index}")(feature)
        return hint_loss_per_image(feature, target, self.normalize)

    def __repr__(self) -> str:
        return (f"FitNets(student_features={self.student_features}, teacher_features={self.teacher_features}, "
                f"weight={self.weight}, adaptor={self.adaptor!r}, normalize={self.normalize!r})")


class AttentionTransfer(_FeaturePairs):
    """Attention transfer on one or more layers (no trainable parameters).

    Args:
        student_features: the students' layers (module paths).
        teacher_features: the teacher's layers, matched in order (default: the same paths).
        teacher: which teacher (default: the only one).
        students: which students (default: all).
        weight: the term's weight (RepDistiller: 1000).
        p: the exponent of the attention map (the paper: 2).
        per_image_weight: ``none`` or ``beta``.
    """

    term = "attention"

    def __init__(
        self,
        student_features: Sequence[str] = ("layer1", "layer2", "layer3", "layer4"),
        teacher_features: Optional[Sequence[str]] = None,
        teacher: Optional[str] = None,
        students: Optional[Sequence[str]] = None,
        weight: float = 1000.0,
        p: float = 2.0,
        per_image_weight: Literal["none", "beta"] = "none",
    ) -> None:
        super().__init__(student_features, teacher_features, teacher, students, weight, per_image_weight)
        if not p > 0:
            raise ConfigError(f"AttentionTransfer.p={p} must be > 0")
        self.p = float(p)

    @hookimpl
    def collab_distill_student_modules(self, engine: EngineView) -> None:
        # no parameters; check the shapes once the features are measured
        assert self.teacher is not None  # chosen at configure
        for student in self._selected(engine):
            for fs, ft in zip(self.student_features, self.teacher_features):
                s_shape, t_shape = engine.feature_shapes[student][fs], engine.feature_shapes[self.teacher][ft]
                if len(s_shape) != 3 or len(t_shape) != 3:
                    raise ConfigError(
                        f"AttentionTransfer: student {student!r} feature {fs!r} {s_shape} / teacher feature {ft!r} "
                        f"{t_shape}: attention maps need [C, H, W] feature maps"
                    )
        return None

    def pair_loss(self, engine: EngineView, student: str, index: int, feature: Tensor, target: Tensor) -> Tensor:
        return attention_loss_per_image(feature, target, self.p)

    def __repr__(self) -> str:
        return f"AttentionTransfer(student_features={self.student_features}, weight={self.weight}, p={self.p})"
