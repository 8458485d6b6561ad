"""Named per-image loss terms (``collab_distill_declare_loss_terms`` / ``collab_distill_loss_terms``):
declared by a plugin, weighed per image by the loss-weight provider like the built-in terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from collab_distill import ConfigError, LossWeights, Plugin, hookimpl
from collab_distill.meta import BilevelConfig
from collab_distill.plugins.dkd import DKD
from collab_distill.plugins.fixed_weights import FixedLossWeights
from collab_distill.plugins.mc_distil import CNet
from test_engine import make_engine, ready, records_of


class LogitSquares(Plugin):
    """Declares ``logit_sq``: each image's mean squared logit (a stand-in for any per-image term)."""

    def __init__(self, name="logit_sq", shape_fault=False, student_fault=False, declared=None):
        self.name, self.shape_fault, self.student_fault = name, shape_fault, student_fault
        self.declared = declared or name

    @hookimpl
    def collab_distill_declare_loss_terms(self):
        return [self.declared]

    @hookimpl
    def collab_distill_loss_terms(self, records, weights):
        out = {}
        for student, rec in records.items():
            values = rec.logits.pow(2).mean(dim=1)
            out["nobody" if self.student_fault else student] = {self.name: values[:3] if self.shape_fault else values}
        return out


class PerImageProvider(Plugin):
    """alpha 1 for every image and a per-image weight of ``logit_sq`` (0, 1, 2, 0, 1, 2, ...)."""

    @hookimpl
    def collab_distill_loss_weights(self, records):
        out = {}
        for student, rec in records.items():
            n, device = rec.num_images, rec.logits.device
            w = LossWeights.constant_weights(n, 1.0, 0.0, 0.0, device)
            out[student] = LossWeights(w.alpha, w.beta, w.gamma, terms={"logit_sq": torch.arange(n, device=device) % 3 * 1.0})
        return out


def _ce(r, batch):
    return F.cross_entropy(r.logits, batch["targets"], reduction="none")


def test_a_declared_term_is_weighed_by_the_fixed_weights_and_logged(tmp_path):
    engine = make_engine(tmp_path, None, [FixedLossWeights(1.0, terms={"logit_sq": 0.5}), LogitSquares()])
    batch = ready(engine)
    assert engine.loss_terms == ["logit_sq"]
    students, teachers = records_of(engine, batch)
    loss, logs = engine.cohort_loss(batch, students, teachers)
    expected = sum((_ce(r, batch) + 0.5 * r.logits.pow(2).mean(1)).mean() for r in students.values())
    torch.testing.assert_close(loss, expected)
    for s, r in students.items():
        torch.testing.assert_close(logs[f"{s}/logit_sq"], 0.5 * r.logits.pow(2).mean(1).mean().detach())


def test_a_provider_weighs_a_named_term_per_image(tmp_path):
    engine = make_engine(tmp_path, None, [PerImageProvider(), LogitSquares()])
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    loss, _ = engine.cohort_loss(batch, students, teachers)
    n = batch["targets"].shape[0]
    w = torch.arange(n) % 3 * 1.0
    expected = sum((_ce(r, batch) + w * r.logits.pow(2).mean(1)).mean() for r in students.values())
    torch.testing.assert_close(loss, expected)


def test_students_in_warm_up_and_zero_weights_skip_the_term(tmp_path):
    engine = make_engine(tmp_path, None, [FixedLossWeights(1.0, terms={"logit_sq": 0.5}), LogitSquares()],
                         warmup_epochs={"xxs": 1})
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    _, logs = engine.cohort_loss(batch, students, teachers)
    assert "xxs/logit_sq" not in logs and "xs/logit_sq" in logs
    off = make_engine(tmp_path, None, [FixedLossWeights(1.0, terms={"logit_sq": 0.0}), LogitSquares()])
    batch = ready(off)
    students, teachers = records_of(off, batch)
    loss, logs = off.cohort_loss(batch, students, teachers)
    assert not any(k.endswith("/logit_sq") for k in logs)
    torch.testing.assert_close(loss, sum(_ce(r, batch).mean() for r in students.values()))


@pytest.mark.parametrize("plugins, match", [
    ([LogitSquares(shape_fault=True)], r"term 'logit_sq' of 'xxs' is shape \(3,\).*expected one float per image"),
    ([LogitSquares(student_fault=True)], r"returned terms \['logit_sq'\] for 'nobody', which is not a student"),
    ([LogitSquares(declared="other")], r"returned 'logit_sq' for 'xxs', a term no plugin declared"),
    ([FixedLossWeights(1.0, terms={"hint": 1.0})], r"weighs term\(s\) \['hint'\] of 'xxs', which no plugin declares"),
])
def test_wrong_terms_are_one_error_naming_the_term(tmp_path, plugins, match):
    engine = make_engine(tmp_path, None, plugins)
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    with pytest.raises(ConfigError, match=match):
        engine.cohort_loss(batch, students, teachers)


@pytest.mark.parametrize("names, match", [(["distill"], "not a valid term name"), (["a b"], "not a valid term name")])
def test_term_names_are_checked_at_build(tmp_path, names, match):
    with pytest.raises(ConfigError, match=match):
        make_engine(tmp_path, None, [LogitSquares(name=names[0])]).build()
    with pytest.raises(ConfigError, match="two plugins declare a loss term named 'x'"):
        make_engine(tmp_path, None, [LogitSquares(name="x"), LogitSquares(name="x")]).build()


def test_dkd_as_terms_is_dkd_as_a_kl_pose(tmp_path, teacher_file):
    """DKD's TCKD and NCKD as two named terms give the same loss as its one KL-posing target."""
    posing = make_engine(tmp_path, teacher_file, [FixedLossWeights(1.0, 1.0), DKD(alpha=1.0, beta=8.0)], temperature=4.0)
    terms = make_engine(tmp_path, teacher_file, [FixedLossWeights(1.0, 0.0), DKD(alpha=1.0, beta=8.0, as_terms=True)],
                        temperature=4.0)
    losses = []
    for engine in (posing, terms):
        batch = ready(engine)
        students, teachers = records_of(engine, batch)
        losses.append(engine.cohort_loss(batch, students, teachers))
    torch.testing.assert_close(losses[0][0], losses[1][0])
    assert "xxs/tckd" in losses[1][1] and "xxs/nckd" in losses[1][1] and "xxs/distill" not in losses[1][1]


def test_a_cnet_learns_per_image_weights_of_named_terms(tmp_path, teacher_file):
    """CNet(terms=...) sizes its head for the named terms and the meta step reaches their weights."""
    cnet = CNet(use_image=False, use_losses=True, terms={"tckd": 0.2, "nckd": 0.2}, mix=(0.5, 0.0, 0.0), gamma=False)
    engine = make_engine(tmp_path, teacher_file, [cnet, DKD(as_terms=True)], meta=BilevelConfig(every_n_steps=1))
    batch = ready(engine)
    head = engine.meta_modules["cnet"]["shared"].head[-1]
    assert head.out_features == 5 * 2  # alpha, beta, gamma, tckd, nckd for two students
    teachers = engine.teacher_records(batch)
    params, grads, _ = engine.bilevel.gradients(engine.fabric, batch, teachers, None)
    by_param = dict(zip(map(id, params), grads))
    g = by_param[id(head.weight)].view(2, 5, -1)  # [students, outputs, inputs]
    assert g[:, 3:].abs().sum() > 0, "the meta-gradient reaches the named terms' weights"
    students, _ = records_of(engine, batch)
    weights = engine.hook.collab_distill_loss_weights(engine=engine, batch=batch, records=students,
                                                      teacher_records=teachers, phase="train")
    assert set(weights["xxs"].terms) == {"tckd", "nckd"} and weights["xxs"].terms["tckd"].shape == (batch["targets"].shape[0],)
