"""Self-boosting of multi-exit students: every early exit learns from the labels and from a soft
target, with no teacher (MetaDistiller's eq. 3-4).

For a student with exits ``S_1 .. S_K`` (``S_K`` the final one, see
:class:`~collab_distill.tasks.classification.MultiExit`), each early exit ``k < K`` adds::

    alpha * CE(y, S_k) + (1 - alpha) * tau^2 * KL(T_k || S_k)        (CE alone when T_k is None)

averaged over the batch and summed over exits, logged as the ``<student>/exits`` term. The final
exit's CE is the record's supervised loss, which the engine already weighs with alpha (1 with
``FixedLossWeights(alpha=1, beta=0, gamma=0)`` or the defaults), giving eq. 3.

* :class:`DeepSupervision` (DSN, Lee et al. 2015; the papers' "hard only"): labels on every exit.
* :class:`SelfDistillation` (SD, Zhang et al. 2019 "Be Your Own Teacher", BYOT): the final
  exit's distribution, detached, is every early exit's target. With ``hint_weight > 0`` it also
  adds BYOT's feature hint: each early head's bottleneck output ``F_k`` (``heads.<k>.body`` of a
  :class:`~collab_distill.tasks.classification.multi_exit.MultiExitNet`) is pulled toward the
  deepest feature map ``F_C`` (the final stage's output, e.g. ``backbone.layer4``), detached::

      hint_weight * sum_k mean_i mean_{c,h,w} (F_k - F_C)^2          (logged as <student>/hint)

  The paper's code sums the squared difference over the elements; here it is averaged over
  ``(C, H, W)`` per image, so ``hint_weight`` does not depend on the size of the maps. The features
  are read through forward hooks by module path (:mod:`collab_distill.features`), and the term is
  off while the student warms up. BYOT's full loss per early exit is
  ``(1 - a) CE + a KL + lambda ||F_k - F_C||^2`` (its code: ``a`` 0.3, lambda 0.03, T 3); this
  module's ``alpha`` weighs the CE, so BYOT's mix is ``alpha=0.7, temperature=3``.
* :class:`~collab_distill.plugins.metadistiller.MetaDistiller`: a meta-learned top-down label
  generator produces ``T_k``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from collab_distill.engine_view import EngineView
from collab_distill.features import FeatureRequest
from collab_distill.hookspecs import hookimpl
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, SoftTarget
from collab_distill.task import ConfigError

__all__ = ["ExitSupervision", "DeepSupervision", "SelfDistillation", "exit_loss", "feature_hint_per_image"]

#: the record feature holding a multi-exit student's ``[E, U, K]`` exit logits
EXIT_LOGITS = "exit_logits"


def exit_loss(
    record: Knowledge, targets: list[Optional[SoftTarget]], alpha: float, temperature: float
) -> Tensor:
    """Eq. 4 summed over the early exits of one record: ``sum_k mean_i L_k``.

    ``targets[k]`` is exit ``k``'s soft target, or ``None`` for the labels alone (weight 1).
    """
    exits = record.features[EXIT_LOGITS]
    if len(targets) != exits.shape[0] - 1:
        raise ValueError(f"{len(targets)} exit targets for {exits.shape[0] - 1} early exits")
    labels = record.unit_labels
    total = exits.new_zeros((), dtype=torch.float32)
    for logits, target in zip(exits[:-1], targets):
        ce = F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=-1)
        if target is None:
            per_unit = ce
        else:
            kl = target.kl_per_unit(logits, temperature)
            per_unit = alpha * ce + (1.0 - alpha) * temperature * temperature * kl
        total = total + record.per_image(per_unit).mean()
    return total


def feature_hint_per_image(head_features: Sequence[Tensor], deepest: Tensor) -> Tensor:
    """BYOT's feature hint of every image, ``[B]``: ``sum_k mean_{c,h,w} (F_k - F_C)^2``.

    Args:
        head_features: the early heads' bottleneck outputs ``F_k``, each ``[B, C, H, W]`` (any
            shape equal to ``deepest``'s).
        deepest: the final stage's output ``F_C``; detached here, so the deepest features are
            never pulled toward the shallow ones.

    The squared difference is averaged over the non-batch elements (the paper's code sums them),
    which keeps the weight independent of the maps' size. Computed in float32.
    """
    if not head_features:
        raise ValueError("feature_hint_per_image needs at least one head feature")
    target = deepest.detach().float()
    total = target.new_zeros(target.shape[0])
    for k, feature in enumerate(head_features):
        if feature.shape != deepest.shape:
            raise ValueError(f"head feature {k} has shape {tuple(feature.shape)}, the deepest feature {tuple(deepest.shape)}")
        total = total + (feature.float() - target).pow(2).flatten(1).mean(dim=1)
    return total


def _inner(model: Any) -> Any:
    """The user's module inside Fabric's (and DDP's) wrapper."""
    return getattr(model, "module", model)


def is_multi_exit(model: Any) -> bool:
    """Whether a (possibly Fabric-wrapped) model declares several exits."""
    return int(getattr(_inner(model), "num_exits", 0)) >= 2


class ExitSupervision(Plugin):
    """Base of the self-boosting rules: supervises every early exit of every multi-exit student.

    Subclasses say what each early exit distils from (:meth:`exit_targets`).

    Args:
        alpha: weight of the labels' CE on an early exit; ``1 - alpha`` weighs the KL term
            (MetaDistiller and SD: 0.5).
        temperature: tau of the exits' KL term (MetaDistiller: 1); ``None``: ``trainer.temperature``.
    """

    def __init__(self, alpha: float = 0.5, temperature: Optional[float] = None) -> None:
        name = type(self).__name__
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"{name}.alpha={alpha} must be in [0, 1]: it mixes the exits' CE (alpha) and KL (1 - alpha)")
        if temperature is not None and not temperature > 0:
            raise ConfigError(f"{name}.temperature={temperature} must be > 0, or null for trainer.temperature")
        self.alpha = alpha
        self.temperature = temperature

    def tau(self, engine: EngineView) -> float:
        return float(self.temperature if self.temperature is not None else engine.trainer.temperature)

    def exit_targets(self, engine: EngineView, name: str, record: Knowledge, phase: str) -> list[Optional[SoftTarget]]:
        """One soft target per early exit of student ``name`` (``None``: labels only); ``phase``
        is the cohort loss's (``train`` or ``lookahead``)."""
        raise NotImplementedError

    @hookimpl
    def collab_distill_configure(self, engine: EngineView) -> None:
        plain = [n for n, m in engine.students.items() if not is_multi_exit(m)]
        if plain:
            described = ", ".join(f"{n} ({engine.cohort.students[n].describe()})" for n in plain)
            raise ConfigError(
                f"{type(self).__name__} needs multi-exit students: wrap them in MultiExit, e.g. "
                "`cohort.students.<name>: {class_path: collab_distill.tasks.classification.MultiExit, "
                f"init_args: {{backbone: <the model>}}}}`; not multi-exit: {described}"
            )

    @hookimpl
    def collab_distill_auxiliary_losses(
        self, engine: EngineView, records: Mapping[str, Knowledge], phase: str = "train"
    ) -> dict[str, Tensor]:
        tau = self.tau(engine)
        out = {}
        for name, record in records.items():
            exits = record.features.get(EXIT_LOGITS)
            if exits is None or exits.shape[0] < 2:
                continue
            if engine.warming_up(name):  # the warm-up is labels only, on every exit
                targets: list[Optional[SoftTarget]] = [None] * (exits.shape[0] - 1)
            else:
                targets = self.exit_targets(engine, name, record, phase)
            out[f"{name}/exits"] = exit_loss(record, targets, self.alpha, tau)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha}, temperature={self.temperature})"


class DeepSupervision(ExitSupervision):
    """DSN: every early exit learns from the labels only (CE with weight 1)."""

    def __init__(self) -> None:
        super().__init__(alpha=1.0)

    def exit_targets(self, engine: EngineView, name: str, record: Knowledge, phase: str) -> list[Optional[SoftTarget]]:
        return [None] * (record.features[EXIT_LOGITS].shape[0] - 1)

    def __repr__(self) -> str:
        return "DeepSupervision()"


class SelfDistillation(ExitSupervision):
    """SD (Zhang et al. 2019, "Be Your Own Teacher"): every early exit distils the final exit's
    distribution at tau, detached (the deepest classifier teaches the shallow ones), and, with
    ``hint_weight > 0``, every early head's bottleneck feature imitates the deepest feature map.

    Args:
        alpha: weight of the labels' CE on an early exit; ``1 - alpha`` weighs the KL term.
        temperature: tau of the exits' KL term; ``None``: ``trainer.temperature``.
        hint_weight: weight of the feature hint ``sum_k mean_i mean_{c,h,w} (F_k - F_C)^2``
            (``<student>/hint``, see :func:`feature_hint_per_image`); 0 (the default) turns it off
            and requests no features. BYOT's code used 0.03 (with a sum over the elements).
            Needs heads whose body output has the final stage's shape, checked at set-up.
    """

    def __init__(self, alpha: float = 0.5, temperature: Optional[float] = None, hint_weight: float = 0.0) -> None:
        super().__init__(alpha=alpha, temperature=temperature)
        if not hint_weight >= 0:
            raise ConfigError(f"SelfDistillation.hint_weight={hint_weight} must be >= 0 (0 turns the feature hint off)")
        self.hint_weight = float(hint_weight)

    def exit_targets(self, engine: EngineView, name: str, record: Knowledge, phase: str) -> list[Optional[SoftTarget]]:
        exits = record.features[EXIT_LOGITS]
        target = SoftTarget.from_logits(exits[-1], self.tau(engine))
        return [target] * (exits.shape[0] - 1)

    def _hinted(self, engine: EngineView) -> dict[str, tuple[tuple[str, ...], str]]:
        """``{student: (head body paths, final stage path)}`` of the students the hint applies to."""
        if not self.hint_weight > 0:
            return {}
        return {
            name: (tuple(_inner(model).head_feature_paths), _inner(model).final_stage_path)
            for name, model in engine.students.items()
            if is_multi_exit(model)
        }

    @hookimpl
    def collab_distill_feature_requests(self, engine: EngineView) -> list[FeatureRequest]:
        def when(engine: EngineView, phase: str) -> bool:
            return phase != "meta"

        return [
            FeatureRequest(student, path, when)
            for student, (heads, deepest) in self._hinted(engine).items()
            for path in (*heads, deepest)
        ]

    @hookimpl
    def collab_distill_student_modules(self, engine: EngineView) -> None:
        # no parameters: the first hook where the measured feature shapes are known
        for student, (heads, deepest) in self._hinted(engine).items():
            shapes = engine.feature_shapes[student]
            for path in heads:
                if shapes[path] != shapes[deepest]:
                    raise ConfigError(
                        f"SelfDistillation.hint_weight={self.hint_weight}: student {student!r}'s head feature {path!r} "
                        f"has shape {shapes[path]} but the final stage {deepest!r} has {shapes[deepest]}; the hint "
                        "needs equal shapes (the heads' downsampling does not reach the final stage's resolution "
                        "for this image size); set hint_weight: 0 or change the image size"
                    )
        return None

    @hookimpl
    def collab_distill_auxiliary_losses(
        self, engine: EngineView, records: Mapping[str, Knowledge], phase: str = "train"
    ) -> dict[str, Tensor]:
        out = super().collab_distill_auxiliary_losses(engine, records, phase)
        for student, (heads, deepest) in self._hinted(engine).items():
            record = records.get(student)
            if record is None or engine.warming_up(student) or deepest not in record.features:
                continue  # warming up, or the features were not captured in this step
            per_image = feature_hint_per_image([record.features[p] for p in heads], record.features[deepest])
            out[f"{student}/hint"] = self.hint_weight * per_image.mean()
        return out

    def __repr__(self) -> str:
        return f"SelfDistillation(alpha={self.alpha}, temperature={self.temperature}, hint_weight={self.hint_weight})"
