"""``fit --dry_run true``: a run's data and models are set up here, on the CPU in one process,
and its plan under the configured devices is printed; nothing is trained or written. The
README's 8-GPU COCO command is checked this way on the shapes data laid out as COCO."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from collab_distill.cli import main
from collab_distill.tasks.detection import detectron2 as d2_adapter
from collab_distill.tasks.detection.shapes import write_shapes_coco
from conftest import REPO
from test_cli import run_cli
from tiny_config import tiny_digits_yaml


def _plan_lines(stdout: str) -> dict[str, str]:
    return {line.split(":", 1)[0].strip(): line for line in stdout.splitlines() if line.startswith("  ")}


def test_dry_run_prints_the_per_rank_plan_and_writes_nothing(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_digits_yaml(subset=400))
    root = tmp_path / "runs"
    plans = {}
    for devices in (1, 4):
        assert main(["fit", "--config", str(config), "--trainer.root_dir", str(root), "--trainer.devices", str(devices),
                     "--trainer.max_epochs", "3", "--dry_run", "true"]) == 0
        out = capsys.readouterr().out
        assert f"{devices} process(es) on cpu" in out and "nothing was trained or written" in out, out
        plans[devices] = _plan_lines(out)
    assert not root.exists()
    # a subset of 400 digits: 320 train images (40 meta, 40 val), batch 32 per rank
    assert "320 images, 320 per rank, batch 32 per rank, 10 steps per epoch" in plans[1]["train"]
    per_rank = (math.ceil(320 / 4) // 32) * 32  # 64: each rank's last partial batch is dropped in training
    assert f"320 images, {per_rank} per rank, batch 32 per rank, {per_rank // 32} steps per epoch" in plans[4]["train"]
    assert "effective batch 128 (32 x 4)" in plans[4]["training"] and f"{3 * per_rank // 32} steps in all" in plans[4]["training"]


def test_dry_run_stops_on_what_the_real_run_would_stop_on(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_digits_yaml())
    rc = main(["fit", "--config", str(config), "--trainer.root_dir", str(tmp_path / "runs"), "--dry_run", "true",
               "--cohort.student_checkpoints", f"{{s: {tmp_path / 'missing.pt'}}}"])
    err = capsys.readouterr().err
    assert rc == 2 and "cohort.student_checkpoints.s" in err and "does not exist" in err
    assert not (tmp_path / "runs").exists()


def write_coco_example_weights(folder, num_classes: int = 3) -> dict[str, str]:
    """Stand-ins for the weight files ``examples/coco.yaml`` names (detectron2 formats: a full
    detector for the teacher, backbone-only files for the students), keyed by the example's paths."""
    from detectron2.checkpoint import DetectionCheckpointer

    from collab_distill.task import TaskInfo

    folder.mkdir(parents=True, exist_ok=True)
    info = TaskInfo(num_classes=num_classes)
    teacher = d2_adapter.Detectron2RCNN(50).build(info)
    DetectionCheckpointer(teacher.model, save_dir=str(folder)).save("faster_rcnn_R_50_FPN_3x")
    (folder / "faster_rcnn_R_50_FPN_3x.pth").rename(folder / "faster_rcnn_R_50_FPN_3x.pkl.pth")
    files = {"data/weights/faster_rcnn_R_50_FPN_3x.pkl": str(folder / "faster_rcnn_R_50_FPN_3x.pkl.pth")}
    for depth in (18, 34):
        trunk = d2_adapter.Detectron2RCNN(depth).build(info).model.backbone.bottom_up.state_dict()
        torch.save({"model": {f"backbone.bottom_up.{k}": v for k, v in trunk.items()}}, folder / f"R-{depth}.pth")
        files[f"data/weights/R-{depth}.pkl"] = str(folder / f"R-{depth}.pth")
    return files


@pytest.mark.skipif(not d2_adapter.detectron2_available(), reason="detectron2 is not installed (see the README)")
@pytest.mark.slow
def test_the_readmes_eight_gpu_coco_command_checks_out_on_coco_shaped_data(tmp_path, cli_env):
    """``collab-distill fit --config examples/coco.yaml --trainer.devices 8``: the printed config is
    the README's, and a dry run on the shapes data in COCO's layout reads every split, loads every
    weight file and plans 8 ranks of 2 images (16 per step, detectron2's 1x batch)."""
    readme = (REPO / "README.md").read_text()
    assert "collab-distill fit --config examples/coco.yaml --trainer.devices 8" in readme
    printed = run_cli(["fit", "--config", str(REPO / "examples" / "coco.yaml"), "--trainer.devices", "8", "--print_config"],
                      cli_env).stdout
    config = yaml.safe_load(printed)
    assert config["trainer"]["devices"] == 8 and config["task"]["init_args"]["data"]["init_args"]["batch_size"] == 2
    shapes = write_shapes_coco(tmp_path / "coco", train=40, val=10, size=96, seed=1)
    text = (REPO / "examples" / "coco.yaml").read_text().replace("root: data/coco", f"root: {shapes}")
    for name, path in write_coco_example_weights(tmp_path / "weights").items():
        text = text.replace(name, path)
    (tmp_path / "coco.yaml").write_text(text)
    out = run_cli(["fit", "--config", str(tmp_path / "coco.yaml"), "--trainer.devices", "8", "--dry_run", "true",
                   "--trainer.root_dir", str(tmp_path / "runs")], cli_env, timeout=600).stdout
    plan = _plan_lines(out)
    assert "8 process(es) on auto, precision bf16-mixed" in out and "effective batch 16 (2 x 8)" in plan["training"], out
    assert "r18" in out and "r34" in out and "teacher" in out
    assert not (tmp_path / "runs").exists()
