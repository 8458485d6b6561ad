"""Feature imitation on one FPN level (FitNets on a detector's stride-8 level), for the torchvision
and the detectron2 adapter: a short real fit through the CLI with the example method files, and a
misspelled level path refused before any training."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from collab_distill.tasks.detection.shapes import write_shapes_coco
from conftest import REPO
from test_cli import run_cli

METHODS = REPO / "examples" / "methods"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_coco(tmp_path_factory.mktemp("shapes"), train=16, val=4, size=64, seed=5)


def test_the_frozen_region_source_runs_its_hooked_backbone_itself(shapes):
    """The teacher's proposals come from its backbone run in ``shared_context`` (no grad, outside
    any feature recording); with a hook inside its backbone its knowledge call runs the backbone
    again, so the hook sees that call, and the logits are those of the cached features."""
    from collab_distill.tasks.detection import CocoDetection, FasterRCNN, ObjectDetection

    task = ObjectDetection(CocoDetection(root=str(shapes), batch_size=4), min_size=64, max_size=64, regions_per_image=8)
    task.setup(0)
    torch.manual_seed(0)
    teacher = task.build_model(FasterRCNN("xxs", fpn_channels=32, representation_size=64), task.info).eval()
    batch = task.collate([task.dataset("train")[(i, i)] for i in range(2)])
    context = task.shared_context(batch, {"t": teacher}, {})
    assert context.source is teacher and context.source_features is not None
    cached = task.knowledge(teacher, batch, context=context).logits
    seen = []
    handle = teacher.get_submodule("detector.backbone.fpn").register_forward_hook(lambda m, a, out: seen.append(out["1"]))
    try:
        hooked = task.knowledge(teacher, batch, context=context).logits
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (2, 32, 8, 8)  # the stride-8 level of 64 px images
    assert torch.allclose(hooked, cached, atol=1e-5)


def short_args(config, root, data, name, extra=()):
    """A few steps of ``config`` + a method file at 64 px (the teacher trains 2 batches first)."""
    return ["fit", "--config", str(REPO / "examples" / config), *extra, "--trainer.root_dir", str(root),
            "--trainer.name", name, "--trainer.max_epochs", "1", "--trainer.progress_bar", "false",
            "--trainer.limit_train_batches", "2", "--trainer.limit_eval_batches", "1",
            "--trainer.loggers", "[csv]", "--trainer.log_every_n_steps", "1",
            "--task.init_args.data.init_args.root", str(data), "--task.init_args.min_size", "64",
            "--task.init_args.max_size", "64", "--cohort.teachers.teacher.train_epochs", "1"]


def assert_hints_trained(run, students):
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and set(results["students"]) == set(students)
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for student in students:
        values = [float(r[f"train/{student}/hint"]) for r in rows if r.get(f"train/{student}/hint")]
        assert values, f"no train/{student}/hint in metrics.csv"
        assert all(math.isfinite(v) and v > 0 for v in values), values
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    for student in students:
        regressor = ckpt["plugin_modules"][student]["fitnets_regressor_0"]
        assert any(k.endswith("weight") for k in regressor), sorted(regressor)


@pytest.mark.slow
def test_fpn_imitation_fits_on_the_torchvision_detectors(tmp_path, cli_env, shapes):
    run_cli(short_args("coco_tiny.yaml", tmp_path, shapes, "fpn",
                       extra=("--config", str(METHODS / "fpn_imitation.yaml"))), cli_env, timeout=300)
    run = tmp_path / "fpn" / "version_0"
    assert_hints_trained(run, ["xxs", "xs", "s"])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    # a 1x1 conv per student: 32 FPN channels -> the teacher's 64, and 64 -> 64
    assert ckpt["plugin_modules"]["xxs"]["fitnets_regressor_0"]["weight"].shape == (64, 32, 1, 1)
    assert ckpt["plugin_modules"]["s"]["fitnets_regressor_0"]["weight"].shape == (64, 64, 1, 1)


@pytest.mark.slow
def test_a_misspelled_fpn_level_stops_before_training(tmp_path, cli_env, shapes):
    bad = json.dumps([
        {"class_path": "collab_distill.plugins.fixed_weights.FixedLossWeights", "init_args": {"alpha": 1.0, "beta": 0.5}},
        {"class_path": "collab_distill.plugins.hints.FitNets",
         "init_args": {"student_features": ["detector.backbone.fpnn[1]"], "adaptor": "conv"}},
    ])
    proc = run_cli(short_args("coco_tiny.yaml", tmp_path, shapes, "bad",
                              extra=("--config", str(METHODS / "fpn_imitation.yaml"), "--plugins", bad)),
                   cli_env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "detector.backbone.fpnn" in proc.stderr and "nearest valid paths" in proc.stderr, proc.stderr[-2000:]
    assert "detector.backbone.fpn" in proc.stderr.split("nearest valid paths")[1], proc.stderr[-2000:]
    assert not (tmp_path / "bad" / "version_0" / "checkpoints").exists()
    assert not (tmp_path / "bad" / "version_0" / "teachers").exists(), "the teacher must not train first"


@pytest.mark.slow
def test_fpn_imitation_fits_on_the_detectron2_detectors(tmp_path, cli_env, shapes):
    pytest.importorskip("detectron2")
    run_cli(short_args("coco_tiny_detectron2.yaml", tmp_path, shapes, "fpn_d2",
                       extra=("--config", str(METHODS / "fpn_imitation_detectron2.yaml"))), cli_env, timeout=600)
    assert_hints_trained(tmp_path / "fpn_d2" / "version_0", ["r18_fpn32", "r34_fpn64"])
