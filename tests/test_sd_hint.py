"""Self-distillation's feature hint (BYOT): head bodies imitate the deepest feature map."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from collab_distill.features import FeatureCapture
from collab_distill.plugins.self_distillation import SelfDistillation, feature_hint_per_image
from collab_distill.task import ConfigError, TaskInfo
from collab_distill.tasks.classification import Digits, ImageClassification, MultiExit, ResNet, TorchvisionModel
from conftest import REPO, digits_args
from test_cli import run_cli

DIGITS = TaskInfo(num_classes=10, in_channels=1, image_size=(8, 8))


def _engine(students, warming=False, feature_shapes=None):
    return SimpleNamespace(
        students=students, trainer=SimpleNamespace(temperature=1.0), warming_up=lambda name: warming,
        feature_shapes=feature_shapes or {},
    )


def _captured_record(net, plugin, engine, name="a", image_size=(8, 8), seed=0):
    """A training record of ``net`` with the features the plugin requests, as the engine builds it."""
    requests = plugin.collab_distill_feature_requests(engine)
    capture = FeatureCapture({name: net}, requests)
    g = torch.Generator().manual_seed(seed)
    batch = {"inputs": torch.randn(4, 1, *image_size, generator=g), "targets": torch.tensor([0, 1, 2, 3])}
    features = list(dict.fromkeys(r.feature for r in requests))
    with capture.recording(name, features) as captured:
        record = ImageClassification(Digits()).knowledge(net, batch)
    record.features.update(captured)
    capture.remove()
    return record


# ---------------------------------------------------------------------------- the per-image term


def test_feature_hint_golden_values():
    deepest = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]], [[[0.5, 0.0]], [[2.0, 1.0]]]])  # [2, 2, 1, 2]
    f0 = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]], [[[0.5, 1.0]], [[0.0, 1.0]]]])
    f1 = torch.tensor([[[[1.0, 0.0]], [[0.0, -1.0]]], [[[1.5, 2.0]], [[2.0, 3.0]]]])
    # image 0: mean(1, 0, 1, 4) + mean(0, 4, 0, 0) = 1.5 + 1.0; image 1: mean(0, 1, 4, 0) + mean(1, 4, 0, 4) = 1.25 + 2.25
    torch.testing.assert_close(feature_hint_per_image([f0, f1], deepest), torch.tensor([2.5, 3.5]))
    torch.testing.assert_close(feature_hint_per_image([f0], deepest), torch.tensor([1.5, 1.25]))


def test_feature_hint_is_the_mean_squared_difference_and_leaves_the_deepest_map_alone():
    g = torch.Generator().manual_seed(0)
    deepest = torch.randn(3, 4, 2, 2, generator=g).requires_grad_()
    heads = [torch.randn(3, 4, 2, 2, generator=g).requires_grad_() for _ in range(3)]
    value = feature_hint_per_image(heads, deepest)
    expected = sum(((h - deepest) ** 2).sum(dim=(1, 2, 3)) / (4 * 2 * 2) for h in heads)
    torch.testing.assert_close(value, expected)
    value.sum().backward()
    assert deepest.grad is None, "F_C is detached"
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in heads)
    with pytest.raises(ValueError, match=r"head feature 1 has shape \(3, 4, 1, 1\)"):
        feature_hint_per_image([heads[0].detach(), torch.zeros(3, 4, 1, 1)], deepest)


# ---------------------------------------------------------------------------- the model's paths


@pytest.mark.parametrize(
    "factory, info",
    [(MultiExit(ResNet("xs")), DIGITS),
     (MultiExit(TorchvisionModel("resnet18", cifar_stem=True)), TaskInfo(num_classes=7, in_channels=3, image_size=(32, 32)))],
    ids=["resnet10-xs", "torchvision-resnet18"],
)
def test_multi_exit_names_its_head_bodies_and_final_stage(factory, info):
    net = factory.build(info)
    assert net.final_stage_path == "backbone.layer4"
    assert net.head_feature_paths == ("heads.0.body", "heads.1.body", "heads.2.body")
    modules = dict(net.named_modules())
    assert all(p in modules for p in (*net.head_feature_paths, net.final_stage_path))


# ---------------------------------------------------------------------------- the plugin


def test_hint_weight_zero_requests_no_features_and_validates():
    net = MultiExit(ResNet("xxs")).build(DIGITS)
    wrapped = SimpleNamespace(module=net)  # Fabric-like wrapper: .module is the user's model
    engine = _engine({"a": net, "b": wrapped})
    assert SelfDistillation().hint_weight == 0.0
    assert SelfDistillation().collab_distill_feature_requests(engine) == []
    assert SelfDistillation(hint_weight=0.0).collab_distill_student_modules(engine) is None
    requests = SelfDistillation(hint_weight=0.03).collab_distill_feature_requests(engine)
    assert [(r.member, r.feature) for r in requests] == [
        (m, p) for m in ("a", "b") for p in ("heads.0.body", "heads.1.body", "heads.2.body", "backbone.layer4")
    ]
    assert all(r.when(engine, "train") and r.when(engine, "lookahead") and not r.when(engine, "meta") for r in requests)
    with pytest.raises(ConfigError, match=r"SelfDistillation.hint_weight=-0.1 must be >= 0"):
        SelfDistillation(hint_weight=-0.1)
    assert repr(SelfDistillation(alpha=0.7, temperature=3.0, hint_weight=0.03)) == (
        "SelfDistillation(alpha=0.7, temperature=3.0, hint_weight=0.03)"
    )


def test_hint_term_trains_the_heads_not_the_final_stage():
    torch.manual_seed(0)
    net = MultiExit(ResNet("xxs")).build(DIGITS).train()
    plugin = SelfDistillation(hint_weight=0.5)
    engine = _engine({"a": net})
    record = _captured_record(net, plugin, engine)
    out = plugin.collab_distill_auxiliary_losses(engine, {"a": record})
    assert set(out) == {"a/exits", "a/hint"}
    expected = 0.5 * feature_hint_per_image([record.features[p] for p in net.head_feature_paths],
                                            record.features["backbone.layer4"]).mean()
    torch.testing.assert_close(out["a/hint"], expected)
    assert out["a/hint"].item() > 0
    # the logit part is unchanged by the hint
    logit_part = SelfDistillation().collab_distill_auxiliary_losses(engine, {"a": record})["a/exits"]
    torch.testing.assert_close(out["a/exits"], logit_part)
    out["a/hint"].backward()
    assert all(p.grad is None for p in net.backbone.layer4.parameters()), "F_C is the target: no gradient from the hint"
    assert all(p.grad is not None for p in net.heads[0].body.parameters())
    assert all(p.grad is None for p in net.heads[0].fc.parameters())
    # off while the student warms up; and when the features were not captured in a step
    assert "a/hint" not in plugin.collab_distill_auxiliary_losses(_engine({"a": net}, warming=True), {"a": record})
    record.features.pop("backbone.layer4")
    assert "a/hint" not in plugin.collab_distill_auxiliary_losses(engine, {"a": record})


def test_head_shape_differing_from_the_final_stage_is_a_config_error():
    # on 5x5 images the first head halves 5 -> 3 -> 2 while the backbone reaches 1x1
    net = MultiExit(ResNet("xxs")).build(TaskInfo(num_classes=10, in_channels=1, image_size=(5, 5))).train()
    plugin = SelfDistillation(hint_weight=0.03)
    engine = _engine({"xxs": net})
    record = _captured_record(net, plugin, engine, name="xxs", image_size=(5, 5))
    paths = (*net.head_feature_paths, net.final_stage_path)
    engine.feature_shapes = {"xxs": {p: tuple(record.features[p].shape[1:]) for p in paths}}
    assert engine.feature_shapes["xxs"]["heads.0.body"] == (16, 2, 2)
    expected = r"student 'xxs'.*'heads\.0\.body' has shape \(16, 2, 2\).*'backbone\.layer4' has \(16, 1, 1\)"
    with pytest.raises(ConfigError, match=expected):
        plugin.collab_distill_student_modules(engine)
    # without the hint the same students are fine
    assert SelfDistillation().collab_distill_student_modules(engine) is None


# ---------------------------------------------------------------------------- through the CLI


@pytest.mark.slow
def test_sd_hint_example_composes_with_digits_and_logs_the_hint(tmp_path, cli_env):
    run_cli([*digits_args(tmp_path, "sd_hint", epochs=1), "--config", str(REPO / "examples" / "methods" / "sd_hint.yaml"),
             "--trainer.limit_train_batches", "3", "--trainer.log_every_n_steps", "1"], cli_env)
    run = tmp_path / "sd_hint" / "version_0"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished"
    assert "hint_weight: 0.03" in (run / "config.yaml").read_text()
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for student in ("xxs", "xs", "s"):
        column = f"train/{student}/hint"
        assert rows and column in rows[0], f"{column} not logged; columns: {sorted(rows[0]) if rows else []}"
        values = [float(r[column]) for r in rows if r[column] not in ("", None)]
        assert values and all(math.isfinite(v) and v > 0 for v in values), values
