"""Detection through detectron2: its models, dataset catalog, mapper and COCOEvaluator behind the
same knowledge record as the torchvision adapter. detectron2 is not on the package registry;
these tests skip without it (build it from source to run them, see the README)."""

from __future__ import annotations

import json

import pytest
import torch

from collab_distill.task import ConfigError
from collab_distill.tasks.detection import detectron2 as d2_adapter
from collab_distill.tasks.detection.shapes import write_shapes_coco
from conftest import REPO
from test_cli import run_cli
from test_detection import assert_ranks_identical

NO_D2 = "detectron2 is not installed (not on PyPI: build it from source, see the README's 'Detection with detectron2')"
needs_detectron2 = pytest.mark.skipif(not d2_adapter.detectron2_available(), reason=NO_D2)

SMALL = {"MODEL.RPN.POST_NMS_TOPK_TRAIN": 200, "MODEL.RPN.POST_NMS_TOPK_TEST": 200,
         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 64, "MODEL.FPN.OUT_CHANNELS": 32, "MODEL.ROI_BOX_HEAD.FC_DIM": 64,
         "MODEL.PIXEL_STD": [57.375, 57.12, 58.395], "MODEL.RESNETS.NORM": "BN", "MODEL.BACKBONE.FREEZE_AT": 0}


def test_without_detectron2_the_adapter_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(d2_adapter, "detectron2_available", lambda: False)
    with pytest.raises(ConfigError, match="needs detectron2, which is not installed.*from source"):
        d2_adapter.Detectron2RCNN(18)
    data = d2_adapter.Detectron2Coco(root="nowhere")  # configs parse without detectron2; setup tells
    with pytest.raises(ConfigError, match="Detectron2Coco needs detectron2"):
        data.setup(0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_coco(tmp_path_factory.mktemp("shapes"), train=30, val=8, size=96, seed=3)


def make_task(root, **kw):
    data = d2_adapter.Detectron2Coco(root=str(root), batch_size=4, meta_fraction=0.2, val_fraction=0.2,
                                     dataset_name="test_shapes", **kw)
    return d2_adapter.Detectron2Detection(data, min_size=96, max_size=96, regions_per_image=16)


def built(task, depth, **options):
    torch.manual_seed(0)
    return task.build_model(d2_adapter.Detectron2RCNN(depth, options={**SMALL, **options}), task.info)


@needs_detectron2
def test_catalog_splits_match_the_torchvision_adapter(shapes):
    from collab_distill.tasks.detection import CocoDetection

    task = make_task(shapes)
    info = task.setup(0)
    plain = CocoDetection(root=str(shapes), batch_size=4, meta_fraction=0.2, val_fraction=0.2)
    plain.setup(0)
    assert info.num_classes == 3
    for split in ("train", "meta", "val", "test"):
        assert [r["image_id"] for r in task.data.records[split]] == plain.splits[split].image_ids
    sample = task.dataset("train")[(0, 5)]
    assert sample["instances"].gt_classes.max() < 3  # detectron2's contiguous ids, background = K
    again = task.dataset("train")[(0, 5)]
    assert torch.equal(sample["image"], again["image"]), "augmentation is seeded by the sample seed"
    assert torch.equal(sample["instances"].gt_boxes.tensor, again["instances"].gt_boxes.tensor)


@needs_detectron2
def test_shared_region_logits_line_up_and_per_image_losses_match_detectron2(shapes):
    from detectron2.utils.events import EventStorage

    task = make_task(shapes)
    task.setup(0)
    teacher, student = built(task, 34).eval(), built(task, 18)
    batch = task.collate([task.dataset("train")[(i, 20 + i)] for i in range(3)])
    context = task.shared_context(batch, {"t": teacher}, {"s": student})
    records = [task.knowledge(m, batch, context=context) for m in (teacher, student)]
    units = len(context.unit_image)
    assert units == sum(len(r) for r in context.regions)
    for r in records:
        assert r.logits.shape == (units, 4) and torch.equal(r.unit_labels, context.unit_labels)
    assert torch.all(records[0].supervised_loss == 0) and torch.all(records[1].supervised_loss > 0)
    # row i of every model is region i: image 1's rows equal pooling image 1 alone
    first = len(context.regions[0])
    student.eval()
    rows = student(batch["inputs"], regions=context.regions, mode="train")["region_logits"]
    alone = student([batch["inputs"][1]], regions=[context.regions[1]], mode="train")["region_logits"]
    assert torch.allclose(rows[first:first + len(alone)], alone, atol=1e-4)
    student.train()
    # background last: every ground-truth box is a shared region labelled with its own class
    gt = torch.cat([x["instances"].gt_classes for x in batch["inputs"]])
    assert set(gt.tolist()) <= set(context.unit_labels.tolist()) and context.unit_labels.max() <= 3
    # the mean of the per-image losses is detectron2's own training loss under the same sampling seed
    torch.manual_seed(context.seed)
    with EventStorage(0):
        losses = student.model(batch["inputs"])
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert records[1].supervised_loss.mean().item() == pytest.approx(sum(losses.values()).item(), rel=1e-5)
    # the teacher's cached features give the logits it would compute itself
    context.source = None
    assert torch.allclose(task.knowledge(teacher, batch, context=context).logits, records[0].logits, atol=1e-5)


@needs_detectron2
def test_detectron2_coco_evaluator_scores_the_ground_truth_100(shapes):
    from types import SimpleNamespace

    from detectron2.structures import Boxes, Instances

    task = make_task(shapes)
    task.setup(0)
    for split in ("val", "test"):
        evaluator = task.evaluator(SimpleNamespace(world_size=1, global_rank=0))
        loader = [task.collate([task.dataset(split)[i]]) for i in range(len(task.dataset(split)))]
        records = {r["image_id"]: r for r in task.data.records[split]}
        for batch in loader:
            x = batch["inputs"][0]
            record = records[x["image_id"]]
            perfect = Instances((x["height"], x["width"]))
            boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                     for a in record["annotations"]]
            perfect.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            perfect.scores = torch.ones(len(boxes))
            perfect.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]], dtype=torch.int64)
            evaluator.update([{"instances": perfect}], batch)
        metrics = evaluator.compute()
        assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0), split


@needs_detectron2
def test_bad_detectron2_model_settings_fail_with_the_field_named(tmp_path, shapes):
    with pytest.raises(ConfigError, match=r"options\['MODEL.RPN.POST_NMS_TOPK'\]"):
        d2_adapter.Detectron2RCNN(18, options={"MODEL.RPN.POST_NMS_TOPK": 10})
    with pytest.raises(ConfigError, match="config_file"):
        d2_adapter.Detectron2RCNN(config_file=str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="depth=19"):
        d2_adapter.Detectron2RCNN(19)
    task = make_task(shapes)
    task.setup(0)
    # a teacher file trained for 5 classes cannot silently keep a random 3-class head
    from detectron2.checkpoint import DetectionCheckpointer

    info5 = type(task.info)(num_classes=5, extra=task.info.extra)
    five = d2_adapter.Detectron2RCNN(18, options=SMALL).build(info5)
    DetectionCheckpointer(five.model, save_dir=str(tmp_path)).save("five")
    weights = str(tmp_path / "five.pth")
    with pytest.raises(ConfigError, match=r"does not fit this model.*roi_heads.box_predictor.cls_score.*weights_partial"):
        task.build_model(d2_adapter.Detectron2RCNN(18, options=SMALL, weights=weights), task.info)
    partial = task.build_model(d2_adapter.Detectron2RCNN(18, options=SMALL, weights=weights, weights_partial=True), task.info)
    assert torch.equal(partial.model.backbone.bottom_up.stem.conv1.weight, five.model.backbone.bottom_up.stem.conv1.weight)
    # a model that expects RGB where the task reads BGR sees its images with the channels reordered
    rgb = task.build_model(d2_adapter.Detectron2RCNN(18, options={**SMALL, "INPUT.FORMAT": "RGB"}), task.info).eval()
    bgr = task.build_model(d2_adapter.Detectron2RCNN(18, options=SMALL), task.info).eval()
    bgr.load_state_dict(rgb.state_dict())
    x = task.dataset("val")[0]
    swapped = {**x, "image": x["image"].flip(0)}
    with torch.no_grad():
        assert torch.equal(rgb([x], mode="regions")[0][0], bgr([swapped], mode="regions")[0][0])
    with pytest.raises(ConfigError, match="INPUT.FORMAT='YUV-BT.601'"):
        task.build_model(d2_adapter.Detectron2RCNN(18, options={**SMALL, "INPUT.FORMAT": "YUV-BT.601"}), task.info)


def tiny_args(root, data, name, extra=()):
    return ["fit", "--config", str(REPO / "examples" / "coco_tiny_detectron2.yaml"), "--trainer.root_dir", str(root),
            "--trainer.name", name, "--trainer.max_epochs", "1", "--trainer.progress_bar", "false",
            "--task.init_args.data.init_args.root", str(data), "--task.init_args.min_size", "96",
            "--task.init_args.max_size", "96", *extra]


@needs_detectron2
@pytest.mark.slow
def test_tiny_detectron2_cohort_fits_with_a_weights_file_teacher_and_mc_distil(tmp_path, cli_env, shapes):
    """A teacher given as a detectron2 weights file needs no checkpoint or training; KD and the
    finite-difference MC-Distil meta step run through detectron2 models; COCOEvaluator scores them."""
    from detectron2.checkpoint import DetectionCheckpointer

    from collab_distill.task import TaskInfo

    teacher = d2_adapter.Detectron2RCNN(50, options=SMALL).build(TaskInfo(num_classes=3))
    DetectionCheckpointer(teacher.model, save_dir=str(tmp_path)).save("teacher")
    teacher_args = ("--cohort.teachers.teacher.model.init_args.weights", str(tmp_path / "teacher.pth"),
                    "--cohort.teachers.teacher.model.init_args.options", json.dumps(SMALL),
                    "--cohort.teachers.teacher.train_epochs", "0")
    run_cli(tiny_args(tmp_path, shapes, "mc", extra=(
        *teacher_args, "--config", str(REPO / "examples" / "methods" / "mc_distil.yaml"),
        "--meta.every_n_steps", "2", "--trainer.warmup_epochs", "0",
        "--trainer.loggers", "[csv]", "--trainer.log_every_n_steps", "1")), cli_env, timeout=900)
    run = tmp_path / "mc" / "version_0"
    results = json.loads((run / "results.json").read_text())
    assert results["selection_metric"] == "AP" and set(results["students"]) == {"r18_fpn32", "r34_fpn64"}
    for r in results["students"].values():
        assert 0 <= r["last"]["test_AP"] <= 100 and "test_AP50" in r["last"] and "val_AP" in r["best_on_val"]
    metrics = (run / "logs" / "csv" / "metrics.csv").read_text()
    assert "train/meta/loss" in metrics and "train/r18_fpn32/beta" in metrics
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["meta_optimizers"]["cnet"]["state"], "the finite-difference meta step updated the C-Net"
    assert any(k.startswith("model.roi_heads.box_predictor") for k in ckpt["students"]["r18_fpn32"])


@needs_detectron2
@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_through_detectron2_keeps_ranks_identical(tmp_path, cli_env, shapes):
    extra = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--cohort.teachers.teacher.train_epochs", "1",
             "--config", str(REPO / "examples" / "methods" / "mc_distil.yaml"),
             "--meta.every_n_steps", "2", "--trainer.warmup_epochs", "0",
             "--plugins+", json.dumps({"class_path": "support_plugins.WeightChecksums"})]
    run_cli(tiny_args(tmp_path, shapes, "ddp", extra=extra), cli_env, timeout=900)
    assert_ranks_identical(tmp_path / "ddp" / "version_0")


@needs_detectron2
@pytest.mark.slow
def test_coco_example_runs_with_its_weight_files(tmp_path, cli_env, shapes):
    """examples/coco.yaml as written (model-zoo-style teacher file, backbone-only student files in
    RGB with torchvision's normalisation), pointed at small data and local files."""
    from detectron2.checkpoint import DetectionCheckpointer

    from collab_distill.task import TaskInfo

    weights = tmp_path / "weights"
    weights.mkdir()
    info = TaskInfo(num_classes=3)
    teacher = d2_adapter.Detectron2RCNN(50).build(info)
    DetectionCheckpointer(teacher.model, save_dir=str(weights)).save("faster_rcnn_R_50_FPN_3x")
    (weights / "faster_rcnn_R_50_FPN_3x.pth").rename(weights / "faster_rcnn_R_50_FPN_3x.pkl.pth")
    for depth in (18, 34):
        trunk = d2_adapter.Detectron2RCNN(depth).build(info).model.backbone.bottom_up.state_dict()
        torch.save({"model": {f"backbone.bottom_up.{k}": v for k, v in trunk.items()}}, weights / f"R-{depth}.pth")
    text = (REPO / "examples" / "coco.yaml").read_text()
    text = (text.replace("data/weights/faster_rcnn_R_50_FPN_3x.pkl", str(weights / "faster_rcnn_R_50_FPN_3x.pkl.pth"))
            .replace("data/weights/R-18.pkl", str(weights / "R-18.pth"))
            .replace("data/weights/R-34.pkl", str(weights / "R-34.pth"))
            .replace("root: data/coco", f"root: {shapes}"))
    config = tmp_path / "coco.yaml"
    config.write_text(text)
    run_cli(["fit", "--config", str(config), "--trainer.root_dir", str(tmp_path / "runs"), "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "2", "--trainer.limit_eval_batches", "2", "--trainer.precision", "32-true",
             "--trainer.accelerator", "cpu", "--trainer.progress_bar", "false", "--task.init_args.min_size", "[96, 112]",
             "--task.init_args.max_size", "128", "--task.init_args.min_size_test", "96",
             "--task.init_args.data.init_args.num_workers", "0"], cli_env, timeout=900)
    results = json.loads((tmp_path / "runs" / "coco" / "version_0" / "results.json").read_text())
    assert results["status"] == "finished" and set(results["students"]) == {"r18", "r34"}


@needs_detectron2
@pytest.mark.slow
def test_train_net_example_adds_distillation_to_detectron2s_own_trainer(tmp_path, cli_env, shapes):
    """examples/detectron2_train_net.py: detectron2's DefaultTrainer trains the wrapped student,
    logs loss_distill beside its own losses, evaluates with COCOEvaluator and leaves a student
    checkpoint that a plain detectron2 model loads completely."""
    import subprocess
    import sys

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    def config(depth, path):
        cfg = d2_adapter.default_config(depth)
        cfg.merge_from_list([x for k, v in SMALL.items() for x in (k, v)])
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
        cfg.MODEL.DEVICE = "cpu"
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("tn_train",), ("tn_val",)
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (96,), 96
        cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 96
        cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER = 2, 0.002, 4
        cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS, cfg.SOLVER.CHECKPOINT_PERIOD = 1, (), 1000
        cfg.DATALOADER.NUM_WORKERS, cfg.OUTPUT_DIR = 0, str(tmp_path / "out")
        path.write_text(cfg.dump())
        return cfg

    student_cfg = config(18, tmp_path / "student.yaml")
    teacher_cfg = config(34, tmp_path / "teacher.yaml")
    teacher = build_model(teacher_cfg)
    DetectionCheckpointer(teacher, save_dir=str(tmp_path)).save("teacher")
    datasets = ["--coco-dataset", "tn_train", str(shapes / "annotations" / "instances_train2017.json"), str(shapes / "train2017"),
                "--coco-dataset", "tn_val", str(shapes / "annotations" / "instances_val2017.json"), str(shapes / "val2017")]
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "detectron2_train_net.py"), "--config-file", str(tmp_path / "student.yaml"),
         "--teacher-config", str(tmp_path / "teacher.yaml"), "--teacher-weights", str(tmp_path / "teacher.pth"),
         "--beta", "0.5", *datasets],
        env=cli_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    trained = [r for r in rows if "loss_distill" in r]
    assert len(trained) >= 1 and all(k in trained[-1] for k in ("loss_cls", "loss_box_reg", "loss_rpn_cls", "total_loss"))
    assert (out / "inference" / "coco_instances_results.json").is_file()
    assert any("bbox/AP" in r for r in rows), "the final COCOEvaluator run was logged"
    student = build_model(student_cfg)
    checkpointer = d2_adapter._recording_checkpointer(student)
    checkpointer.load(str(out / "student_final.pth"))
    missing = checkpointer.incompatible
    assert missing is None or not (missing.missing_keys or missing.incorrect_shapes or missing.unexpected_keys)
