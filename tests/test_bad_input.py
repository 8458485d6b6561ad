"""Bad input stops a run with ONE clear message that names the offending field or file and says
how to fix it, before any work is lost or any file is overwritten.

Most cases call :func:`collab_distill.cli.main` in-process; a few run the real ``collab-distill``
command to check the exit code and that no Python traceback reaches the user.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from collab_distill.cli import main
from collab_distill.cluster import launching_environment
from collab_distill.tasks.classification.models import RESNET_FAMILY, ResNetCifar
from tiny_config import RESNET, tiny_digits_yaml

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # bad_input_plugins is importable by class_path

FIXED = "collab_distill.plugins.fixed_weights.FixedLossWeights"
NONFINITE = "bad_input_plugins.NonFiniteLossWeights"
FAILS = "bad_input_plugins.FailsToStart"

# one tiny student on 200 digits, one epoch, no loggers: a good run takes a few seconds
BASE = tiny_digits_yaml()


def _image_folder(root: Path, classes: tuple[str, ...], per_class: int = 5) -> Path:
    """A tiny ImageFolderData tree: ``root/{train,test}/<class>/*.png`` (8x8 RGB noise)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _image_data(root: str) -> str:
    """``--task.init_args.data`` for an ImageFolderData at ``root`` (subset: null drops BASE's subset)."""
    init_args = f"{{root: {root}, image_size: 8, subset: null}}"
    return f"{{class_path: collab_distill.tasks.classification.ImageFolderData, init_args: {init_args}}}"


def _teacher(size: str, checkpoint: str | None = None, train_epochs: int | None = None) -> str:
    fields = [f"model: {{class_path: {RESNET}, init_args: {{size: {size}}}}}"]
    if checkpoint is not None:
        fields.append(f"checkpoint: {checkpoint}")
    if train_epochs is not None:
        fields.append(f"train_epochs: {train_epochs}")
    return "{t: {" + ", ".join(fields) + "}}"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Config files and checkpoint files, written once for the module."""
    d = tmp_path_factory.mktemp("inputs")
    out = {"base": d / "base.yaml", "typo": d / "typo.yaml", "dup": d / "dup.yaml"}
    out["base"].write_text(BASE)
    out["typo"].write_text("trainer:\n  max_epoch: 2\n")
    out["dup"].write_text(
        "cohort:\n  students:\n"
        f"    s: {{class_path: {RESNET}, init_args: {{size: xxxs}}}}\n"
        f"    s: {{class_path: {RESNET}, init_args: {{size: xxs}}}}\n"
    )
    widths, blocks = RESNET_FAMILY["s"]
    torch.manual_seed(0)
    out["s10"] = d / "resnet_s_10classes.pt"  # fits a ResNet 's' on digits
    torch.save(ResNetCifar(widths, blocks, num_classes=10, in_channels=1).state_dict(), out["s10"])
    out["s100"] = d / "resnet_s_100classes.pt"  # the same architecture, saved for 100 classes
    torch.save(ResNetCifar(widths, blocks, num_classes=100, in_channels=1).state_dict(), out["s100"])
    out["pkl"] = d / "model_final.pkl"  # a plain pickle of numpy arrays, as detectron2's model zoo ships weights
    with open(out["pkl"], "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in torch.load(out["s10"]).items()}, "__author__": "test"}, f)
    out["garbage"] = d / "garbage.ckpt"
    out["garbage"].write_bytes(b"this is not a torch file\n")
    out["empty_dir"] = d / "empty_data"
    out["empty_dir"].mkdir()
    out["broken"] = d / "broken.yaml"  # the '[' of line 2 is never closed
    out["broken"].write_text("trainer:\n  max_epochs: [1\nseed: 0\n")
    out["empty_yaml"] = d / "empty.yaml"
    out["empty_yaml"].write_text("# nothing but a comment\n")
    out["list_yaml"] = d / "list.yaml"
    out["list_yaml"].write_text("- trainer\n- seed\n")
    out["section_list"] = d / "section_list.yaml"
    out["section_list"].write_text("trainer:\n  - max_epochs\n  - 1\n")
    out["utf16"] = d / "utf16.yaml"
    out["utf16"].write_bytes("trainer:\n  max_epochs: 1\n".encode("utf-16"))
    out["binary"] = d / "binary.yaml"
    out["binary"].write_bytes(bytes(range(256)) * 4)
    out["one_class"] = _image_folder(d / "one_class", ("cat",))
    out["three_classes"] = _image_folder(d / "three_classes", ("cat", "dog", "eel"))
    out["corrupt"] = _image_folder(d / "corrupt", ("cat", "dog"))
    (out["corrupt"] / "train" / "dog" / "bad.png").write_bytes(b"not an image\n")
    whole = (out["corrupt"] / "test" / "cat" / "0.png").read_bytes()
    (out["corrupt"] / "test" / "cat" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return out


def _call(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exit_:  # argparse's --help/--version, or an error that escaped main
        return int(exit_.code or 0)


@pytest.fixture(scope="module")
def good_run(files, tmp_path_factory) -> Path:
    """A finished run ``good/version_0`` with its last.ckpt (for --resume and overwrite checks)."""
    root = tmp_path_factory.mktemp("good_runs")
    assert _call(["fit", "--config", str(files["base"]), "--trainer.root_dir", str(root), "--trainer.name", "good"]) == 0
    run = root / "good" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "results.json").is_file()
    return run


def _fit(capsys, files, root: Path, *extra: str, name: str = "bad") -> tuple[int, str]:
    capsys.readouterr()
    rc = _call(["fit", "--config", str(files["base"]), "--trainer.root_dir", str(root), "--trainer.name", name, *extra])
    return rc, capsys.readouterr().err


def _assert_one_error(err: str, needles: tuple[str, ...]) -> None:
    assert "Traceback" not in err, err
    assert "usage:" not in err, err  # one message, not a page of usage
    assert err.count("error:") == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


def _nothing_written(root: Path) -> bool:
    return not root.exists() or not any(root.iterdir())


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# (id, extra arguments, texts the message must contain: the field or file, and the fix[, a pytest mark]).
# "{name}" is replaced by the path of the module's input file of that name.
CASES = [
    ("unknown_plugin_class_path",
     ["--plugins", f"[{{class_path: {FIXED[:-1]}}}]"],
     ['Parser key "plugins"', "FixedLossWeight'", f"did you mean {FIXED}?", "collab-distill fit --help"]),
    ("plugin_that_is_not_a_plugin",
     ["--plugins", "[{class_path: torch.nn.Linear}]"],
     ['Parser key "plugins"', "not correspond to a subclass of Plugin", "known: collab_distill.plugins.", FIXED]),
    ("unknown_model_class",
     ["--cohort.students", "{s: {class_path: ResNett}}"],
     ['Parser key "cohort.students"', "ResNett", "did you mean collab_distill.tasks.classification.models.ResNet?"]),
    ("unknown_init_arg",
     ["--cohort.students.s.init_args.sise", "m"],
     ['Parser key "cohort.students"', "Option 'sise' is not accepted", "did you mean `size`?", "ResNet accepts init_args: size"]),
    ("unknown_resnet_size",
     ["--cohort.students.s.init_args.size", "xxl"],
     ["cohort.students.s: Unknown ResNet size 'xxl'", "Valid names: xxxs, xxs"]),
    ("unknown_torchvision_model",
     ["--cohort.students",
      "{s: {class_path: collab_distill.tasks.classification.TorchvisionModel, init_args: {name: resnet81}}}"],
     ["cohort.students.s: Unknown torchvision classification model 'resnet81'", "Did you mean 'resnet18'"]),
    ("wrong_type",
     ["--trainer.max_epochs", "ten"],
     ['Parser key "trainer.max_epochs"', "Expected a <class 'int'>", "Got value: ten", "collab-distill fit --help"]),
    ("value_out_of_range",
     ["--trainer.max_epochs", "0"],
     ["trainer.max_epochs=0", "must be >= 1"]),
    ("run_name_escaping_root_dir",
     ["--trainer.name", "../../escaped"],
     ["trainer.name='../../escaped'", "inside trainer.root_dir", "--trainer.root_dir"]),
    ("negative_gradient_clip",
     ["--trainer.gradient_clip", "-1"],
     ["trainer.gradient_clip=-1", "must be > 0", "null (no clipping)"]),
    ("topk_beyond_the_classes",
     ["--task.init_args.topk", "[1, 20]"],
     ["task.topk=[1, 20]", "has 10 classes", "always 100 %"]),
    ("fp16_on_the_cpu",
     ["--trainer.precision", "16-mixed", "--trainer.accelerator", "cpu"],
     ["trainer.precision=16-mixed needs a GPU", "bf16-mixed or 32-true"]),
    ("empty_config_file",
     ["--config", "{empty_yaml}"],
     ["{empty_yaml}", "the config file is empty"]),
    ("config_file_whose_top_level_is_a_list",
     ["--config", "{list_yaml}"],
     ["{list_yaml}", "top level is a list, not a mapping"]),
    ("config_section_given_a_list",
     ["--config", "{section_list}"],
     ["{section_list}", "section `trainer` (line 1) is a list, not a mapping", "indented `key: value` lines"]),
    ("config_file_saved_as_utf16",
     ["--config", "{utf16}"],
     ["{utf16}", "is UTF-16 text, not UTF-8", "saved as UTF-8"]),
    ("config_file_that_is_binary",
     ["--config", "{binary}"],
     ["{binary}", "is not UTF-8 text (a binary file?)", "byte 0x80 at position 128", "saved as UTF-8"]),
    ("optimizer_lr_beyond_float32",
     ["--optimizer.init_args.lr", "1e300"],
     ["optimizer: torch.optim.SGD", "lr=1e+300 is beyond float32's largest number", "Fix optimizer.init_args.lr"]),
    ("optimizer_whose_step_needs_a_closure",
     ["--optimizer", "{class_path: torch.optim.LBFGS}"],
     ["optimizer: LBFGS.step() needs a closure", "set optimizer to an optimizer whose step() takes no arguments"]),
    ("cosine_schedule_negative_warmup",
     ["--schedule.init_args.warmup_epochs", "-1"],
     ["schedule.init_args.warmup_epochs=-1", "must be >= 0"]),
    ("cosine_schedule_min_factor_below_zero",
     ["--schedule.init_args.min_factor", "-0.5"],
     ["schedule.init_args.min_factor=-0.5", "between 0 and 1"]),
    ("cosine_schedule_min_factor_above_one",
     ["--schedule.init_args.min_factor", "2"],
     ["schedule.init_args.min_factor=2.0", "between 0 and 1"]),
    ("multistep_schedule_negative_gamma",
     ["--schedule", "{class_path: collab_distill.optim.MultiStep, init_args: {milestones: [1], gamma: -1}}"],
     ["schedule.init_args.gamma=-1.0", "must be > 0"]),
    ("meta_fd_epsilon_zero",
     ["--meta.fd_epsilon", "0"],
     ["meta.fd_epsilon=0.0", "must be > 0"]),
    ("meta_fd_epsilon_negative",
     ["--meta.fd_epsilon", "-1"],
     ["meta.fd_epsilon=-1.0", "must be > 0"]),
    ("meta_grad_clip_zero",
     ["--meta.grad_clip", "0"],
     ["meta.grad_clip=0.0", "must be > 0", "or null (no clipping)"]),
    ("meta_grad_clip_negative",
     ["--meta.grad_clip", "-1"],
     ["meta.grad_clip=-1.0", "must be > 0"]),
    ("run_name_longer_than_a_file_name",
     ["--trainer.name", "n" * 300],
     ["trainer.name: the folder name 'nnnn", "has 300 characters", "give a shorter --trainer.name"]),
    ("root_dir_longer_than_a_path",
     ["--trainer.root_dir", "{empty_dir}/" + "/".join(["d" * 200] * 25)],
     ["trainer.root_dir and trainer.name make the path", "give a shorter --trainer.root_dir"]),
    ("root_dir_given_empty",
     ["--trainer.root_dir", ""],
     ["trainer.root_dir='' is empty", "--trainer.root_dir runs"]),
    ("detector_student_on_image_classification",
     ["--cohort.students", "{s: {class_path: collab_distill.tasks.detection.FasterRCNN, init_args: {backbone: xxs}}}"],
     ["cohort.students.s: FasterRCNN(xxs-FPN256)", "fails on ImageClassification(Digits)'s input",
      "a [1, 1, 8, 8] float32 tensor", "AssertionError", "choose a model made for this task"]),
    ("teacher_cache_dir_that_is_a_file",
     ["--cohort.teachers", _teacher("xxxs", train_epochs=1).replace("train_epochs: 1", "train_epochs: 1, cache_dir: {garbage}")],
     ["cohort.teachers.t.cache_dir=", "garbage.ckpt' is a file, not a folder", "--cohort.teachers.t.cache_dir DIR"]),
    ("teacher_with_checkpoint_and_train_epochs",
     ["--cohort.teachers", _teacher("s", "{s10}", train_epochs=1)],
     ["cohort.teachers.t: both a `checkpoint`", "`train_epochs: 1`", "remove train_epochs to use the checkpoint"]),
    ("stages_given_empty",
     ["--stages", "[]"],
     ["stages is an empty list", "stages: null (the default)"]),
    ("num_nodes_two_without_a_cluster_launch",
     ["--trainer.num_nodes", "2"],
     ["trainer.num_nodes=2", "not launched as one node of 2", "torchrun --nnodes 2", "--trainer.num_nodes 1"],
     pytest.mark.skipif(launching_environment() is not None, reason="launched as one node of several")),
    ("data_root_is_a_file",
     ["--task.init_args.data",
      "{class_path: collab_distill.tasks.classification.CIFAR100, init_args: {root: {garbage}}}"],
     ["CIFAR100.root", "garbage.ckpt' is a file, not a folder", "Set root to the folder"]),
    ("negative_seed",
     ["--seed", "-5"],
     ["seed=-5", "between 0 and 4294967295"]),
    ("misspelt_option_is_not_an_abbreviation",
     ["--trainer.max_epoch", "2"],
     ["--trainer.max_epoch", "did you mean `trainer.max_epochs`?"]),
    ("unknown_key_in_yaml",
     ["--config", "{typo}"],
     ["'trainer.max_epoch'", "did you mean `trainer.max_epochs`?"]),
    ("duplicate_member_in_yaml",
     ["--config", "{dup}"],
     ["{dup}", "'cohort.students.s' is given twice (lines 3 and 4)", "distinct name"]),
    ("teacher_named_like_a_student",
     ["--cohort.teachers", _teacher("s", "{s10}").replace("{t:", "{s:")],
     ["cohort:", "['s'] named both as student and as teacher", "distinct names"]),
    ("bad_member_name",
     ["--cohort.students", f"{{'a b': {{class_path: {RESNET}}}}}"],
     ["member name 'a b'", "letters, digits"]),
    ("missing_data_folder",
     ["--task.init_args.data",
      "{class_path: collab_distill.tasks.classification.CIFAR100, init_args: {root: {empty_dir}/nowhere}}"],
     ["CIFAR100.root", "nowhere' does not exist", "Set root to the folder that contains cifar-100-python/"]),
    ("data_folder_without_layout",
     ["--task.init_args.data", "{class_path: collab_distill.tasks.classification.CIFAR100, init_args: {root: {empty_dir}}}"],
     ["CIFAR100.root", "has no cifar-100-python/ folder", "Expected layout: root/cifar-100-python/{train,test,meta}"]),
    ("image_folder_without_layout",
     ["--task.init_args.data",
      "{class_path: collab_distill.tasks.classification.ImageFolderData, init_args: {root: {empty_dir}}}"],
     ["ImageFolderData.train_dir", "does not exist", "Expected layout: root/train/<class>/"]),
    ("teacher_checkpoint_of_another_architecture",
     ["--cohort.teachers", _teacher("m", "{s10}")],
     ["cohort.teachers.t.checkpoint", "{s10}", "does not fit the configured model", "Configure the architecture"]),
    ("teacher_checkpoint_for_another_class_count",
     ["--cohort.teachers", _teacher("s", "{s100}")],
     ["cohort.teachers.t.checkpoint", "{s100}", "saved for 100 classes but the model is built for 10"]),
    ("teacher_without_checkpoint_or_training",
     ["--cohort.teachers", _teacher("s", train_epochs=0)],
     ["cohort.teachers.t", "give a `checkpoint` to load, `train_epochs` > 0"]),
    ("missing_teacher_checkpoint",
     ["--cohort.teachers", _teacher("s", "{empty_dir}/teacher.pt")],
     ["cohort.teachers.t.checkpoint", "teacher.pt' does not exist", "Fix the path"]),
    ("teacher_checkpoint_is_a_plain_pickle",
     ["--cohort.teachers", _teacher("s", "{pkl}")],
     ["cohort.teachers.t.checkpoint", "{pkl}", "is a plain pickle, not a torch file", "model.init_args.weights"]),
    ("teacher_checkpoint_not_a_torch_file",
     ["--cohort.teachers", _teacher("s", "{garbage}")],
     ["cohort.teachers.t.checkpoint", "{garbage}", "cannot be read as a torch file", "written by torch.save"]),
    ("student_checkpoint_for_unknown_student",
     ["--cohort.student_checkpoints", "{q: {s10}}"],
     ["cohort.student_checkpoints", "['q']", "not students (['s'])"]),
    ("student_checkpoint_for_another_class_count",
     ["--cohort.students.s.init_args.size", "s", "--cohort.student_checkpoints", "{s: {s100}}"],
     ["cohort.student_checkpoints.s", "saved for 100 classes"]),
    ("resume_from_a_corrupted_file",
     ["--resume", "{garbage}"],
     ["{garbage}", "cannot be read", "last.ckpt"]),
    ("resume_from_a_plain_state_dict",
     ["--resume", "{s10}"],
     ["{s10}", "is not a collab-distill checkpoint", "cohort.student_checkpoints"]),
    ("resume_last_without_a_run",
     ["--resume", "last"],
     ["--resume last", "no run with checkpoints/last.ckpt", "give the checkpoint path"]),
    ("beta_without_teacher",
     ["--plugins", f"[{{class_path: {FIXED}, init_args: {{alpha: 0.5, beta: 0.5}}}}]"],
     ["FixedLossWeights.beta > 0", "add `cohort.teachers`", "set beta: 0"]),
    ("negative_weight",
     ["--plugins", f"[{{class_path: {FIXED}, init_args: {{alpha: -1.0}}}}]"],
     ["plugins[0]: FixedLossWeights.alpha=-1.0 must be >= 0"]),
    ("negative_per_student_weight",
     ["--plugins", f"[{{class_path: {FIXED}, init_args: {{per_student: {{s: [1.0, -0.5, 0.0]}}}}}}]"],
     ["plugins[0]: FixedLossWeights.per_student.s", "each >= 0"]),
    ("unknown_disabled_plugin",
     ["--disable_plugins", "[defualts]"],
     ["--disable_plugins", "'defualts'", "installed: [", "'defaults'"]),
    ("negative_learning_rate_before_teacher_training",
     ["--optimizer.init_args.lr", "-0.1", "--cohort.teachers", _teacher("xxxs", train_epochs=1)],
     ["optimizer.init_args.lr", "Invalid learning rate: -0.1", "torch.optim.SGD", "Fix optimizer.init_args"]),
    ("negative_meta_learning_rate",
     ["--plugins", "[{class_path: support_plugins.LearnedImageWeights, init_args: {lr: -1.0}}]"],
     ["meta module 'image_weights'", "Invalid learning rate: -1.0", "Fix the setting lr of the plugin"]),
    ("root_dir_below_a_file",
     ["--trainer.root_dir", "{garbage}/runs"],
     ["trainer.root_dir", "{garbage}/runs", "{garbage}' is a file, not a folder", "give a folder you can write to"]),
    ("root_dir_where_no_file_can_be_created",  # sysfs refuses new files, to root too (chmod does not stop root)
     ["--trainer.root_dir", "/sys/collab-distill-runs"],
     ["trainer.root_dir='/sys/collab-distill-runs'", "cannot create files in '/sys'", "give a folder you can write to"],
     pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sysfs is Linux's")),
    ("gpu_on_a_machine_without_one",
     ["--trainer.accelerator", "gpu"],
     ["trainer.accelerator=gpu", "this machine has no GPU", "use --trainer.accelerator cpu or auto"],
     pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ("unknown_compile_backend",
     ["--trainer.compile", "bogus"],
     ["trainer.compile='bogus'", "not a torch.compile backend", "inductor", "aot_eager", "list_backends", "null"]),
    ("unknown_precision",
     ["--trainer.precision", "17"],
     ["trainer.precision='17'", "choose one of", "32-true", "bf16-mixed", "16-mixed"]),
    ("strategy_fabric_refuses",
     ["--trainer.strategy", "ddpp"],
     ["trainer: Fabric refuses", "strategy='ddpp'", "invalid strategy name", "Fix trainer.accelerator"]),
    ("yaml_syntax_error_in_a_config_file",
     ["--config", "{broken}"],
     ["{broken}", "YAML syntax error at line 3, column 5", "flow sequence that starts at line 2, column 15", "fix the YAML"]),
    ("image_folder_with_one_class",
     ["--task.init_args.data", _image_data("{one_class}")],
     ["ImageFolderData.train_dir", "{one_class}/train", "1 class folder (['cat'])", "needs at least 2 classes"]),
    ("image_folder_with_corrupt_images",
     ["--task.init_args.data", _image_data("{corrupt}")],
     ["ImageFolderData", "2 image files cannot be read", "{corrupt}/train/dog/bad.png", "{corrupt}/test/cat/truncated.png",
      "Delete or replace", "check_images"]),
    ("plugin_whose_init_raises",
     ["--plugins", f"[{{class_path: {FIXED}}}, {{class_path: {FAILS}, init_args: {{path: /nowhere/rules.txt}}}}]"],
     ["plugins[1]", FAILS, "RuntimeError: cannot read /nowhere/rules.txt", "Fix its init_args", "leave it out"]),
    ("two_loss_weight_providers",
     ["--plugins", f"[{{class_path: {FIXED}}}, {{class_path: {FIXED}, init_args: {{alpha: 0.5}}}}]"],
     ["FixedLossWeights#0", "FixedLossWeights#1", "both provide loss weights", "for student(s) ['s']",
      "Keep one of them under `plugins:`"]),
]


@pytest.mark.parametrize("extra, needles", [pytest.param(*c[1:3], id=c[0], marks=c[3:]) for c in CASES])
def test_bad_input_stops_before_writing(capsys, files, tmp_path, extra, needles):
    fill = {k: str(v) for k, v in files.items()}
    extra = [_fill(a, fill) for a in extra]
    needles = tuple(_fill(n, fill) for n in needles)
    root = tmp_path / "runs"
    rc, err = _fit(capsys, files, root, *extra)
    assert rc == 2, err
    _assert_one_error(err, needles)
    assert _nothing_written(root), sorted(root.rglob("*"))
    assert not (root / ".." / ".." / "escaped").exists(), "a run name must not reach outside root_dir"


def _fill(text: str, fill: dict[str, str]) -> str:
    for key, value in fill.items():
        text = text.replace(f"{{{key}}}", value)
    return text


def test_at_least_twelve_cases():
    assert len(CASES) >= 12


@pytest.mark.skipif(getattr(os, "geteuid", lambda: -1)() == 0, reason="root writes into a read-only folder")
def test_read_only_root_dir(capsys, files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, err = _fit(capsys, files, locked / "runs")
        assert rc == 2, err
        _assert_one_error(err, ("trainer.root_dir", str(locked / "runs"), "cannot create files in", str(locked)))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_loss_weight_providers_that_answer_only_in_training_conflict_at_the_first_step(capsys, files, tmp_path):
    """A provider that reads its meta module cannot answer at set-up; the conflict is found at the
    first step, before any optimizer step and before a checkpoint is written."""
    root = tmp_path / "runs"
    plugins = f"[{{class_path: support_plugins.LearnedImageWeights}}, {{class_path: {FIXED}}}]"
    rc, err = _fit(capsys, files, root, "--plugins", plugins)
    assert rc == 2, err
    _assert_one_error(err, ("LearnedImageWeights#0", "FixedLossWeights#1", "both provide loss weights", "['s']"))
    assert _nothing_written(root), sorted(root.rglob("*"))  # the new run's folder is removed: it saved nothing


def test_a_run_refused_at_its_first_step_keeps_folders_that_were_there(capsys, files, tmp_path):
    """Only what the refused run created goes: an earlier run's folder beside it stays."""
    root = tmp_path / "runs"
    (root / "bad" / "version_0").mkdir(parents=True)
    plugins = f"[{{class_path: support_plugins.LearnedImageWeights}}, {{class_path: {FIXED}}}]"
    rc, err = _fit(capsys, files, root, "--plugins", plugins)
    assert rc == 2, err
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["bad", "bad/version_0"]


# (id, subcommand, extra arguments, needles): `validate`/`test` of a checkpoint; "{ckpt}" is the
# good run's last.ckpt
EVALUATION_CASES = [
    ("test_without_ckpt_path", "test", [],
     ["--ckpt_path is required", "untrained", "--ckpt_path runs/NAME/version_N/checkpoints/last.ckpt"]),
    ("validate_without_ckpt_path", "validate", [],
     ["collab-distill validate", "--ckpt_path is required", "--ckpt_path runs/NAME/version_N/checkpoints/last.ckpt"]),
    ("checkpoint_of_another_architecture", "test",
     ["--ckpt_path", "{ckpt}", "--cohort.students.s.init_args.size", "s"],
     ["--ckpt_path", "{ckpt}", "student 's'", "does not fit the configured model", "shape mismatch",
      "--config {run}/config.yaml"]),
    ("checkpoint_for_other_data", "test",
     ["--ckpt_path", "{ckpt}", "--task.init_args.data", _image_data("{three_classes}")],
     ["--ckpt_path", "{ckpt}", "10 classes and 1 input channel(s)", "the configured data has 3 classes and 3",
      "--config {run}/config.yaml"]),
    ("checkpoint_of_another_cohort", "validate",
     ["--ckpt_path", "{ckpt}", "--cohort.students", f"{{q: {{class_path: {RESNET}, init_args: {{size: xxxs}}}}}}"],
     ["--ckpt_path", "{ckpt}", "no student 'q'", "has ['s']", "--config {run}/config.yaml"]),
    ("checkpoint_that_is_not_a_torch_file", "test",
     ["--ckpt_path", "{garbage}"],
     ["--ckpt_path", "{garbage}", "cannot be read"]),
]


@pytest.mark.parametrize("command, extra, needles", [c[1:] for c in EVALUATION_CASES], ids=[c[0] for c in EVALUATION_CASES])
def test_bad_evaluation_leaves_the_run_untouched(capsys, files, good_run, command, extra, needles):
    fill = {k: str(v) for k, v in files.items()}
    fill.update(ckpt=str(good_run / "checkpoints" / "last.ckpt"), run=str(good_run))
    extra = [_fill(a, fill) for a in extra]
    needles = tuple(_fill(n, fill) for n in needles)
    before, paths = _digests(good_run), sorted(good_run.rglob("*"))
    capsys.readouterr()
    rc = _call([command, "--config", str(files["base"]), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    _assert_one_error(err, needles)
    assert _digests(good_run) == before
    assert sorted(good_run.rglob("*")) == paths  # no evaluations/ folder either


def test_an_evaluation_a_plugin_fails_leaves_no_evaluation_folder(capsys, files, good_run):
    before, paths = _digests(good_run), sorted(good_run.rglob("*"))
    capsys.readouterr()
    rc = _call(["validate", "--config", str(files["base"]), "--ckpt_path", str(good_run / "checkpoints" / "last.ckpt"),
                "--plugins", "[{class_path: bad_input_plugins.FailsAtEvaluationEnd}]"])
    err = capsys.readouterr().err
    assert rc == 1, err
    _assert_one_error(err, ("plugin 'FailsAtEvaluationEnd#0' failed in hook collab_distill_evaluation_end",
                            "cannot summarise the val split"))
    assert _digests(good_run) == before
    assert sorted(good_run.rglob("*")) == paths  # no evaluations/ folder either


def test_nonfinite_loss_leaves_an_earlier_run_untouched(capsys, files, good_run):
    before = _digests(good_run)
    root, name = good_run.parent.parent, good_run.parent.name
    rc, err = _fit(capsys, files, root, "--optimizer.init_args.lr", "1e6", name=name)
    assert rc == 1, err
    _assert_one_error(err, ("non-finite loss", "s/loss", "Lower optimizer.init_args.lr", "trainer.gradient_clip"))
    assert _digests(good_run) == before
    failed = good_run.parent / "version_1"  # a new folder; nothing of version_0 is reused
    assert failed.is_dir() and not (failed / "checkpoints" / "last.ckpt").exists()
    shutil.rmtree(failed)


def test_nonfinite_loss_on_resume_keeps_the_last_checkpoint(capsys, files, good_run, tmp_path):
    run = tmp_path / "runs" / "good" / "version_0"
    shutil.copytree(good_run, run)
    ckpt, results = run / "checkpoints" / "last.ckpt", run / "results.json"
    before = {p: p.read_bytes() for p in (ckpt, results)}
    rc, err = _fit(
        capsys, files, tmp_path / "runs", "--resume", str(run), "--trainer.max_epochs", "2",
        "--plugins", f"[{{class_path: {NONFINITE}}}]", "--resume_changes", "allow", name="good",
    )
    assert rc == 1, err
    _assert_one_error(err, ("non-finite loss at epoch 1", "s/loss", "was left untouched (resume with --resume last)"))
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    # the resume is recorded (resumes.json, the changed config.yaml) only with its first checkpoint
    assert (run / "config.yaml").read_bytes() == (good_run / "config.yaml").read_bytes()
    assert not (run / "resumes.json").exists() and not (run / "config.0.yaml").exists()


def test_a_run_without_its_checkpoint_but_with_results_is_not_resumed(capsys, files, good_run, tmp_path):
    """Its checkpoint was removed: resuming would train it again from scratch over its results."""
    run = tmp_path / "runs" / "good" / "version_0"
    shutil.copytree(good_run, run)
    shutil.rmtree(run / "checkpoints")
    before = _digests(run)
    rc, err = _fit(capsys, files, tmp_path / "runs", "--resume", str(run), "--trainer.max_epochs", "2", name="good")
    assert rc == 2, err
    _assert_one_error(err, (f"--resume {run}", "wrote its results but has no checkpoints/last.ckpt", "start a new run"))
    assert _digests(run) == before


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2048 vs 1984"),
], ids=["enospc", "unexpected_pos"])
def test_a_checkpoint_written_on_a_full_disk_says_so_and_keeps_the_previous_one(capsys, files, tmp_path, monkeypatch,
                                                                                   failure):
    """The second checkpoint write finds the disk full: one message that says so, names the file
    and the fix (exit code 1); the first checkpoint is intact, and once there is space again
    ``--resume last`` finishes the run."""
    import lightning_fabric.plugins.io.torch_io as torch_io

    real, seen = torch_io._atomic_save, {}
    run = tmp_path / "runs" / "full" / "version_0"
    last = run / "checkpoints" / "last.ckpt"

    def full_disk(checkpoint, path):
        seen["writes"] = seen.get("writes", 0) + 1
        if seen["writes"] == 2:
            seen["before"] = hashlib.sha256(last.read_bytes()).hexdigest()
            raise failure
        real(checkpoint, path)

    monkeypatch.setattr(torch_io, "_atomic_save", full_disk)
    rc, err = _fit(capsys, files, tmp_path / "runs", "--trainer.max_epochs", "2", name="full")
    assert rc == 1, err
    _assert_one_error(err, (f"writing {last} failed: the disk is full", type(failure).__name__,
                            "free space and resume with --resume last", "the previous checkpoint was kept"))
    assert seen["writes"] == 2 and hashlib.sha256(last.read_bytes()).hexdigest() == seen["before"]
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no half-written file beside it
    monkeypatch.setattr(torch_io, "_atomic_save", real)  # space was freed
    rc, err = _fit(capsys, files, tmp_path / "runs", "--trainer.max_epochs", "2", "--resume", "last", name="full")
    assert rc == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and results["epochs"] == 2


# ---------------------------------------------------------------------------------------------
# the real command: exit code, one message, no traceback
# ---------------------------------------------------------------------------------------------


def _command(files, root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(NO_COLOR="1", COLUMNS="200", OMP_NUM_THREADS="1")
    exe = Path(sys.executable).with_name("collab-distill")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "collab_distill"]
    args = ["fit", "--config", str(files["base"]), "--trainer.root_dir", str(root), "--trainer.name", "cmd", *extra]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300, cwd=root.parent)


def test_command_unknown_plugin(files, tmp_path):
    root = tmp_path / "runs"
    proc = _command(files, root, "--plugins", "[{class_path: nope.Plugin}]")
    assert proc.returncode == 2, proc.stderr
    _assert_one_error(proc.stderr, ('Parser key "plugins"', "nope.Plugin", "No module named 'nope'",
                                    "known: collab_distill.plugins.", FIXED))
    assert _nothing_written(root)


def test_command_teacher_for_another_class_count(files, tmp_path):
    root = tmp_path / "runs"
    proc = _command(files, root, "--cohort.teachers", _teacher("s", str(files["s100"])))
    assert proc.returncode == 2, proc.stderr
    _assert_one_error(proc.stderr, ("cohort.teachers.t.checkpoint", str(files["s100"]), "saved for 100 classes"))
    assert _nothing_written(root)


def test_command_nonfinite_loss_from_a_plugin(files, tmp_path):
    root = tmp_path / "runs"
    proc = _command(files, root, "--plugins", f"[{{class_path: {NONFINITE}, init_args: {{after_step: 2, value: inf}}}}]")
    assert proc.returncode == 1, proc.stderr
    _assert_one_error(proc.stderr, ("non-finite loss at epoch 0 step 2", "s/loss", "NaN/inf", "NonFiniteLossWeights#0"))
    assert _nothing_written(root), sorted(root.rglob("*"))  # the plugin's fault, before any checkpoint: no folder left


def test_command_plugin_that_calls_sys_exit_is_a_plugin_error(files, tmp_path):
    """``sys.exit(0)`` inside a hook would end the run with exit code 0, no message and no
    checkpoint: it is a failure of that plugin, named with its hook."""
    root = tmp_path / "runs"
    proc = _command(files, root, "--plugins", "[{class_path: bad_input_plugins.EndsTheProcess, init_args: {code: 0}}]")
    assert proc.returncode == 1, proc.stderr
    first = proc.stderr.splitlines()[0]
    for needle in ("collab-distill: error: plugin 'EndsTheProcess#0'", "in hook collab_distill_train_step_end",
                   "sys.exit(0)", "must not end the process"):
        assert needle in first, f"{needle!r} not in:\n{proc.stderr}"
    assert proc.stderr.count("error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "bad_input_plugins.py:" in first and "COLLAB_DISTILL_TRACEBACK=1" in first  # where, and how to see more
    assert not (root / "cmd" / "version_0" / "results.json").exists()


def test_ctrl_c_inside_a_hook_still_interrupts_the_run(capsys, files, tmp_path):
    root = tmp_path / "runs"
    plugin = "[{class_path: bad_input_plugins.EndsTheProcess, init_args: {how: interrupt}}]"
    rc, err = _fit(capsys, files, root, "--plugins", plugin)
    assert rc == 130, err
    assert err.strip().splitlines()[-1] == "collab-distill: interrupted; resume with --resume last", err
    assert "PluginError" not in err and "error:" not in err


def test_weights_in_detectron2_format_or_under_a_wrapper_prefix_load_completely(files, tmp_path):
    """A teacher/student checkpoint may come as ``{"model": state_dict}`` (detectron2's format) or
    with all keys under one prefix (saved from a wrapper, e.g. DDP's ``module.``): the weights
    load, equal to the file's; a prefix that leaves keys unmatched still does not fit."""
    from collab_distill.checkpoint import load_weights
    from collab_distill.task import ConfigError

    widths, blocks = RESNET_FAMILY["s"]
    state = torch.load(files["s10"])
    for name, content in (("detectron2_format", {"model": state, "iteration": 7}),
                          ("wrapped", {f"module.{k}": v for k, v in state.items()})):
        torch.save(content, tmp_path / f"{name}.pt")
        torch.manual_seed(1)
        model = ResNetCifar(widths, blocks, num_classes=10, in_channels=1)
        load_weights(model, tmp_path / f"{name}.pt", member="t", field="cohort.teachers.t.checkpoint")
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), name
    partial = {f"module.{k}": v for k, v in list(state.items())[:-1]}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match=r"does not fit the configured model: .*missing keys.*unexpected keys"):
        load_weights(ResNetCifar(widths, blocks, num_classes=10, in_channels=1), tmp_path / "partial.pt", member="t",
                     field="cohort.teachers.t.checkpoint")


@pytest.mark.parametrize("target, needles", [
    ("{tmp}/out.pt", ["output='{tmp}/out.pt'", "is a file, not a folder", "give a folder you can write to (--output DIR)"]),
    pytest.param("/sys/collab-distill-export", ["output='/sys/collab-distill-export'", "cannot create files in '/sys'",
                                                "(--output DIR)"],
                 marks=pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sysfs is Linux's")),
], ids=["output_is_a_file", "output_unwritable"])
def test_export_to_an_output_it_cannot_write(capsys, good_run, tmp_path, target, needles):
    kept = tmp_path / "out.pt"
    kept.write_bytes(b"a file the user kept")
    target = target.replace("{tmp}", str(tmp_path))
    capsys.readouterr()
    rc = _call(["export", "--ckpt_path", str(good_run / "checkpoints" / "last.ckpt"), "--student", "s", "--output", target])
    err = capsys.readouterr().err
    assert rc == 2, err
    _assert_one_error(err, tuple(n.replace("{tmp}", str(tmp_path)) for n in needles))
    assert kept.read_bytes() == b"a file the user kept" and sorted(tmp_path.iterdir()) == [kept]


def test_report_of_a_run_whose_results_json_is_not_json(capsys, good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    (run / "results.json").write_text("{not json")
    before = sorted(run.rglob("*"))
    capsys.readouterr()
    rc = _call(["report", str(run)])
    err = capsys.readouterr().err
    assert rc == 2, err
    _assert_one_error(err, (f"report: '{run}/results.json' is not valid JSON", "restore the file"))
    assert sorted(run.rglob("*")) == before  # no report/ folder


def test_coco_image_that_cannot_be_read_is_named_at_set_up(tmp_path):
    """Like ImageFolderData, CocoDetection opens every image its splits use at set-up, so a corrupt
    file is one message naming it before training (not PIL's traceback mid-epoch)."""
    from collab_distill.task import ConfigError
    from collab_distill.tasks.detection.data import CocoDetection
    from collab_distill.tasks.detection.shapes import write_shapes_coco

    root = write_shapes_coco(tmp_path / "shapes", train=8, val=2, size=32)
    bad = sorted((root / "train2017").iterdir())[2]
    bad.write_bytes(b"not an image\n")
    with pytest.raises(ConfigError) as err:
        CocoDetection(root=str(root), meta_fraction=0.25, val_fraction=0.25).setup(0)
    for needle in ("CocoDetection: 1 image file cannot be read", str(bad), "Delete or replace it", "check_images: false"):
        assert needle in str(err.value), str(err.value)
    CocoDetection(root=str(root), meta_fraction=0.25, val_fraction=0.25, check_images=False).setup(0)  # skipped on request
