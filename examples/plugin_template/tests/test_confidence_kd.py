"""The template's tests: a golden value of the rule and a real tiny fit, public API only."""

from __future__ import annotations

import math

import pytest
import torch
from collab_distill_confidence_kd import ConfidenceKD, confidence_weights

from collab_distill import ConfigError
from collab_distill.testing import make_records, tiny_fit


def test_weights_golden_values():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    labels = torch.tensor([0, 0, -1])  # the third unit has no label: labels only
    weights = confidence_weights(probs, labels, strength=0.5)
    assert torch.allclose(weights, torch.tensor([[0.55, 0.45], [0.9, 0.1], [1.0, 0.0]]))


def test_hook_gives_every_student_per_image_weights():
    records = make_records(("a", "b"), num_images=4, num_classes=3)
    teachers = make_records(("teacher",), num_images=4, num_classes=3, seed=1, requires_grad=False)
    weights = ConfidenceKD(0.7).collab_distill_loss_weights(engine=None, records=records, teacher_records=teachers)
    assert set(weights) == {"a", "b"}
    assert torch.allclose(weights["a"].alpha + weights["a"].beta, torch.ones(4))
    assert 0 < float(weights["a"].beta.min()) < float(weights["a"].beta.max()) <= 0.7


def test_a_real_fit_uses_the_weights(tmp_path):
    run = tiny_fit([ConfidenceKD(0.7)], root_dir=tmp_path, steps=3)
    assert run.results["status"] == "stopped"  # 3 steps of a 1-epoch fit
    for step in run.losses:
        assert math.isfinite(step["loss"])
        assert 0 < step["xs/beta"] < 0.7 and step["xs/distill"] > 0  # the teacher term is on, per image


def test_bad_strength_is_one_clear_error():
    with pytest.raises(ConfigError, match="strength"):
        ConfidenceKD(1.5)
