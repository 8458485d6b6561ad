"""Collaboration rules of the seed methods on hand-made logits."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from collab_distill.plugins.dml import DML, peer_mean_targets, per_peer_targets
from collab_distill.records import Knowledge, TargetSet


def records(*logits):
    labels = torch.tensor([0, 1])
    return {f"s{i}": Knowledge.for_images(torch.tensor(x, requires_grad=True), labels) for i, x in enumerate(logits)}


def test_dml_default_is_the_papers_mean_of_one_kl_per_peer_and_peers_mean_is_an_option():
    recs = records([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]], [[-1.0, 2.0, 0.0], [0.5, 0.0, 0.0]])
    p = {k: F.softmax(r.logits.detach() / 2.0, dim=-1) for k, r in recs.items()}
    student = recs["s0"].logits

    def kl(target, logits):  # KL(target || softmax(logits / 2)) per image, by hand
        return (target * (target.log() - F.log_softmax(logits / 2.0, -1))).sum(-1)

    # default (target: per_peer): the mean over the peers of one KL per peer, the paper's loss
    default = DML().collab_distill_consensus_targets(recs, temperature=2.0)
    assert DML().target == "per_peer"
    assert isinstance(default["s0"], TargetSet)
    expected = (kl(p["s1"], student) + kl(p["s2"], student)) / 2
    assert torch.allclose(default["s0"].kl_per_unit(student, 2.0), expected, atol=1e-6)
    # golden numbers of that form (image 0, image 1; computed independently with math.exp/log)
    assert torch.allclose(default["s0"].kl_per_unit(student, 2.0).detach(), torch.tensor([0.6789, 0.0400]), atol=1e-4)
    assert torch.allclose(default["s2"].kl_per_unit(recs["s2"].logits, 2.0),
                          (kl(p["s0"], recs["s2"].logits) + kl(p["s1"], recs["s2"].logits)) / 2, atol=1e-6)
    assert all(not m.requires_grad for m in default["s0"].members)
    assert torch.equal(per_peer_targets(recs, 2.0)["s1"].probs, default["s1"].probs)

    # target: peers_mean: the KL to the peers' mean distribution
    targets = DML(target="peers_mean").collab_distill_consensus_targets(recs, temperature=2.0)
    assert torch.allclose(targets["s0"].probs, (p["s1"] + p["s2"]) / 2)
    assert torch.allclose(targets["s2"].probs, (p["s0"] + p["s1"]) / 2)
    assert not targets["s0"].probs.requires_grad
    assert torch.allclose(targets["s0"].kl_per_unit(student, 2.0), kl((p["s1"] + p["s2"]) / 2, student), atol=1e-6)
    assert torch.allclose(targets["s0"].kl_per_unit(student, 2.0).detach(), torch.tensor([0.5416, 0.0381]), atol=1e-4)
    # the two forms differ for three students; the per-peer mean is the larger (convexity of KL)
    assert torch.all(default["s0"].kl_per_unit(student, 2.0) >= targets["s0"].kl_per_unit(student, 2.0) - 1e-6)
    assert not torch.allclose(default["s0"].kl_per_unit(student, 2.0), targets["s0"].kl_per_unit(student, 2.0), atol=1e-3)
    # with two students both forms are the other's prediction
    pair = dict(list(recs.items())[:2])
    two = peer_mean_targets(pair, temperature=1.0)
    assert torch.allclose(two["s0"].probs, F.softmax(recs["s1"].logits.detach(), -1))
    two_default = DML().collab_distill_consensus_targets(pair, temperature=1.0)
    assert torch.allclose(two_default["s0"].kl_per_unit(student, 1.0), two["s0"].kl_per_unit(student, 1.0), atol=1e-6)


def test_dml_rejects_an_unknown_target():
    from collab_distill.task import ConfigError

    with pytest.raises(ConfigError, match="DML.target"):
        DML(target="mean")


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


def test_kdcl_linear_batch_scope_weights_are_on_the_simplex_and_beat_every_single_student():
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


def _simplex_grid(num_students: int, n: int) -> torch.Tensor:
    """Every point of the simplex whose coordinates are multiples of 1/n, ``[P, S]``."""
    head = [c for c in itertools.product(range(n + 1), repeat=num_students - 1) if sum(c) <= n]
    return torch.tensor([[*c, n - sum(c)] for c in head], dtype=torch.float32) / n


def test_kdcl_linear_per_image_matches_a_brute_force_grid_search_per_image():
    from collab_distill.plugins.kdcl import linear_weights, linear_weights_per_image

    g = torch.Generator().manual_seed(0)
    for num_students, n in ((2, 2000), (3, 150)):
        grid = _simplex_grid(num_students, n)
        assert torch.allclose(grid.sum(1), torch.ones(len(grid)))
        assert len(grid) == (n + 1 if num_students == 2 else (n + 1) * (n + 2) // 2)
        for trial in range(4):
            z = torch.randn(num_students, 24, 5, generator=g) * (1 + 2 * trial)
            y = torch.randint(0, 5, (24,), generator=g)
            w = linear_weights_per_image(z, y)
            assert w.shape == (24, num_students) and torch.all(w >= 0)
            assert torch.allclose(w.sum(1), torch.ones(24), atol=1e-5)
            ce = F.cross_entropy(torch.einsum("us,suk->uk", w, z), y, reduction="none")
            # never worse than the best single student, image by image
            singles = torch.stack([F.cross_entropy(zs, y, reduction="none") for zs in z])
            assert torch.all(ce <= singles.min(0).values)
            # the brute-force optimum of every image over the grid
            log_p = F.log_softmax(torch.einsum("ps,suk->puk", grid, z), dim=-1)
            grid_ce = -log_p.gather(-1, y[None, :, None].expand(len(grid), -1, 1)).squeeze(-1)  # [P, U]
            brute = grid_ce.min(dim=0).values
            assert torch.all(ce <= brute + 1e-5), (num_students, trial, (ce - brute).max())
            # per image can only do better than one weight vector for the batch, and does here
            wb = linear_weights(z, y)
            batch_ce = F.cross_entropy(torch.einsum("s,suk->uk", wb, z), y, reduction="none")
            assert torch.all(ce <= batch_ce + 1e-5) and ce.mean() < batch_ce.mean() - 1e-3
    # unlabelled units (-1) have no objective: equal weights; labelled ones are unaffected by them
    z = torch.randn(3, 6, 4, generator=g) * 3
    y = torch.tensor([0, -1, 2, 3, -1, 1])
    w = linear_weights_per_image(z, y)
    assert torch.allclose(w[y < 0], torch.full((2, 3), 1 / 3))
    assert torch.allclose(w[y >= 0], linear_weights_per_image(z[:, y >= 0], y[y >= 0]), atol=1e-6)


def test_kdcl_linear_defaults_to_the_per_image_solve_and_batch_is_an_option():
    from types import SimpleNamespace

    from collab_distill.plugins.kdcl import KDCL, linear_weights, linear_weights_per_image
    from collab_distill.task import ConfigError

    assert KDCL("linear").linear_scope == "image"
    # image 0: s0 is right, s1 wrong; image 1: the other way round. One weight vector for the
    # batch must compromise; per image each image takes its right student.
    recs = records([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0]], [[0.0, 4.0, 0.0], [0.0, 4.0, 0.0]])
    engine = SimpleNamespace(cohort=SimpleNamespace(students={"s0": None, "s1": None}))
    logits = torch.stack([r.logits.detach() for r in recs.values()])
    labels = torch.tensor([0, 1])
    per_image = KDCL("linear")
    per_image.collab_distill_configure(engine)
    target = per_image.collab_distill_consensus_targets(recs, temperature=2.0)["s0"]
    w = linear_weights_per_image(logits, labels)
    assert torch.allclose(w, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(target.probs, F.softmax(torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]) / 2.0, -1))
    batch = KDCL("linear", linear_scope="batch")
    batch.collab_distill_configure(engine)
    target = batch.collab_distill_consensus_targets(recs, temperature=2.0)["s0"]
    wb = linear_weights(logits, labels)
    assert torch.allclose(wb, torch.tensor([0.5, 0.5]), atol=1e-3)  # symmetric problem: the midpoint
    assert torch.allclose(target.probs, F.softmax(torch.tensor([[2.0, 2.0, 0.0]]).expand(2, 3) / 2.0, -1), atol=1e-3)
    # detection regions without a label have no per-unit objective: no consensus term for them
    # (as naive/minlogit); one batch vector still covers every unit
    regions = {n: Knowledge(torch.zeros(1), r.logits.detach(), torch.zeros(2, dtype=torch.long), torch.tensor([0, -1]), 1)
               for n, r in recs.items()}
    weight = per_image.collab_distill_consensus_targets(regions, temperature=2.0)["s0"].weight
    assert torch.equal(weight, torch.tensor([1.0, 0.0]))
    assert batch.collab_distill_consensus_targets(regions, temperature=2.0)["s0"].weight is None
    with pytest.raises(ConfigError, match="linear_scope"):
        KDCL("linear", linear_scope="images")


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
