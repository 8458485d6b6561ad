"""DKD (decoupled knowledge distillation): the per-unit term, its identities, the plugin and a CLI fit."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from collab_distill.plugins.dkd import DKD, DecoupledTarget, dkd_per_unit
from collab_distill.records import Knowledge, SoftTarget
from collab_distill.task import ConfigError
from conftest import REPO, digits_args
from test_cli import run_cli

# three units, four classes: literal numbers, independent of any seed
STUDENT = [[2.0, -1.0, 0.5, 0.0], [0.3, 1.2, -0.7, 2.5], [-1.5, 0.0, 3.0, 1.0]]
TEACHER = [[3.0, 0.5, -1.0, 1.0], [1.0, 2.0, 0.0, -0.5], [0.0, -2.0, 2.5, 1.5]]
LABELS = [0, 3, 2]

# dkd_per_unit in float64, computed once: {(T, alpha, beta): per-unit values}
GOLDEN = {
    (4.0, 1.0, 8.0): [0.394508320488, 0.0789596187, 0.426294562691],
    (1.0, 1.0, 8.0): [4.25822706172, 0.97219857431, 2.17784805251],
    (4.0, 1.0, 0.0): [0.00291750795928, 0.0783517625752, 0.00285669566912],  # TCKD
    (4.0, 0.0, 1.0): [0.0489488515661, 7.59820155999e-05, 0.0529297333777],  # NCKD
}


def plain_kl(student_logits, teacher_probs, temperature):
    """KL(teacher || softmax(student / tau)) per unit, in the inputs' precision."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    return (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_q).sum(dim=-1)


def inputs(dtype=torch.float64):
    return torch.tensor(STUDENT, dtype=dtype), torch.tensor(TEACHER, dtype=dtype), torch.tensor(LABELS)


def official_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's dkd_loss (mask formulation), per unit and without the T^2 factor."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(dim=1, keepdim=True), (t * mask2).sum(dim=1, keepdim=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="none").sum(dim=1)
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="none").sum(dim=1)
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("key", list(GOLDEN))
def test_dkd_matches_golden_values_and_the_official_mask_formulation(key):
    temperature, alpha, beta = key
    s, t, y = inputs()
    got = dkd_per_unit(s, F.softmax(t / temperature, dim=-1), y, temperature, alpha, beta)
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert got.tolist() == pytest.approx(GOLDEN[key], rel=1e-5)
    assert got.tolist() == pytest.approx(official_dkd(s, t, y, alpha, beta, temperature).tolist(), rel=1e-5)
    # the float32 path (what training uses) agrees to float32 accuracy: a KL of two close
    # distributions is a difference of O(1) entropies, so its error is absolute, about 1e-7
    s32, t32, _ = inputs(torch.float32)
    got32 = dkd_per_unit(s32, F.softmax(t32 / temperature, dim=-1), y, temperature, alpha, beta)
    assert got32.dtype == torch.float32
    assert got32.tolist() == pytest.approx(GOLDEN[key], rel=1e-4, abs=1e-6)


def test_tckd_plus_weighted_nckd_is_the_kl():
    """The paper's eq. 3: KD = TCKD + (1 - p_t^T) * NCKD; DKD with alpha = beta = 1 is not KD."""
    s, t, y = inputs()
    for temperature in (1.0, 4.0):
        p = F.softmax(t / temperature, dim=-1)
        kl = plain_kl(s, p, temperature)
        torch.testing.assert_close(kl.float(), SoftTarget(probs=p).kl_per_unit(s, temperature))
        tckd = dkd_per_unit(s, p, y, temperature, 1.0, 0.0)
        nckd = dkd_per_unit(s, p, y, temperature, 0.0, 1.0)
        p_t = p.gather(1, y.unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(tckd + (1 - p_t) * nckd, kl, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(dkd_per_unit(s, p, y, temperature, 1.0, 1.0), kl, rtol=1e-3)


def test_units_without_a_label_get_the_plain_kl():
    s, t, _ = inputs()
    p = F.softmax(t / 4.0, dim=-1)
    labels = torch.tensor([-1, 3, -1])
    student = s.clone().requires_grad_(True)
    got = dkd_per_unit(student, p, labels, 4.0, 1.0, 8.0)
    torch.testing.assert_close(got[[0, 2]], plain_kl(s, p, 4.0)[[0, 2]], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(got[[0, 2]].float(), SoftTarget(probs=p).kl_per_unit(s, 4.0)[[0, 2]])
    assert got[1].item() == pytest.approx(GOLDEN[(4.0, 1.0, 8.0)][1], rel=1e-10)
    got.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_extreme_logits_stay_finite():
    """A student or teacher sure of the target (1 - p_t underflows) gives a finite term and gradient."""
    student = torch.tensor([[60.0, -60.0, 0.0], [-80.0, 80.0, 0.0]], requires_grad=True)
    teacher = F.softmax(torch.tensor([[200.0, 0.0, -5.0], [0.0, 0.0, 300.0]]), dim=-1)
    out = dkd_per_unit(student, teacher, torch.tensor([0, 2]), 1.0, 1.0, 8.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(student.grad).all()


def test_the_weight_scales_the_term():
    s, t, y = inputs(torch.float32)
    p = F.softmax(t / 4.0, dim=-1)
    full = DecoupledTarget(p, y, 1.0, 8.0).kl_per_unit(s, 4.0)
    assert torch.equal(DecoupledTarget(p, y, 1.0, 8.0, weight=0.0).kl_per_unit(s, 4.0), torch.zeros(3))
    torch.testing.assert_close(DecoupledTarget(p, y, 1.0, 8.0, weight=torch.tensor(0.25)).kl_per_unit(s, 4.0), full / 4)
    per_unit = torch.tensor([1.0, 0.0, 2.0])
    torch.testing.assert_close(DecoupledTarget(p, y, 1.0, 8.0, weight=per_unit).kl_per_unit(s, 4.0), full * per_unit)


def test_plugin_ramps_in_and_averages_the_teachers():
    s, t, y = inputs(torch.float32)
    plugin = DKD(alpha=1.0, beta=8.0, warmup_epochs=4)
    assert [plugin.ramp(e) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert DKD().ramp(0) == 1.0
    records = {"s": Knowledge.for_images(s, y)}
    teachers = {"a": Knowledge.for_images(t, y), "b": Knowledge.for_images(-t, y)}
    targets = plugin.collab_distill_soft_targets(SimpleNamespace(epoch=1), records, teachers, 4.0)
    target = targets["s"]
    assert isinstance(target, DecoupledTarget) and target.weight.item() == 0.5
    mean = (F.softmax(t / 4.0, dim=-1) + F.softmax(-t / 4.0, dim=-1)) / 2
    torch.testing.assert_close(target.probs, mean)
    torch.testing.assert_close(target.kl_per_unit(s, 4.0), 0.5 * dkd_per_unit(s, mean, y, 4.0, 1.0, 8.0))
    assert plugin.collab_distill_soft_targets(SimpleNamespace(epoch=9), records, teachers, 4.0)["s"].weight is None
    assert plugin.collab_distill_soft_targets(SimpleNamespace(epoch=0), records, {}, 4.0) is None


@pytest.mark.parametrize(
    "kwargs, name",
    [({"beta": -1.0}, "DKD.beta"), ({"alpha": float("nan")}, "DKD.alpha"), ({"warmup_epochs": -2}, "DKD.warmup_epochs"),
     ({"alpha": 0.0, "beta": 0.0}, "both 0")],
)
def test_bad_arguments_are_config_errors(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        DKD(**kwargs)


def test_a_cohort_without_teachers_is_refused():
    engine = SimpleNamespace(teachers={}, cohort=SimpleNamespace(teachers={}))
    with pytest.raises(ConfigError, match="DKD needs a teacher"):
        DKD().collab_distill_configure(engine)
    DKD().collab_distill_configure(SimpleNamespace(teachers={"t": object()}, cohort=SimpleNamespace(teachers={"t": 1})))


@pytest.mark.slow
def test_dkd_method_file_composes_with_digits(tmp_path, cli_env):
    run_cli([*digits_args(tmp_path, "dkd", epochs=1), "--config", str(REPO / "examples" / "methods" / "dkd.yaml"),
             "--trainer.limit_train_batches", "3", "--trainer.log_every_n_steps", "1"], cli_env)
    run = tmp_path / "dkd" / "version_0"
    assert json.loads((run / "results.json").read_text())["status"] == "finished"
    config = (run / "config.yaml").read_text()
    assert "collab_distill.plugins.dkd.DKD" in config and "temperature: 4.0" in config
    with (run / "logs" / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    for student in ("xxs", "xs", "s"):
        values = [float(r[f"train/{student}/distill"]) for r in rows if r.get(f"train/{student}/distill")]
        assert values and all(math.isfinite(v) and v > 0 for v in values), student
