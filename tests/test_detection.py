"""Detection through torchvision's Faster R-CNN: COCO-format data written by the test, shared
regions, per-image losses, COCO AP, the CLI (KD and MC-Distil), 2-process DDP and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from collab_distill.task import ConfigError
from collab_distill.tasks.detection import CocoDetection, FasterRCNN, ObjectDetection
from collab_distill.tasks.detection.shapes import write_shapes_coco
from collab_distill.tasks.detection.task import coco_box_ap
from conftest import REPO
from test_cli import run_cli

SMALL = {"rpn_post_nms_top_n_train": 200, "rpn_post_nms_top_n_test": 200, "box_batch_size_per_image": 64}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_coco(tmp_path_factory.mktemp("shapes"), train=30, val=8, size=96, seed=3)


def make_task(root, **kw):
    data = CocoDetection(root=str(root), batch_size=4, meta_fraction=0.2, val_fraction=0.2, **kw)
    return ObjectDetection(data, min_size=96, max_size=96, regions_per_image=16)


def built(task, size, fpn=32):
    torch.manual_seed(0)
    return task.build_model(FasterRCNN(size, fpn_channels=fpn, representation_size=64, **SMALL), task.info)


def test_coco_data_splits_and_category_ids(shapes):
    task = make_task(shapes)
    info = task.setup(0)
    assert info.num_classes == 3 and info.extra["categories"] == ["rectangle", "ellipse", "triangle"]
    parts = {k: set(v.image_ids) for k, v in task.data.splits.items()}
    assert not parts["train"] & parts["meta"] and not parts["train"] & parts["val"] and not parts["meta"] & parts["val"]
    assert len(parts["train"] | parts["meta"] | parts["val"]) == 30 and len(parts["test"]) == 8
    sample = task.dataset("train")[(0, 5)]
    assert sample["labels"].min() >= 1 and sample["labels"].max() <= 3  # 0 is torchvision's background
    assert task.data.category_id(torch.tensor([1, 2, 3])).tolist() == [1, 3, 7]
    again = task.dataset("train")[(0, 5)]
    assert torch.equal(sample["image"], again["image"]) and torch.equal(sample["boxes"], again["boxes"])  # seeded flip


def test_shared_region_logits_line_up_across_models(shapes):
    task = make_task(shapes)
    task.setup(0)
    teacher, small, larger = built(task, "s", 64).eval(), built(task, "xxs"), built(task, "xs")
    batch = task.collate([task.dataset("train")[(i, i)] for i in range(3)])
    context = task.shared_context(batch, {"t": teacher}, {"a": small, "b": larger})
    records = [task.knowledge(m, batch, context=context) for m in (teacher, small, larger)]
    units = len(context.unit_image)
    assert units == sum(len(r) for r in context.regions) and units >= 3 * 1
    for r in records:
        assert r.logits.shape == (units, 4)  # 3 classes + background in the last column
        assert torch.equal(r.unit_image, context.unit_image) and torch.equal(r.unit_labels, context.unit_labels)
        assert r.supervised_loss.shape == (3,)
    assert torch.all(records[0].supervised_loss == 0), "a frozen teacher computes no supervised loss"
    assert torch.all(records[1].supervised_loss > 0)
    # the ground-truth boxes are shared regions: each takes its own class
    gt_labels = torch.cat([t["labels"] - 1 for t in batch["targets"]])
    assert set(gt_labels.tolist()) <= set(context.unit_labels.tolist())
    # the teacher's cached features give the same logits as recomputing them
    context.source = None
    assert torch.allclose(task.knowledge(teacher, batch, context=context).logits, records[0].logits, atol=1e-5)


def test_per_image_losses_average_to_torchvisions_batch_loss(shapes):
    task = make_task(shapes)
    task.setup(0)
    model = built(task, "xs")
    batch = task.collate([task.dataset("train")[(i, 10 + i)] for i in range(4)])
    context = task.shared_context(batch, {}, {"m": model})
    record = task.knowledge(model, batch, context=context)
    model.detector.transform.eval()  # in train mode it draws a random size (one choice here), shifting the RNG
    torch.manual_seed(context.seed)  # the same region sampling as the adapter's
    losses = model.detector(list(batch["images"]), [dict(t) for t in batch["targets"]])
    assert record.supervised_loss.mean().item() == pytest.approx(sum(losses.values()).item(), rel=1e-4)


def test_coco_box_ap_is_100_for_the_ground_truth_and_0_without_detections(shapes):
    task = make_task(shapes)
    task.setup(0)
    gt = task.data.ground_truth("test")
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    assert coco_box_ap(gt, perfect)["AP"] == pytest.approx(100.0)
    assert coco_box_ap(gt, [])["AP"] == 0.0


def tiny_args(root, data, name, epochs=1, extra=()):
    return ["fit", "--config", str(REPO / "examples" / "coco_tiny.yaml"), "--trainer.root_dir", str(root),
            "--trainer.name", name, "--trainer.max_epochs", str(epochs), "--trainer.progress_bar", "false",
            "--task.init_args.data.init_args.root", str(data), "--task.init_args.min_size", "96",
            "--task.init_args.max_size", "96", "--cohort.teachers.teacher.train_epochs", "1", *extra]


@pytest.mark.slow
def test_tiny_cohort_fits_with_kd_and_with_mc_distil(tmp_path, cli_env, shapes):
    run_cli(tiny_args(tmp_path, shapes, "kd"), cli_env, timeout=600)
    results = json.loads((tmp_path / "kd" / "version_0" / "results.json").read_text())
    assert results["selection_metric"] == "AP" and set(results["students"]) == {"xxs", "xs", "s"}
    for r in results["students"].values():
        assert 0 <= r["last"]["test_AP"] <= 100 and "test_AP50" in r["last"] and "val_AP" in r["best_on_val"]
    run_cli(tiny_args(tmp_path, shapes, "mc", extra=(
        "--config", str(REPO / "examples" / "methods" / "mc_distil_detection.yaml"),
        "--meta.every_n_steps", "2", "--trainer.warmup_epochs", "0",
        "--trainer.loggers", "[csv]", "--trainer.log_every_n_steps", "1",
        "--cohort.teachers.teacher.checkpoint", str(tmp_path / "kd" / "version_0" / "teachers" / "teacher" / "teacher.pt"),
        "--cohort.teachers.teacher.train_epochs", "0")), cli_env, timeout=600)
    run = tmp_path / "mc" / "version_0"
    metrics = (run / "logs" / "csv" / "metrics.csv").read_text()
    assert "train/meta/loss" in metrics and "train/xxs/gamma" in metrics
    assert (run / "plugins" / "cnet" / "val_extremes.png").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["meta_optimizers"]["cnet"]["state"], "the exact meta step (through the detectors) updated the C-Net"


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_detection_keeps_ranks_identical(tmp_path, cli_env, shapes):
    extra = ["--trainer.devices", "2", "--trainer.strategy", "ddp",
             "--config", str(REPO / "examples" / "methods" / "mc_distil_detection.yaml"),
             "--meta.every_n_steps", "2", "--trainer.warmup_epochs", "0",
             "--plugins+", json.dumps({"class_path": "support_plugins.WeightChecksums"})]
    run_cli(tiny_args(tmp_path, shapes, "ddp", extra=extra), cli_env, timeout=900)
    assert_ranks_identical(tmp_path / "ddp" / "version_0")


def assert_ranks_identical(run):
    """Both ranks of a 2-process run ended with the same weights (C-Net included) and it finished."""
    sums = [json.loads((run / f"checksums_rank{r}.json").read_text()) for r in (0, 1)]
    assert sums[0]["world_size"] == 2 and sums[0] == sums[1] and "meta:cnet" in sums[0]
    assert json.loads((run / "results.json").read_text())["status"] == "finished"


def _expect_error(tmp_path, capsys, data, *fragments, extra=()):
    """The CLI (in-process: the errors come before any work) stops with exit code 2 and a
    message holding ``fragments``."""
    from collab_distill.cli import main

    capsys.readouterr()
    rc = main(tiny_args(tmp_path / "runs", data, "bad", extra=extra))
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    for fragment in fragments:
        assert fragment in err, err[-2000:]
    assert not (tmp_path / "runs" / "bad" / "version_0" / "checkpoints").exists()


@pytest.mark.slow
def test_bad_detection_input_fails_before_training(tmp_path, capsys, shapes):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    ann = data / "annotations" / "instances_train2017.json"
    original = ann.read_text()
    ann.unlink()
    _expect_error(tmp_path, capsys, data, "train_annotations", "does not exist")
    doc = json.loads(original)
    ann.write_text(json.dumps({**doc, "images": []}))
    _expect_error(tmp_path, capsys, data, "lists no images")
    ann.write_text(original)
    (data / "train2017" / doc["images"][2]["file_name"]).unlink()
    _expect_error(tmp_path, capsys, data, "not in", doc["images"][2]["file_name"])
    shutil.copy(shapes / "train2017" / doc["images"][2]["file_name"], data / "train2017")
    val = data / "annotations" / "instances_val2017.json"
    vdoc = json.loads(val.read_text())
    val.write_text(json.dumps({**vdoc, "categories": vdoc["categories"][:2],
                               "annotations": [a for a in vdoc["annotations"] if a["category_id"] != 7]}))
    _expect_error(tmp_path, capsys, data, "category ids", "differ")
    val.write_text(json.dumps(vdoc))
    # a teacher trained for other classes
    other = make_task(shapes)
    other.setup(0)
    info = type(other.info)(num_classes=5, extra=other.info.extra)
    teacher = FasterRCNN("m", fpn_channels=64, representation_size=256).build(info)
    torch.save(teacher.state_dict(), tmp_path / "teacher5.pt")
    _expect_error(tmp_path, capsys, data, "cohort.teachers.teacher.checkpoint", "classes",
                  extra=("--cohort.teachers.teacher.checkpoint", str(tmp_path / "teacher5.pt"),
                         "--cohort.teachers.teacher.train_epochs", "0"))


@pytest.mark.parametrize(("change", "fragments"), [
    ({"bbox": [1.0, 2.0, 3.0]}, ["bbox [1.0, 2.0, 3.0]", "four finite numbers"]),
    ({"bbox": [1.0, 2.0, "wide", 4.0]}, ["four finite numbers"]),
    ({"bbox": None}, ["bbox None", "four finite numbers"]),
    ({"bbox": [10.0, 10.0, -5.0, 8.0]}, ["negative width or height", "not corners"]),
    ({"bbox": [900.0, 900.0, 20.0, 20.0]}, ["entirely outside its 96x96 image"]),
    ({"bbox": ...}, ["has no ['bbox'] key(s)", "image_id, category_id and bbox"]),
])
def test_a_malformed_coco_annotation_is_one_error_naming_it(tmp_path, shapes, change, fragments):
    from collab_distill.tasks.detection.data import CocoIndex

    doc = json.loads((shapes / "annotations" / "instances_train2017.json").read_text())
    first = doc["annotations"][0]
    for key, value in change.items():
        if value is ...:
            del first[key]
        else:
            first[key] = value
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        CocoIndex.load(path, shapes / "train2017", "CocoDetection.train_annotations")
    message = str(err.value)
    assert message.startswith(f"CocoDetection.train_annotations: annotation {first['id']} in {str(path)!r}")
    for fragment in fragments:
        assert fragment in message, message


def test_detector_factory_rejects_unknown_backbones():
    with pytest.raises(ConfigError, match="resnet18"):
        FasterRCNN("resnet19")


def assert_inference_macs(task, info, model, trunk):
    """``count_macs`` of a detector on the task's example counts one inference pass (more than
    its ``trunk`` alone), the same every time, and moves no BatchNorm statistic, mode or RNG."""
    from collab_distill.profiling import count_macs

    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    macs = count_macs(model, task.example_input(info))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    # the deployed pass (backbone, RPN, box head over the kept proposals) costs more than the trunk alone
    assert isinstance(macs, int) and macs > count_macs(trunk, torch.zeros(1, 3, *info.image_size)) > 0
    assert count_macs(model, task.example_input(info)) == macs


def test_detection_macs_are_those_of_one_inference_pass_and_touch_no_state(shapes):
    task = make_task(shapes)
    info = task.setup(0)
    model = built(task, "xs")  # BatchNorm trunk: running statistics that must not move
    assert_inference_macs(task, info, model, model.detector.backbone)


@pytest.mark.slow
def test_torchvision_student_exports_the_detectors_own_state_dict(tmp_path, cli_env, shapes):
    """`collab-distill export` of a torchvision student writes the Faster R-CNN's own state dict
    (without the wrapper's `detector.` prefix), which the detector loads strictly; no TorchScript
    / torch.export file, one note saying why, exit 0. models.json has every member's MACs."""
    from collab_distill.task import TaskInfo

    options = {"backbone": "xs", "fpn_channels": 32, "representation_size": 64, **SMALL}
    student = {"xs": {"class_path": "collab_distill.tasks.detection.FasterRCNN", "init_args": options}}
    plugins = [{"class_path": "collab_distill.plugins.fixed_weights.FixedLossWeights", "init_args": {"alpha": 1.0, "beta": 0.0}}]
    run_cli(tiny_args(tmp_path, shapes, "export", extra=(
        "--cohort.teachers", "{}", "--cohort.students", json.dumps(student), "--plugins", json.dumps(plugins),
        "--trainer.limit_train_batches", "2", "--trainer.limit_eval_batches", "1")), cli_env, timeout=600)
    run = tmp_path / "export" / "version_0"
    summary = json.loads((run / "models.json").read_text())
    assert all(isinstance(m["macs"], int) and m["macs"] > 0 for m in summary.values()), summary
    ckpt_path = run / "checkpoints" / "last.ckpt"
    proc = run_cli(["export", "--ckpt_path", str(ckpt_path), "--student", "xs", "--output", str(tmp_path / "out")], cli_env)
    path = tmp_path / "out" / "xs-last.pt"
    assert proc.stdout.split() == [str(path)] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["xs-last.pt"]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "TorchScript / torch.export" in notes[0] and "xs-last.pt is the deployable file" in notes[0]
    detector = FasterRCNN(**options).build(TaskInfo(num_classes=3)).detector
    detector.load_state_dict(torch.load(path, weights_only=True))  # strict: no missing or unexpected key
    trained = torch.load(ckpt_path, weights_only=False)["students"]["xs"]
    loaded = detector.state_dict()
    assert len(loaded) == len(trained)
    for key, value in trained.items():
        assert torch.equal(loaded[key.removeprefix("detector.")], value), key
