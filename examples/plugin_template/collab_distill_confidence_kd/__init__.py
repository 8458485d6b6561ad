"""Confidence-weighted KD: a per-image loss weighting written against collab-distill's public API.

Image ``i`` of student ``s`` gets ``beta_i = strength * p_t(y_i)`` (the teachers' mean probability
of the true label, at temperature 1) and ``alpha_i = 1 - beta_i``: where the teacher is wrong the
student learns from the label, where it is sure and right it learns from the teacher.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from collab_distill import ConfigError, EngineView, Knowledge, LossWeights, Plugin, hookimpl, mean_of_teachers

__all__ = ["ConfidenceKD", "confidence_weights"]


def confidence_weights(teacher_probs: torch.Tensor, labels: torch.Tensor, strength: float) -> torch.Tensor:
    """``[B, 2]``: alpha and beta of every image from the teachers' probabilities ``[B, K]``."""
    correct = teacher_probs.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    beta = strength * torch.where(labels >= 0, correct, torch.zeros_like(correct))
    return torch.stack([1.0 - beta, beta], dim=1)


class ConfidenceKD(Plugin):
    """Loss weights from the teacher's confidence in the true label.

    Args:
        strength: the largest beta (reached where the teacher gives the true label probability 1).
    """

    def __init__(self, strength: float = 0.7) -> None:
        if not 0.0 <= strength <= 1.0:
            raise ConfigError(f"ConfidenceKD.strength={strength} must be in [0, 1]")
        self.strength = strength

    @hookimpl
    def collab_distill_configure(self, engine: EngineView) -> None:
        if not engine.cohort.teachers:
            raise ConfigError("ConfidenceKD needs a teacher: add one under cohort.teachers")

    @hookimpl
    def collab_distill_loss_weights(
        self, engine: EngineView, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge]
    ) -> dict[str, LossWeights]:
        out = {}
        for name, record in records.items():
            probs = mean_of_teachers(teacher_records, 1.0)
            # one weight per image: average the units of an image (a unit is an image in classification)
            weights = confidence_weights(probs, record.unit_labels, self.strength)
            alpha, beta = record.per_image(weights[:, 0]), record.per_image(weights[:, 1])
            out[name] = LossWeights(alpha, beta, torch.zeros_like(alpha))
        return out

    def __repr__(self) -> str:
        return f"ConfidenceKD(strength={self.strength})"
