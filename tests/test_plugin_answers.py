"""What plugins answer is checked, and what the engine hands them back (issue 22): per-term
constant loss weights, the loss weights the meta objective sees, answers the engine cannot use
named with their plugin and hook, and a NaN from a plugin's weights blamed on that plugin."""

from __future__ import annotations

import pytest
import torch

from collab_distill import LossWeights, Plugin, hookimpl
from collab_distill.meta import BilevelConfig
from collab_distill.plugins.mc_distil import CNet
from support_plugins import ConstantConsensus
from test_engine import make_engine, ready, records_of


class PerImageMix(Plugin):
    """A per-image alpha and beta (a ramp over the batch), gamma 0, with ``constant`` as given."""

    def __init__(self, constant=None) -> None:
        self.constant = constant

    @hookimpl
    def collab_distill_loss_weights(self, records):
        out = {}
        for student, rec in records.items():
            n, device = rec.num_images, rec.logits.device
            alpha, beta = torch.linspace(0.5, 1.0, n, device=device), torch.linspace(1.0, 0.2, n, device=device)
            out[student] = LossWeights(alpha, beta, torch.zeros(n, device=device), constant=self.constant)
        return out


class CountingConsensus(ConstantConsensus):
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def collab_distill_consensus_targets(self, records, temperature):
        self.calls += 1
        return super().collab_distill_consensus_targets(records, temperature)


# ---------------------------------------------------------------------------- 4. constant per term


def test_a_constant_zero_gamma_beside_per_image_alpha_and_beta_skips_the_consensus(tmp_path, teacher_file):
    skipping, counting = PerImageMix(constant=(None, None, 0.0)), CountingConsensus()
    engine = make_engine(tmp_path, teacher_file, [skipping, counting])
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    loss, logs = engine.cohort_loss(batch, students, teachers)
    assert counting.calls == 0 and "xxs/consensus" not in logs
    assert "xxs/distill" in logs and logs["xxs/gamma"] == 0.0

    per_image, computing = PerImageMix(constant=None), CountingConsensus()
    other = make_engine(tmp_path, teacher_file, [per_image, computing])
    ready(other)
    base, base_logs = other.cohort_loss(batch, students, teachers)
    assert computing.calls == 1 and "xxs/consensus" in base_logs
    torch.testing.assert_close(loss, base)
    for key in ("xxs/alpha", "xs/beta", "xs/distill", "xs/supervised"):
        torch.testing.assert_close(torch.as_tensor(logs[key]), torch.as_tensor(base_logs[key]))


def test_constant_entries_are_numbers_or_none():
    n = 4
    ramp = torch.linspace(0.0, 1.0, n)
    w = LossWeights(ramp, ramp, torch.zeros(n), constant=(None, 0.5, 0))
    assert [w.uses(t) for t in LossWeights.TERMS] == [True, True, False]
    alpha, beta, gamma = w.factors()
    assert alpha is ramp and beta == 0.5 and gamma == 0.0 and isinstance(gamma, float)  # the number wins over the tensor
    every = LossWeights.constant_weights(n, 0.3, 0.0, 0.2)
    assert every.factors() == (0.3, 0.0, 0.2) and [every.uses(t) for t in LossWeights.TERMS] == [True, False, True]
    assert LossWeights(ramp, ramp, ramp).factors() == (ramp, ramp, ramp)


# ---------------------------------------------------------------------------- 3. the meta objective sees the weights


class BetaPenalty(Plugin):
    """A custom meta objective, the worked example of ``collab_distill_meta_objective``: the
    looked-ahead students' cross-entropy on the meta batch plus ``lam`` times the batch mean of
    every student's beta, the weights the lookahead trained with (they keep the C-Net's graph), so
    the C-Net learns to lean on the labels unless distilling pays off on the meta batch."""

    def __init__(self, lam: float = 1.0) -> None:
        self.lam = lam
        self.seen: list[dict[str, LossWeights]] = []

    @hookimpl
    def collab_distill_meta_objective(self, records, weights):
        self.seen.append(dict(weights))
        ce = sum(rec.supervised_loss.mean() for rec in records.values())
        return ce + self.lam * sum(w.beta.mean() for w in weights.values())


@pytest.mark.parametrize("mode", ["second_order", "finite_difference"])
def test_the_meta_gradient_of_a_penalty_on_the_weights_reaches_the_cnet(tmp_path, teacher_file, mode):
    cnet = CNet(use_image=False, use_losses=True, hidden=8, mix=(0.3, 0.7, 0.0), gamma=False)
    objective = BetaPenalty(lam=1.0)
    engine = make_engine(tmp_path, teacher_file, [cnet, objective], meta=BilevelConfig(every_n_steps=1, hypergradient=mode))
    batch = ready(engine)
    meta_batch = engine.task.move_batch(next(iter(engine.loaders["meta"][0])), engine.fabric)
    teachers = engine.teacher_records(batch)
    params, with_penalty, _ = engine.bilevel.gradients(engine.fabric, batch, teachers, None, meta_batch=meta_batch)
    seen = objective.seen[-1]
    assert set(seen) == {"xxs", "xs"} and all(w.beta.requires_grad for w in seen.values())  # with the C-Net's graph
    assert seen["xs"].beta.shape == (batch["targets"].shape[0],)
    objective.lam = 0.0
    _, without, _ = engine.bilevel.gradients(engine.fabric, batch, teachers, None, meta_batch=meta_batch)

    # the penalty's own gradient, d/dphi lam * sum_s mean(beta_s), from the weights the lookahead used
    students, _ = records_of(engine, batch)
    weights = cnet.collab_distill_loss_weights(engine=engine, batch=batch, records=students, teacher_records=teachers)
    penalty = sum(w.beta.mean() for w in weights.values())
    expected = torch.autograd.grad(penalty, params, allow_unused=True)
    expected = [torch.zeros_like(p) if g is None else g for p, g in zip(params, expected)]
    assert sum(float(g.abs().sum()) for g in expected) > 0
    for a, b, e in zip(with_penalty, without, expected):
        torch.testing.assert_close(a - b, e, rtol=1e-4, atol=1e-6)
