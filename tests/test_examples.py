"""Every YAML in examples/ runs: a short fit of each on small data written to disk by the test."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, digits_args
from test_classification_data import make_cifar100, make_folder, make_tiny
from test_cli import run_cli

pytestmark = pytest.mark.slow

QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.progress_bar", "false",
         "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.loggers", "[csv]"]


def data_args(root, batch=8, checksums=None):
    out = ["--task.init_args.data.init_args.root", str(root),
           "--task.init_args.data.init_args.batch_size", str(batch),
           "--task.init_args.data.init_args.num_workers", "0"]
    if checksums is not None:
        out += ["--task.init_args.data.init_args.verify_checksums", checksums]
    return out


def finished(run_root, name):
    results = json.loads((run_root / name / "version_0" / "results.json").read_text())
    assert results["status"] == "finished"
    return results


def test_cifar100_teacher_then_cohort(tmp_path, cli_env):
    """The paper's two-step recipe: train the teacher with CE, then distil from its checkpoint."""
    make_cifar100(tmp_path / "data", n_train=80, n_test=20)
    runs = tmp_path / "runs"
    common = [*QUICK, *data_args(tmp_path / "data", checksums="false"), "--trainer.root_dir", str(runs)]
    run_cli(["fit", "--config", str(REPO / "examples" / "cifar100_teacher.yaml"), *common], cli_env)
    teacher = runs / "cifar100_teacher" / "version_0" / "checkpoints" / "last.ckpt"
    run_cli(["fit", "--config", str(REPO / "examples" / "cifar100.yaml"), *common,
             "--cohort.teachers.teacher.checkpoint", str(teacher)], cli_env)
    results = finished(runs, "cifar100")
    assert set(results["students"]) == {"xxs", "xs", "s", "m"}
    assert results["teachers"]["teacher"]["params"] > 4_000_000  # ResNet10 for 100 classes


def test_cifar100_short_recipe_composes_with_mc_distil(tmp_path, cli_env):
    """The reduced Table-1 recipe: teacher trained in the run, CE warm-up, MC-Distil on top."""
    make_cifar100(tmp_path / "data", n_train=80, n_test=20)
    run_cli(["fit", "--config", str(REPO / "examples" / "cifar100.yaml"),
             "--config", str(REPO / "examples" / "cifar100_short.yaml"),
             "--config", str(REPO / "examples" / "methods" / "mc_distil.yaml"), *QUICK,
             *data_args(tmp_path / "data", checksums="false"), "--trainer.root_dir", str(tmp_path / "runs"),
             "--cohort.teachers.teacher.train_epochs", "1", "--trainer.warmup_epochs", "0", "--meta.every_n_steps", "1"], cli_env)
    results = finished(tmp_path / "runs", "cifar100_short")
    assert set(results["students"]) == {"xxs", "xs", "s", "m"}
    run = tmp_path / "runs" / "cifar100_short" / "version_0"
    assert (run / "teachers" / "teacher" / "teacher.pt").is_file()
    assert (run / "plugins" / "cnet" / "val_extremes.png").is_file()


def test_tiny_imagenet_example(tmp_path, cli_env):
    make_tiny(tmp_path / "data", per_class=8)
    from collab_distill.task import TaskInfo
    from collab_distill.tasks.classification import ResNet

    teacher = tmp_path / "teacher.pt"
    torch.save(ResNet("resnet18").build(TaskInfo(num_classes=3, in_channels=3, image_size=(64, 64))).state_dict(), teacher)
    run_cli(["fit", "--config", str(REPO / "examples" / "tiny_imagenet.yaml"), *QUICK, *data_args(tmp_path / "data", batch=4),
             "--trainer.root_dir", str(tmp_path / "runs"), "--cohort.teachers.teacher.checkpoint", str(teacher)], cli_env)
    finished(tmp_path / "runs", "tiny_imagenet")


def test_imagefolder_example(tmp_path, cli_env):
    make_folder(tmp_path / "data", n_train=8, n_test=3)
    run_cli(["fit", "--config", str(REPO / "examples" / "imagefolder.yaml"), *QUICK, *data_args(tmp_path / "data", batch=4),
             "--trainer.root_dir", str(tmp_path / "runs"), "--cohort.teachers.teacher.train_epochs", "1"], cli_env)
    results = finished(tmp_path / "runs", "imagefolder")
    assert set(results["students"]) == {"mobilenet", "s"}


#: self-boosting of multi-exit students (teacherless too)
SELF_BOOSTING = ["dsn", "sd", "sd_hint", "metadistiller"]
TEACHERLESS = ["dml", "kdcl_naive", "kdcl_linear", "kdcl_minlogit", "kdcl_general", *SELF_BOOSTING]


@pytest.mark.parametrize("method", ["ce", "kd", "mc_distil", "mc_distil_nops", "meta_distil", "rmc", "fitnets", "attention",
                                    "dkd", *TEACHERLESS])
def test_method_files_compose_with_digits(tmp_path, cli_env, method):
    run_cli([*digits_args(tmp_path, method, epochs=1), "--config", str(REPO / "examples" / "methods" / f"{method}.yaml"),
             "--trainer.limit_train_batches", "3"], cli_env)
    cfg = (tmp_path / method / "version_0" / "config.yaml").read_text()
    assert ("beta: 0.0" in cfg) == (method == "ce" or method in TEACHERLESS)
    results = finished(tmp_path, method)
    # online methods drop the digits config's teacher: it is neither trained nor loaded
    assert (results["teachers"] == {}) == (method in TEACHERLESS)
    assert (tmp_path / method / "version_0" / "teachers").exists() == (method not in TEACHERLESS)
    if method in SELF_BOOSTING:
        # digits.yaml's three sizes, each a multi-exit net, scored exit by exit and as an ensemble
        models = {n: s["model"] for n, s in results["students"].items()}
        assert models == {n: f"MultiExit(ResNet({n}))" for n in ("xxs", "xs", "s")}
        for student in results["students"].values():
            for weights in ("last", "best_on_val"):
                metrics = student[weights]
                expected = {"test_top1", "test_ensemble_top1", "test_ensemble_top5", "test_exit1_top1", "test_exit4_top1"}
                assert expected <= set(metrics)
                assert metrics["test_exit4_top1"] == metrics["test_top1"]  # the last exit is the deployed model
        # only MetaDistiller has a meta module, trained from the first step (epoch 1 is a meta epoch)
        state = torch.load(tmp_path / method / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
        assert set(state["meta_modules"]) == ({"label_generator"} if method == "metadistiller" else set())
        logs = (tmp_path / method / "version_0" / "logs" / "csv" / "metrics.csv").read_text()
        assert ("train/meta/loss" in logs) == (method == "metadistiller")
    if method == "dsn":
        # a multi-exit student deploys as its plain network: the exported program returns logits only
        run_cli(["export", "--ckpt_path", str(tmp_path / method / "version_0" / "checkpoints" / "last.ckpt"),
                 "--student", "xs", "--output", str(tmp_path / "export")], cli_env)
        program = torch.export.load(str(tmp_path / "export" / "xs-last.pt2"))
        out = program.module()(torch.zeros(2, 1, 8, 8))
        assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
        scripted = torch.jit.load(str(tmp_path / "export" / "xs-last.torchscript.pt"))
        assert torch.allclose(scripted(torch.zeros(2, 1, 8, 8)), out, atol=1e-5)


def test_kdcl_views_give_each_student_its_own_augmentation_and_general_refreshes_its_weights(tmp_path, cli_env):
    methods = REPO / "examples" / "methods"
    run_cli([*digits_args(tmp_path, "icl", epochs=2), "--config", str(methods / "kdcl_general.yaml"),
             "--config", str(methods / "kdcl_views.yaml"), "--trainer.limit_train_batches", "3"], cli_env)
    run = tmp_path / "icl" / "version_0"
    assert "views: 3" in (run / "config.yaml").read_text()
    finished(tmp_path, "icl")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["plugins"]["kdcl"]["weights"]
    assert set(state) == {"xxs", "xs", "s"} and abs(sum(state.values()) - 1) < 1e-6
    assert state != {s: 1 / 3 for s in state}  # measured on the meta split after each epoch (eq. 10-11)
    header = (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "kdcl/weight/xxs" in header


@pytest.mark.parametrize("method", ["takd", "dgkd"])
def test_staged_method_files_compose_with_digits(tmp_path, cli_env, method):
    run_cli([*digits_args(tmp_path, method, epochs=1), "--config", str(REPO / "examples" / "methods" / f"{method}.yaml"),
             "--trainer.limit_train_batches", "2"], cli_env)
    results = finished(tmp_path, method)
    assert set(results["students"]) == {"xxs", "xs", "s"}
    guides = {"takd": ["xs"], "dgkd": ["teacher", "s", "xs"]}[method]
    assert results["stages"][-1]["teachers"] == guides
