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


# ---------------------------------------------------------------------------- KDCL


def test_kdcl_minlogit_is_zero_at_the_target_and_takes_each_class_minimum():
    from collab_distill.plugins.kdcl import minlogit_logits

    z = torch.tensor([[[3.0, 1.0, -2.0], [0.0, 2.0, 1.0]],
                      [[1.0, 2.0, 0.0], [1.0, 0.5, 4.0]]])  # [students, images, classes]
    y = torch.tensor([0, 2])
    fused = minlogit_logits(z, y)
    assert torch.equal(fused[torch.arange(2), y], torch.zeros(2))
    # image 0, shifted: s0 [0, -2, -5], s1 [0, 1, -1] -> [0, -2, -5]; image 1: s0 [-1, 1, 0], s1 [-3, -3.5, 0]
    assert torch.allclose(fused, torch.tensor([[0.0, -2.0, -5.0], [-3.0, -3.5, 0.0]]))
    # its CE is at most that of every student (each non-target logit is the smallest, relative to the target)
    ce = F.cross_entropy(fused, y, reduction="none")
    for s in range(2):
        assert torch.all(ce <= F.cross_entropy(z[s], y, reduction="none") + 1e-6)


def test_kdcl_naive_picks_the_lowest_ce_student_per_image():
    from collab_distill.plugins.kdcl import naive_logits

    z = torch.tensor([[[3.0, 0.0], [3.0, 0.0]], [[0.0, 3.0], [0.0, 3.0]]])
    y = torch.tensor([0, 1])
    assert torch.equal(naive_logits(z, y), torch.tensor([[3.0, 0.0], [0.0, 3.0]]))


def test_kdcl_linear_weights_are_on_the_simplex_and_beat_every_single_student():
    from collab_distill.plugins.kdcl import linear_weights

    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        z = torch.randn(3, 40, 5, generator=g) * (1 + trial)
        y = torch.randint(0, 5, (40,), generator=g)
        w = linear_weights(z, y)
        assert w.shape == (3,) and torch.all(w >= 0) and abs(float(w.sum()) - 1) < 1e-5
        combined = F.cross_entropy(torch.einsum("s,suk->uk", w, z), y)
        singles = torch.stack([F.cross_entropy(zs, y) for zs in z])
        assert combined <= singles.min() + 1e-6
    # two students: agrees with a fine grid search over the segment
    z = torch.randn(2, 60, 4, generator=g) * 2
    y = torch.randint(0, 4, (60,), generator=g)
    w = linear_weights(z, y, iterations=100)
    grid = torch.linspace(0, 1, 2001)
    losses = torch.stack([F.cross_entropy(a * z[0] + (1 - a) * z[1], y) for a in grid])
    assert float(F.cross_entropy(w[0] * z[0] + w[1] * z[1], y)) <= float(losses.min()) + 1e-4


def test_kdcl_general_weights_match_eq_11_and_stay_on_the_simplex():
    from collab_distill.plugins.kdcl import error_matrix, general_weights

    c = torch.tensor([[0.20, 0.05, 0.02], [0.05, 0.10, 0.03], [0.02, 0.03, 0.30]])
    inv = torch.linalg.inv(c.double())
    expected = inv.sum(dim=1) / inv.sum()
    w = general_weights(c)
    assert torch.all(expected > 0)  # a matrix where eq. 11 is already feasible
    assert torch.allclose(w.double(), expected, atol=1e-6)
    # the weights minimise w^T C w on the hyperplane: any feasible perturbation does worse
    for d in (torch.tensor([1.0, -1.0, 0.0]), torch.tensor([0.0, 1.0, -1.0])):
        assert (w + 0.01 * d) @ c @ (w + 0.01 * d) > w @ c @ w
    # a matrix where eq. 11 gives a negative weight: nonnegative keeps the simplex, and is optimal there
    c = torch.tensor([[0.10, 0.12], [0.12, 0.30]])  # w2 of eq. 11 is proportional to c11 - c12 < 0
    raw = general_weights(c, nonnegative=False)
    assert raw.min() < 0 and abs(float(raw.sum()) - 1) < 1e-6
    w = general_weights(c)
    assert torch.all(w >= 0) and abs(float(w.sum()) - 1) < 1e-6
    grid = torch.linspace(0, 1, 1001)
    best = min(float(torch.stack([a, 1 - a]) @ c @ torch.stack([a, 1 - a])) for a in grid)
    assert float(w @ c @ w) <= best + 1e-6
    # eq. 10 with t = 1: errors of the true-class probabilities
    f = torch.tensor([[0.9, 0.5], [0.7, 1.0]])
    assert torch.allclose(error_matrix(f), torch.tensor([[0.13, 0.015], [0.015, 0.045]], dtype=torch.float64))


def test_kdcl_plugin_gives_every_student_the_same_detached_target():
    from types import SimpleNamespace

    from collab_distill.plugins.kdcl import KDCL

    recs = records([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    engine = SimpleNamespace(cohort=SimpleNamespace(students={"s0": None, "s1": None}))
    for variant in ("naive", "linear", "minlogit", "general"):
        plugin = KDCL(variant)
        plugin.collab_distill_configure(engine)
        targets = plugin.collab_distill_consensus_targets(recs, temperature=2.0)
        assert targets["s0"] is targets["s1"]
        assert not targets["s0"].probs.requires_grad
        assert torch.allclose(targets["s0"].probs.sum(-1), torch.ones(2))
    # general starts with equal weights: the mean of the distributions
    mean = (F.softmax(recs["s0"].logits.detach() / 2, -1) + F.softmax(recs["s1"].logits.detach() / 2, -1)) / 2
    assert torch.allclose(targets["s0"].probs, mean)


# ---------------------------------------------------------------------------- RMC


def test_rmc_keeps_the_teacher_where_students_agree_and_flattens_where_they_disagree():
    from collab_distill.plugins.rmc import RMC, disagreement

    labels = torch.tensor([0, 1])
    # image 0: both students give the true class the same probability; image 1: one is sure, one is not
    s0 = torch.tensor([[2.0, 0.0], [-8.0, 8.0]])
    s1 = torch.tensor([[2.0, 0.0], [8.0, -8.0]])
    u = disagreement(torch.stack([s0, s1]), labels)
    assert float(u[0]) == 0.0 and float(u[1]) > 0.99
    recs = {"a": Knowledge.for_images(s0, labels), "b": Knowledge.for_images(s1, labels)}
    teacher = {"t": Knowledge.for_images(torch.tensor([[3.0, -1.0], [-1.0, 3.0]]), labels)}
    target = RMC().collab_distill_soft_targets(recs, teacher, temperature=2.0)["a"]
    p = F.softmax(teacher["t"].logits / 2.0, -1)
    assert torch.allclose(target.probs[0], p[0])  # agreement: the teacher's target as it is
    assert torch.allclose(target.probs[1], torch.full((2,), 0.5), atol=1e-2)  # full disagreement: ~uniform
    # in between, the true class keeps the top but with less confidence
    mid = RMC(strength=0.5).collab_distill_soft_targets(recs, teacher, temperature=2.0)["a"].probs[1]
    assert 0.5 < float(mid[1]) < float(p[1, 1])
