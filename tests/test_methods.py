"""Collaboration rules of the seed methods on hand-made logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from collab_distill.plugins.dml import DML, peer_mean_targets
from collab_distill.records import Knowledge


def records(*logits):
    labels = torch.tensor([0, 1])
    return {f"s{i}": Knowledge.for_images(torch.tensor(x, requires_grad=True), labels) for i, x in enumerate(logits)}


def test_dml_target_is_the_mean_of_the_peers_predictions_detached():
    recs = records([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]], [[-1.0, 2.0, 0.0], [0.5, 0.0, 0.0]])
    targets = peer_mean_targets(recs, temperature=2.0)
    p = {k: F.softmax(r.logits.detach() / 2.0, dim=-1) for k, r in recs.items()}
    assert torch.allclose(targets["s0"].probs, (p["s1"] + p["s2"]) / 2)
    assert torch.allclose(targets["s2"].probs, (p["s0"] + p["s1"]) / 2)
    assert not targets["s0"].probs.requires_grad
    # per_peer: the mean of one KL per peer, the paper's form (>= the KL to the peers' mean, by convexity)
    pairwise = DML(per_peer=True).collab_distill_consensus_targets(recs, temperature=2.0)
    student = recs["s0"].logits
    expected = torch.stack([F.kl_div(F.log_softmax(student / 2.0, -1), p[o], reduction="none").sum(-1) for o in ("s1", "s2")]).mean(0)
    assert torch.allclose(pairwise["s0"].kl_per_unit(student, 2.0), expected, atol=1e-6)
    assert torch.all(pairwise["s0"].kl_per_unit(student, 2.0) >= targets["s0"].kl_per_unit(student, 2.0) - 1e-6)
    # with two students each one's target is the other's prediction
    two = peer_mean_targets(dict(list(recs.items())[:2]), temperature=1.0)
    assert torch.allclose(two["s0"].probs, F.softmax(recs["s1"].logits.detach(), -1))


def test_dml_needs_two_students():
    from types import SimpleNamespace

    from collab_distill.task import ConfigError

    with pytest.raises(ConfigError, match="at least two students"):
        DML().collab_distill_configure(SimpleNamespace(cohort=SimpleNamespace(students={"only": None})))
