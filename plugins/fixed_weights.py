"""Fixed loss mixing: the CE and KD baselines (and any constant alpha/beta/gamma)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

from collab_distill.engine_view import EngineView
from collab_distill.hookspecs import hookimpl
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, LossWeights
from collab_distill.task import ConfigError

__all__ = ["FixedLossWeights"]


class FixedLossWeights(Plugin):
    """The same alpha, beta, gamma for every image (optionally per student).

    CE is ``alpha=1, beta=0``; Hinton's KD is ``alpha=1-lambda, beta=lambda`` with the
    engine's temperature tau (the KL term is already scaled by tau^2).

    Args:
        alpha: weight of the supervised loss.
        beta: weight of the distillation term (soft target, e.g. the teacher).
        gamma: weight of the consensus term (needs a consensus plugin).
        per_student: ``{student: [alpha, beta, gamma]}`` overrides for some students.
        terms: ``{name: weight}`` of per-image terms other plugins declare
            (``collab_distill_declare_loss_terms``, e.g. ``DKD(as_terms: true)``'s ``tckd`` and
            ``nckd``); a declared term not named here weighs 1.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.0,
        gamma: float = 0.0,
        per_student: Optional[dict[str, tuple[float, float, float]]] = None,
        terms: Optional[dict[str, float]] = None,
    ) -> None:
        for key, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not value >= 0:  # also refuses NaN
                raise ConfigError(
                    f"FixedLossWeights.{key}={value} must be >= 0: it scales a loss term (0 switches the term off)"
                )
        self.terms = {k: float(v) for k, v in (terms or {}).items()}
        for name, value in self.terms.items():
            if not value >= 0:
                raise ConfigError(f"FixedLossWeights.terms.{name}={value} must be >= 0 (0 switches the term off)")
        self.default = (alpha, beta, gamma)
        self.per_student = {k: tuple(v) for k, v in (per_student or {}).items()}
        for name, weights in self.per_student.items():
            if len(weights) != 3 or not all(w >= 0 for w in weights):
                raise ConfigError(
                    f"FixedLossWeights.per_student.{name}={list(weights)} must be [alpha, beta, gamma], each >= 0"
                )

    @hookimpl
    def collab_distill_configure(self, engine: EngineView) -> None:
        unknown = set(self.per_student) - set(engine.cohort.students)
        if unknown:
            raise ConfigError(f"FixedLossWeights.per_student names {sorted(unknown)}, not students of the cohort")
        if any(w[1] > 0 for w in [self.default, *self.per_student.values()]) and not engine.cohort.teachers:
            # without teachers the default soft target is empty: beta would silently do nothing
            providers = engine.hook_implementers("collab_distill_soft_targets")
            if not any(p is not self and not _is_default(p) for p in providers):
                raise ConfigError(
                    "FixedLossWeights.beta > 0 but the cohort has no teacher and no plugin provides soft "
                    "targets: add `cohort.teachers` or a soft-target plugin, or set beta: 0"
                )

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        out = {}
        for name, rec in records.items():
            a, b, g = self.per_student.get(name, self.default)
            out[name] = LossWeights.constant_weights(rec.num_images, a, b, g, rec.logits.device)
            out[name].terms = dict(self.terms)
        return out

    def __repr__(self) -> str:
        a, b, g = self.default
        return f"FixedLossWeights(alpha={a}, beta={b}, gamma={g})"


def _is_default(plugin: object) -> bool:
    return getattr(plugin, "__name__", "") == "collab_distill.plugins.defaults"
