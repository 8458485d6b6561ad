"""Bad input stops a run with ONE clear message that names the offending field or file and says
how to fix it, before any work is lost or any file is overwritten.

Most cases call :func:`collab_distill.cli.main` in-process; a few run the real ``collab-distill``
command to check the exit code and that no Python traceback reaches the user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collab_distill.cli import main
from collab_distill.tasks.classification.models import RESNET_FAMILY, ResNetCifar

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # bad_input_plugins is importable by class_path

RESNET = "collab_distill.tasks.classification.ResNet"
FIXED = "collab_distill.plugins.fixed_weights.FixedLossWeights"
NONFINITE = "bad_input_plugins.NonFiniteLossWeights"

# one tiny student on 200 digits, one epoch, no loggers: a good run takes a few seconds
BASE = f"""\
seed: 0
task:
  class_path: collab_distill.tasks.classification.ImageClassification
  init_args:
    data:
      class_path: collab_distill.tasks.classification.Digits
      init_args: {{batch_size: 32, subset: 200}}
cohort:
  students:
    s: {{class_path: {RESNET}, init_args: {{size: xxxs}}}}
trainer:
  max_epochs: 1
  accelerator: cpu
  progress_bar: false
  loggers: []
"""


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
    out["garbage"] = d / "garbage.ckpt"
    out["garbage"].write_bytes(b"this is not a torch file\n")
    out["empty_dir"] = d / "empty_data"
    out["empty_dir"].mkdir()
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


# (id, extra arguments, texts the message must contain: the field or file, and the fix).
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
]


@pytest.mark.parametrize("extra, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_stops_before_writing(capsys, files, tmp_path, extra, needles):
    fill = {k: str(v) for k, v in files.items()}
    extra = [_fill(a, fill) for a in extra]
    needles = tuple(_fill(n, fill) for n in needles)
    root = tmp_path / "runs"
    rc, err = _fit(capsys, files, root, *extra)
    assert rc == 2, err
    _assert_one_error(err, needles)
    assert _nothing_written(root), sorted(root.rglob("*"))


def _fill(text: str, fill: dict[str, str]) -> str:
    for key, value in fill.items():
        text = text.replace(f"{{{key}}}", value)
    return text


def test_at_least_twelve_cases():
    assert len(CASES) >= 12


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
        capsys, files, tmp_path / "runs", "--resume", "last", "--trainer.max_epochs", "2",
        "--plugins", f"[{{class_path: {NONFINITE}}}]", name="good",
    )
    assert rc == 1, err
    _assert_one_error(err, ("non-finite loss at epoch 1", "s/loss", "was left untouched (resume with --resume last)"))
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


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
    _assert_one_error(proc.stderr, ("non-finite loss at epoch 0 step 2", "s/loss", "NaN/inf"))
    assert sorted(p.name for p in (root / "cmd").iterdir()) == ["version_0"]
    assert not (root / "cmd" / "version_0" / "checkpoints" / "last.ckpt").exists()
