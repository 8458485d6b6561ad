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
from test_detection import assert_inference_macs, assert_ranks_identical

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
        *teacher_args, "--config", str(REPO / "examples" / "methods" / "mc_distil_detection.yaml"),
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
             "--config", str(REPO / "examples" / "methods" / "mc_distil_detection.yaml"),
             "--meta.every_n_steps", "2", "--trainer.warmup_epochs", "0",
             "--plugins+", json.dumps({"class_path": "support_plugins.WeightChecksums"})]
    run_cli(tiny_args(tmp_path, shapes, "ddp", extra=extra), cli_env, timeout=900)
    run = tmp_path / "ddp" / "version_0"
    assert_ranks_identical(run)
    # COCO evaluation gathered every rank's images once: one process scoring the same weights agrees
    results = json.loads((run / "results.json").read_text())
    run_cli(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
             "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.progress_bar", "false",
             "--output_dir", str(tmp_path / "one_process")], cli_env, timeout=900)
    alone = json.loads((tmp_path / "one_process" / "metrics.json").read_text())["metrics"]
    for name, entry in results["students"].items():
        for key in ("AP", "AP50", "AP75"):
            assert alone[name][key] == pytest.approx(entry["last"][f"test_{key}"], abs=1e-6), (name, key)


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
    # readable by others as detectron2's own checkpoint is (not mkstemp's 0600)
    assert (out / "student_final.pth").stat().st_mode == (out / "model_final.pth").stat().st_mode
    student = build_model(student_cfg)
    checkpointer = d2_adapter._recording_checkpointer(student)
    checkpointer.load(str(out / "student_final.pth"))
    missing = checkpointer.incompatible
    assert missing is None or not (missing.missing_keys or missing.incorrect_shapes or missing.unexpected_keys)


def tiny_detector(num_classes: int = 3, depth: int = 18, seed: int = 0) -> d2_adapter.Detectron2Detector:
    """A SMALL-option Detectron2RCNN as collab-distill builds it (keys prefixed ``model.``)."""
    from collab_distill.task import TaskInfo

    torch.manual_seed(seed)
    return d2_adapter.Detectron2RCNN(depth, options=SMALL).build(TaskInfo(num_classes=num_classes))


def assert_same_weights(model: torch.nn.Module, state: dict) -> None:
    own = model.state_dict()
    assert sorted(own) == sorted(state)
    assert all(torch.equal(own[k], torch.as_tensor(state[k])) for k in own), [k for k in own if not torch.equal(own[k], state[k])]


@needs_detectron2
def test_a_detectron2_file_loads_as_a_teacher_checkpoint_and_as_weights(tmp_path):
    """A detectron2 ``.pth`` (``{"model": state_dict}``, keys without the wrapper's ``model.``)
    loads through ``cohort.teachers.*.checkpoint`` as through ``model.init_args.weights``; a
    model-zoo ``.pkl`` (pickle, not torch) as a checkpoint is an error pointing at ``weights``."""
    import pickle

    from detectron2.checkpoint import DetectionCheckpointer

    from collab_distill.checkpoint import load_weights
    from collab_distill.task import TaskInfo

    saved = tiny_detector(seed=1)
    DetectionCheckpointer(saved.model, save_dir=str(tmp_path)).save("teacher")
    path = tmp_path / "teacher.pth"
    file = torch.load(path)["model"]
    assert file and not any(k.startswith("model.") for k in file)
    as_checkpoint = tiny_detector(seed=2)
    head = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(as_checkpoint.model.state_dict()[head], file[head])
    load_weights(as_checkpoint, path, member="t", field="cohort.teachers.t.checkpoint")
    assert_same_weights(as_checkpoint.model, file)
    as_weights = d2_adapter.Detectron2RCNN(18, options=SMALL, weights=str(path)).build(TaskInfo(num_classes=3))
    assert_same_weights(as_weights.model, file)

    pkl = tmp_path / "model_final_0123.pkl"  # detectron2's model-zoo format: a pickle of numpy arrays
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in file.items()}, "__author__": "test"}, f)
    with pytest.raises(ConfigError, match=r"cohort.teachers.t.checkpoint: .*model_final_0123.pkl.*model.init_args.weights"):
        load_weights(tiny_detector(), pkl, member="t", field="cohort.teachers.t.checkpoint")
    from_pkl = d2_adapter.Detectron2RCNN(18, options=SMALL, weights=str(pkl)).build(TaskInfo(num_classes=3))
    assert_same_weights(from_pkl.model, file)


@needs_detectron2
def test_load_detectron2_weights_maps_collab_distill_files_and_refuses_what_does_not_fit(tmp_path):
    """The strict loader of detectron2_train_net.py's teacher and of ``Detectron2RCNN.weights``:
    collab-distill's ``teacher.pt`` / export files (keys ``model.*``) and a run's ``last.ckpt``
    member load completely; a file for another class count, a partial file or a wrapper's
    checkpoint stop with the first problems and the likely cause."""
    from detectron2.checkpoint import DetectionCheckpointer

    load = d2_adapter.load_detectron2_weights
    saved, other = tiny_detector(seed=1), tiny_detector(seed=3)
    plain = {k.removeprefix("model."): v for k, v in saved.state_dict().items()}
    torch.save(saved.state_dict(), tmp_path / "teacher.pt")  # a run's teachers/NAME/teacher.pt, an export
    target = tiny_detector(seed=2).model
    load(target, tmp_path / "teacher.pt", field="--teacher-weights")
    assert_same_weights(target, plain)

    torch.save({"format": 1, "students": {"s": other.state_dict()}, "teachers": {"t": saved.state_dict()}},
               tmp_path / "last.ckpt")
    with pytest.raises(ConfigError, match=r"--teacher-weights: .*last.ckpt.*members \['s', 't'\]"):
        load(tiny_detector(seed=2).model, tmp_path / "last.ckpt", field="--teacher-weights")
    target = tiny_detector(seed=2).model
    load(target, tmp_path / "last.ckpt", field="--teacher-weights", member="t")
    assert_same_weights(target, plain)

    five = tiny_detector(num_classes=5)
    DetectionCheckpointer(five.model, save_dir=str(tmp_path)).save("five")
    with pytest.raises(ConfigError, match=r"--teacher-weights: .*five.pth' does not fit this model.*"
                                          r"roi_heads.box_predictor.cls_score.weight: file \(6, 64\) vs model \(4, 64\).*"
                                          r"trained for 5 classes.*3"):
        load(tiny_detector().model, tmp_path / "five.pth", field="--teacher-weights")
    partial = tiny_detector(seed=2).model
    load(partial, tmp_path / "five.pth", field="MODEL.WEIGHTS", strict=False)  # e.g. an ImageNet backbone
    assert torch.equal(partial.backbone.bottom_up.stem.conv1.weight, five.model.backbone.bottom_up.stem.conv1.weight)

    trunk = {k: v for k, v in plain.items() if k.startswith("backbone.")}
    torch.save({"model": trunk}, tmp_path / "backbone.pth")
    with pytest.raises(ConfigError, match=r"backbone.pth' does not fit this model: \d+ key\(s\) of the model are not in the "
                                          r"file.*proposal_generator.*only part of the model"):
        load(tiny_detector().model, tmp_path / "backbone.pth", field="--teacher-weights")

    wrapper = d2_adapter.DistillingRCNN(tiny_detector(seed=4).model, saved.model)
    DetectionCheckpointer(wrapper, save_dir=str(tmp_path)).save("model_final")
    with pytest.raises(ConfigError, match=r"model_final.pth' does not fit.*'student\.', 'teacher\.'.*DistillingRCNN"):
        load(tiny_detector().model, tmp_path / "model_final.pth", field="--teacher-weights")
    with pytest.raises(ConfigError, match="does not exist"):
        load(tiny_detector().model, tmp_path / "nowhere.pth", field="--teacher-weights")


def train_net_config(depth: int, path, output_dir, max_iter: int):
    """A detectron2 config for examples/detectron2_train_net.py on the shapes data (registered
    with --coco-dataset as tn_train), no evaluation; written to ``path``."""
    cfg = d2_adapter.default_config(depth)
    cfg.merge_from_list([x for k, v in SMALL.items() for x in (k, v)])
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("tn_train",), ()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 64
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER = 2, 0.002, max_iter
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS, cfg.SOLVER.CHECKPOINT_PERIOD = 1, (), 1000
    cfg.DATALOADER.NUM_WORKERS, cfg.OUTPUT_DIR = 0, str(output_dir)
    path.write_text(cfg.dump())
    return cfg


def run_train_net(tmp_path, cli_env, shapes, teacher_weights, *extra: str):
    import subprocess
    import sys

    datasets = ["--coco-dataset", "tn_train", str(shapes / "annotations" / "instances_train2017.json"), str(shapes / "train2017")]
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "detectron2_train_net.py"), "--config-file", str(tmp_path / "student.yaml"),
         "--teacher-config", str(tmp_path / "teacher.yaml"), "--teacher-weights", str(teacher_weights), *datasets, *extra],
        env=cli_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@needs_detectron2
@pytest.mark.slow
def test_train_net_example_resumes_a_finished_run_and_refuses_a_checkpoint_that_does_not_fit(tmp_path, cli_env, shapes):
    """--resume after a finished run continues from the wrapper's last checkpoint (student_final.pth
    leaves last_checkpoint alone); a last_checkpoint naming a file that does not fit stops the run.
    The teacher is collab-distill's own teacher.pt (keys ``model.*``)."""
    from detectron2.modeling import build_model

    out = tmp_path / "out"
    train_net_config(18, tmp_path / "student.yaml", out, max_iter=2)
    teacher_cfg = train_net_config(34, tmp_path / "teacher.yaml", out, max_iter=2)
    torch.manual_seed(0)
    teacher = d2_adapter.Detectron2Detector(build_model(teacher_cfg), teacher_cfg)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")

    first = run_train_net(tmp_path, cli_env, shapes, tmp_path / "teacher.pt")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    wrapper = torch.load(out / "model_final.pth", weights_only=False)
    assert wrapper["iteration"] == 1
    for k, v in teacher.state_dict().items():
        assert torch.equal(wrapper["model"]["teacher." + k.removeprefix("model.")], v), k
    student = torch.load(out / "student_final.pth")["model"]
    assert all(torch.equal(student[k], wrapper["model"]["student." + k]) for k in student)

    # resumed at the same MAX_ITER there is nothing left to train: the student is the saved one
    again = run_train_net(tmp_path, cli_env, shapes, tmp_path / "teacher.pt", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = torch.load(out / "student_final.pth")["model"]
    assert all(torch.equal(resumed[k], v) for k, v in student.items())

    more = run_train_net(tmp_path, cli_env, shapes, tmp_path / "teacher.pt", "--resume", "SOLVER.MAX_ITER", "4")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "Starting training from iteration 2" in more.stdout + more.stderr
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 3
    assert not all(torch.equal(v, torch.load(out / "student_final.pth")["model"][k]) for k, v in student.items())

    (out / "last_checkpoint").write_text("student_final.pth")  # what the script used to leave behind
    bad = run_train_net(tmp_path, cli_env, shapes, tmp_path / "teacher.pt", "--resume", "SOLVER.MAX_ITER", "6")
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "student_final.pth' does not fit this model" in bad.stderr and "last_checkpoint" in bad.stderr, bad.stderr[-3000:]
    assert "Starting training" not in bad.stdout + bad.stderr


@needs_detectron2
@pytest.mark.slow
def test_train_net_example_refuses_a_teacher_whose_weights_do_not_load(tmp_path, cli_env, shapes):
    """A teacher file for another class count would leave a random head: the run does not start."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    out = tmp_path / "out"
    train_net_config(18, tmp_path / "student.yaml", out, max_iter=2)
    teacher_cfg = train_net_config(34, tmp_path / "teacher.yaml", out, max_iter=2)
    teacher_cfg.defrost()
    teacher_cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    DetectionCheckpointer(build_model(teacher_cfg), save_dir=str(tmp_path)).save("teacher5")
    proc = run_train_net(tmp_path, cli_env, shapes, tmp_path / "teacher5.pth")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--teacher-weights" in proc.stderr and "teacher5.pth' does not fit this model" in proc.stderr
    assert "trained for 5 classes" in proc.stderr
    assert not (out / "model_final.pth").exists() and "Starting training" not in proc.stdout + proc.stderr


def d2_export_fit_args(tmp_path, shapes, name):
    """A one-student detectron2 fit of two training batches and no teacher: the smallest run
    that leaves a checkpoint, models.json and versions.json."""
    student = {"r18": {"class_path": "collab_distill.tasks.detection.detectron2.Detectron2RCNN",
                       "init_args": {"depth": 18, "options": SMALL}}}
    plugins = [{"class_path": "collab_distill.plugins.fixed_weights.FixedLossWeights", "init_args": {"alpha": 1.0, "beta": 0.0}}]
    return tiny_args(tmp_path, shapes, name, extra=(
        "--cohort.teachers", "{}", "--cohort.students", json.dumps(student), "--plugins", json.dumps(plugins),
        "--trainer.limit_train_batches", "2", "--trainer.limit_eval_batches", "1"))


@needs_detectron2
@pytest.mark.slow
def test_detectron2_student_exports_a_checkpoint_detectron2_loads_as_it_is(tmp_path, cli_env, shapes):
    """`collab-distill export` of a detectron2 student: one `.pth` in detectron2's checkpoint
    format (no `model.` prefix of the wrapper) and beside it the detectron2 config that rebuilds
    the model; `get_cfg().merge_from_file` + `build_model` + `DetectionCheckpointer.load` take the
    pair as it is, with no missing, unexpected or mis-shaped key and the trained weights. No
    TorchScript / torch.export file, one note saying why, exit 0; asking for TorchScript
    explicitly is one error; a second export replaces neither file without --overwrite. The run's
    models.json has the MACs of every member and versions.json detectron2's version."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from collab_distill.export import export_student

    run_cli(d2_export_fit_args(tmp_path, shapes, "export"), cli_env, timeout=600)
    run = tmp_path / "export" / "version_0"
    summary = json.loads((run / "models.json").read_text())
    assert all(isinstance(m["macs"], int) and m["macs"] > 0 for m in summary.values()), summary
    recorded = json.loads((run / "versions.json").read_text())
    assert isinstance(recorded["detectron2"], str) and "detectron2_commit" in recorded

    ckpt_path = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    proc = run_cli(["export", "--ckpt_path", str(ckpt_path), "--student", "r18", "--output", str(out)], cli_env)
    path, config = out / "r18-last.pth", out / "r18-last.yaml"
    assert proc.stdout.split() == [str(path), str(config)]
    assert sorted(p.name for p in out.iterdir()) == ["r18-last.pth", "r18-last.yaml"]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "TorchScript / torch.export" in notes[0] and "r18-last.pth is the deployable file" in notes[0]

    class Recording(DetectionCheckpointer):
        """Keeps the keys that did not load (detectron2 only logs them)."""

        incompatible = None

        def _log_incompatible_keys(self, incompatible):
            self.incompatible = incompatible

    cfg = get_cfg()  # the pair, as the README shows
    cfg.merge_from_file(str(config))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3 and cfg.MODEL.RESNETS.DEPTH == 18 and cfg.MODEL.WEIGHTS == str(path.resolve())
    model = build_model(cfg)
    checkpointer = Recording(model)
    checkpointer.load(str(path))
    bad = checkpointer.incompatible
    assert bad is None or not (bad.missing_keys or bad.unexpected_keys or bad.incorrect_shapes), bad
    trained = torch.load(ckpt_path, weights_only=False)["students"]["r18"]
    loaded = model.state_dict()
    assert len(loaded) == len(trained)
    for key, value in trained.items():
        assert torch.equal(loaded[key.removeprefix("model.")], value), key

    with pytest.raises(ConfigError, match=r"--torchscript true: student 'r18' cannot be exported as TorchScript.*r18-last.pth"):
        export_student(str(ckpt_path), "r18", output=str(tmp_path / "refused"), torchscript=True)
    assert not (tmp_path / "refused" / "r18-last.pth").exists(), "nothing is written when the request cannot be met"
    # the config alone left from an earlier export is not replaced either
    path.unlink()
    config.write_text("# edited by hand\n")
    with pytest.raises(ConfigError, match=r"already holds an export of 'r18' \(r18-last.yaml\).*--overwrite true"):
        export_student(str(ckpt_path), "r18", output=str(out))
    assert config.read_text() == "# edited by hand\n" and not path.exists()
    assert export_student(str(ckpt_path), "r18", output=str(out), overwrite=True) == [path, config]
    assert get_cfg().load_cfg(config.read_text()).MODEL.RESNETS.DEPTH == 18


@needs_detectron2
def test_detectron2_macs_are_those_of_one_inference_pass_and_touch_no_state(shapes):
    task = make_task(shapes)
    info = task.setup(0)
    model = built(task, 18)  # BatchNorm trunk: running statistics that must not move
    assert_inference_macs(task, info, model, model.model.backbone)


def fake_detectron2(tmp_path, monkeypatch, origin):
    """A 'detectron2' distribution first on sys.path: one installed module and pip's
    direct_url.json record ``origin``; returns the module's installed path."""
    site = tmp_path / "site"
    (site / "fakepkg").mkdir(parents=True)
    info = site / "detectron2-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: detectron2\nVersion: 9.9\n")
    (info / "RECORD").write_text("fakepkg/__init__.py,,\ndetectron2-9.9.dist-info/METADATA,,\n")
    (info / "direct_url.json").write_text(json.dumps(origin))
    monkeypatch.syspath_prepend(str(site))
    return site / "fakepkg" / "__init__.py"


def test_versions_record_detectron2_and_the_commit_only_when_certain(tmp_path, monkeypatch):
    import importlib.metadata
    import subprocess

    from collab_distill.checkpoint import versions

    recorded = versions()
    if d2_adapter.detectron2_available():
        assert isinstance(recorded["detectron2"], str)
        commit = recorded["detectron2_commit"]
        assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)
    # a build from a local checkout: the checkout's HEAD while the installed files are its files
    source = tmp_path / "src"
    (source / "fakepkg").mkdir(parents=True)
    (source / "fakepkg" / "__init__.py").write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=source, check=True)
    subprocess.run([*git, "add", "."], cwd=source, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=source, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, check=True, capture_output=True, text=True).stdout.strip()
    installed = fake_detectron2(tmp_path, monkeypatch, {"url": source.as_uri(), "dir_info": {}})
    installed.write_text("x = 1\n")
    recorded = versions()
    assert (recorded["detectron2"], recorded["detectron2_commit"]) == ("9.9", head)
    installed.write_text("x = 2\n")  # built from a checkout that differed from its HEAD
    assert versions()["detectron2_commit"] is None
    monkeypatch.undo()
    # an editable install runs the checkout itself: its HEAD unless a tracked file was changed
    fake_detectron2(tmp_path / "editable", monkeypatch, {"url": source.as_uri(), "dir_info": {"editable": True}})
    assert versions()["detectron2_commit"] == head
    (source / "fakepkg" / "__init__.py").write_text("x = 3\n")
    assert versions()["detectron2_commit"] is None
    monkeypatch.undo()
    # pip's record of a git+https install
    fake_detectron2(tmp_path / "vcs", monkeypatch, {"url": "https://github.com/facebookresearch/detectron2.git",
                                                    "vcs_info": {"vcs": "git", "commit_id": "ab" * 20}})
    assert versions()["detectron2_commit"] == "ab" * 20
    monkeypatch.undo()
    # without detectron2: null, not an error
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "detectron2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    recorded = versions()
    assert recorded["detectron2"] is None and recorded["detectron2_commit"] is None
