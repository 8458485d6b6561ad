"""A census of hostile inputs to the ``collab-distill`` command line (issue 22).

Every case is one command a user or a plugin author can give: a bad value for a config field, a
broken config file, missing or corrupt data, a checkpoint that does not fit, an export over
earlier files, a faulty plugin, a path that leaves the run folder, hardware the machine lacks.
Each runs as a real subprocess in a fresh temporary directory (its working directory; runs go to
``runs/`` there) with ``tests/`` and ``benchmarks/`` on PYTHONPATH, one thread, no colour and a
120 s timeout. The files under the case's directory and under the shared inputs (config files,
checkpoints, data sets and a finished run made once per census) are hashed before and after.

Each outcome is exactly one of:

* ``clear and early``: exit code != 0, exactly one line starting ``collab-distill: error:``, no
  ``Traceback``, no training output (no epoch table) and no new or changed file;
* ``clear but late``: one clear error line, but training had started or files were written;
* ``traceback``: a ``Traceback`` in the output, several error lines, none at all, or a timeout;
* ``silent``: exit code 0 for an input that should be refused;
* ``files changed``: a file that existed before (the finished run's, the user's inputs) was
  modified or removed.

A case whose error can only be seen once work has started (a NaN that appears at step N, a hook
first called at the first checkpoint) declares why in ``late``; when it ends with one clear error
line and no existing file changed, it is ``clear, late by nature``: counted apart, not as a
failure (any other outcome is classed as above).

A case that is expected to succeed (a control) and does is ``accepted as intended`` and is not
counted as hostile. Cases of ``tests/test_bad_input.py`` (its ``CASES`` and
``EVALUATION_CASES``, imported, so the census follows the test) are included with
``source: tests/test_bad_input.py``.

    python benchmarks/hostile_inputs.py                 # every case, one at a time (~25 min on 2 cores)
    python benchmarks/hostile_inputs.py --only plugins  # one group; merged into the existing results
    python benchmarks/hostile_inputs.py --list          # the cases, nothing runs
    python benchmarks/hostile_inputs.py --render-only   # the Markdown from the JSON

Writes ``benchmarks/results/hostile_inputs.json`` and ``.md`` (paths in them are portable:
``$TMP`` is the case's working directory, ``$INPUTS`` the shared inputs, others relative to the
repository). With ``--jobs N`` > 1 the shared inputs' before/after hashes of one case may see
another case's writes; the committed results are from ``--jobs 1``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TESTS = REPO / "tests"
for _p in (TESTS, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

RESULTS = HERE / "results"
TIMEOUT = 120
ERROR = "collab-distill: error:"
LATE_BY_NATURE = "clear, late by nature"
CLASSES = ("clear and early", LATE_BY_NATURE, "clear but late", "traceback", "silent", "files changed")
ACCEPTED = "accepted as intended"
RESNET = "collab_distill.tasks.classification.ResNet"
FIXED = "collab_distill.plugins.fixed_weights.FixedLossWeights"
FROM_TEST = "tests/test_bad_input.py"

# faulty plugins whose hook is first called after training: their error can only come then
HOOKS_CALLED_LATE = {
    "EpochEndRaises": "collab_distill_epoch_end is first called when the first epoch has been trained",
    "FitEndRaises": "collab_distill_fit_end is called when training has finished",
    "ExitsInFitEnd": "collab_distill_fit_end is called when training has finished",
    "ReportSectionsWrongType": "report sections are asked for when the run has finished (they describe its results)",
    "ReportFigureOutsideRun": "report figures are written when the run has finished (they describe its results)",
}

# every run is small: one epoch of two batches, two batches per evaluation
SMALL = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_eval_batches", "2"]
# a line of training output: the per-epoch table's title ("epoch 1  (0.1 s)"), also of a teacher's run
EPOCH_LINE = re.compile(r"^\s*(?:\S+\s+)?epoch \d+\s+\(", re.M)

Setup = Callable[[Path, Path], None]


@dataclass
class Case:
    id: str
    group: str
    args: list[str]
    refuse: bool = True  # False: a control that must succeed
    setup: Optional[Setup] = None  # (working directory, shared inputs) -> None, before the "before" hashes
    source: str = "new"
    note: str = ""
    lock: Optional[str] = None  # a run folder (placeholders allowed) another process holds locked during the case
    pythonpath_cwd: bool = False  # the working directory on PYTHONPATH too (a plugin module written there)
    skip: Optional[str] = None  # why the case cannot run on this machine
    late: str = ""  # why its error can only come after work has started (see the module docstring)


def fit(*extra: str, config: str = "{base}", name: str = "bad") -> list[str]:
    """``collab-distill fit`` of the tiny digits config (one student, 200 images), small and named."""
    return ["fit", "--config", config, "--trainer.root_dir", "runs", "--trainer.name", name, *SMALL, *extra]


def det(*extra: str, root: str = "{tmp}/shapes", config: str = "{repo}/examples/coco_tiny.yaml") -> list[str]:
    """``collab-distill fit`` of examples/coco_tiny.yaml on a tiny shapes set (96 px, teacher 1 epoch)."""
    return ["fit", "--config", config, "--trainer.root_dir", "runs", "--trainer.name", "bad", *SMALL,
            "--trainer.progress_bar", "false", "--task.init_args.data.init_args.root", root,
            "--task.init_args.min_size", "96", "--task.init_args.max_size", "96",
            "--cohort.teachers.teacher.train_epochs", "1", *extra]


def plugin(class_path: str, init_args: str = "") -> str:
    args = f", init_args: {{{init_args}}}" if init_args else ""
    return f"[{{class_path: {class_path}{args}}}]"


def teacher(size: str, checkpoint: Optional[str] = None, train_epochs: Optional[int] = None, extra: str = "") -> str:
    fields = [f"model: {{class_path: {RESNET}, init_args: {{size: {size}}}}}"]
    if checkpoint is not None:
        fields.append(f"checkpoint: {checkpoint}")
    if train_epochs is not None:
        fields.append(f"train_epochs: {train_epochs}")
    if extra:
        fields.append(extra)
    return "{t: {" + ", ".join(fields) + "}}"


def data(class_path: str, init_args: str) -> str:
    return f"{{class_path: collab_distill.tasks.classification.{class_path}, init_args: {{{init_args}}}}}"


def image_data(root: str, extra: str = "") -> str:
    return data("ImageFolderData", f"root: {root}, image_size: 8, subset: null{extra}")


def digits(field_: str, value: str) -> list[str]:
    return [f"--task.init_args.data.init_args.{field_}", value]


# ---------------------------------------------------------------------------------------------
# shared inputs, made once per census
# ---------------------------------------------------------------------------------------------


def _image_folder(root: Path, classes: tuple[str, ...], per_class: int = 5, test: Optional[tuple[str, ...]] = None) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, names, n in (("train", classes, per_class), ("test", classes if test is None else test, 2)):
        for c in names:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def make_inputs(inputs: Path, exe: list[str], env: dict[str, str]) -> dict[str, Path]:
    """Config files, checkpoint files, data sets and two runs (one finished, one stopped by max_steps)."""
    import pickle

    import torch

    from collab_distill.tasks.classification.models import RESNET_FAMILY, ResNetCifar
    from collab_distill.tasks.detection.shapes import write_shapes_coco
    from tiny_config import tiny_digits_yaml

    out: dict[str, Path] = {}

    def text(name: str, file: str, content: str) -> None:
        out[name] = inputs / file
        out[name].write_text(content)

    text("base", "base.yaml", tiny_digits_yaml())
    text("typo", "typo.yaml", "trainer:\n  max_epoch: 2\n")
    text("dup", "dup.yaml", f"cohort:\n  students:\n    s: {{class_path: {RESNET}, init_args: {{size: xxxs}}}}\n"
                            f"    s: {{class_path: {RESNET}, init_args: {{size: xxs}}}}\n")
    text("broken", "broken.yaml", "trainer:\n  max_epochs: [1\nseed: 0\n")
    text("empty_yaml", "empty.yaml", "# nothing but a comment\n")
    text("list_yaml", "list.yaml", "- trainer\n- seed\n")
    text("tabs_yaml", "tabs.yaml", "trainer:\n\tmax_epochs: 1\n")
    text("scalar_yaml", "scalar.yaml", "42\n")
    text("unknown_section", "unknown_section.yaml", "trainr:\n  max_epochs: 1\n")
    text("section_list", "section_list.yaml", "trainer:\n  - max_epochs\n  - 1\n")
    text("dup_section", "dup_section.yaml", "trainer:\n  max_epochs: 1\nseed: 1\ntrainer:\n  temperature: 2.0\n")
    text("alias", "alias.yaml", "trainer: *settings\n")
    text("python_tag", "python_tag.yaml", "seed: !!python/object/apply:os.system ['touch pwned_by_yaml']\n")
    text("float_epochs", "float_epochs.yaml", "trainer:\n  max_epochs: 1.0e3\n")
    text("null_students", "null_students.yaml", "cohort:\n  students: null\n")
    text("bad_task_module", "bad_task_module.yaml", "task:\n  class_path: my_tasks.Classification\n")
    out["utf16"] = inputs / "utf16.yaml"
    out["utf16"].write_bytes("trainer:\n  max_epochs: 1\n".encode("utf-16"))
    out["binary"] = inputs / "binary.yaml"
    out["binary"].write_bytes(bytes(range(256)) * 4)

    widths, blocks = RESNET_FAMILY["s"]
    torch.manual_seed(0)
    out["s10"] = inputs / "resnet_s_10classes.pt"
    torch.save(ResNetCifar(widths, blocks, num_classes=10, in_channels=1).state_dict(), out["s10"])
    out["s100"] = inputs / "resnet_s_100classes.pt"
    torch.save(ResNetCifar(widths, blocks, num_classes=100, in_channels=1).state_dict(), out["s100"])
    out["pkl"] = inputs / "model_final.pkl"
    with open(out["pkl"], "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in torch.load(out["s10"]).items()}, "__author__": "test"}, f)
    out["garbage"] = inputs / "garbage.ckpt"
    out["garbage"].write_bytes(b"this is not a torch file\n")
    out["zero_bytes"] = inputs / "zero_bytes.pt"
    out["zero_bytes"].write_bytes(b"")
    whole = out["s10"].read_bytes()
    out["truncated"] = inputs / "truncated.pt"
    out["truncated"].write_bytes(whole[: len(whole) // 2])
    out["empty_dir"] = inputs / "empty_data"
    out["empty_dir"].mkdir()

    out["one_class"] = _image_folder(inputs / "one_class", ("cat",))
    out["three_classes"] = _image_folder(inputs / "three_classes", ("cat", "dog", "eel"))
    out["corrupt"] = _image_folder(inputs / "corrupt", ("cat", "dog"))
    (out["corrupt"] / "train" / "dog" / "bad.png").write_bytes(b"not an image\n")
    png = (out["corrupt"] / "test" / "cat" / "0.png").read_bytes()
    (out["corrupt"] / "test" / "cat" / "truncated.png").write_bytes(png[: len(png) // 2])
    out["zero_byte_image"] = _image_folder(inputs / "zero_byte_image", ("cat", "dog"))
    (out["zero_byte_image"] / "train" / "cat" / "empty.png").write_bytes(b"")
    out["stray_text"] = _image_folder(inputs / "stray_text", ("cat", "dog"))
    (out["stray_text"] / "train" / "cat" / "README.txt").write_text("notes about the cats\n")
    out["empty_classes"] = inputs / "empty_classes"
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (out["empty_classes"] / split / c).mkdir(parents=True)
    out["no_test"] = _image_folder(inputs / "no_test", ("cat", "dog"))
    shutil.rmtree(out["no_test"] / "test")
    out["other_test_classes"] = _image_folder(inputs / "other_test_classes", ("cat", "dog"), test=("cow", "eel"))
    out["cifar_garbage"] = inputs / "cifar_garbage"
    (out["cifar_garbage"] / "cifar-100-python").mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (out["cifar_garbage"] / "cifar-100-python" / name).write_bytes(b"garbage\n")
    out["shapes"] = write_shapes_coco(inputs / "shapes", train=30, val=8, size=96, seed=3)

    # the finished run (and a run stopped by max_steps) that resume/validate/test/export cases copy
    runs = inputs / "good_runs"
    runs.mkdir()
    for name, extra in (("good", []), ("stopped", ["--trainer.max_steps", "1"])):
        args = [a.replace("{base}", str(out["base"])) for a in fit(*extra, name=name)]
        proc = subprocess.run(exe + args, cwd=runs, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise SystemExit(f"making the {name} run failed:\n{proc.stderr[-3000:]}")
        out[f"{name}_run"] = runs / "runs" / name / "version_0"
    return out


# ---------------------------------------------------------------------------------------------
# per-case set-up (in the case's working directory, before the "before" hashes)
# ---------------------------------------------------------------------------------------------


def copy_runs(cwd: Path, inputs: Path) -> None:
    shutil.copytree(inputs / "good_runs" / "runs", cwd / "runs", symlinks=True)


def copy_shapes(cwd: Path, inputs: Path) -> None:
    shutil.copytree(inputs / "shapes", cwd / "shapes")


def _annotations(cwd: Path, split: str = "train") -> Path:
    return cwd / "shapes" / "annotations" / f"instances_{split}2017.json"


def shapes_edit(edit: Callable[[dict[str, Any]], Any], split: str = "train") -> Setup:
    """Copy the shapes set and rewrite one annotation file: ``edit(doc)`` changes the document in
    place, or returns the text (or bytes) to write instead."""

    def setup(cwd: Path, inputs: Path) -> None:
        copy_shapes(cwd, inputs)
        path = _annotations(cwd, split)
        doc = json.loads(path.read_text())
        new = edit(doc)
        if isinstance(new, bytes):
            path.write_bytes(new)
        elif isinstance(new, str):
            path.write_text(new)
        else:
            path.write_text(json.dumps(doc))

    return setup


def shapes_files(edit: Callable[[Path], None]) -> Setup:
    def setup(cwd: Path, inputs: Path) -> None:
        copy_shapes(cwd, inputs)
        edit(cwd / "shapes")

    return setup


def _first_box(change: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["annotations"][0].update(change)

    return edit


def _every_box(change: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        for a in doc["annotations"]:
            a.update(change)

    return edit


def with_runs(*more: Setup) -> Setup:
    def setup(cwd: Path, inputs: Path) -> None:
        copy_runs(cwd, inputs)
        for s in more:
            s(cwd, inputs)

    return setup


def write(relative: str, content: bytes | str) -> Setup:
    def setup(cwd: Path, inputs: Path) -> None:
        path = cwd / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def truncate(relative: str) -> Setup:
    def setup(cwd: Path, inputs: Path) -> None:
        path = cwd / relative
        content = path.read_bytes()
        path.write_bytes(content[: len(content) // 3])

    return setup


def remove(relative: str) -> Setup:
    def setup(cwd: Path, inputs: Path) -> None:
        path = cwd / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return setup


def mkdir(relative: str) -> Setup:
    def setup(cwd: Path, inputs: Path) -> None:
        (cwd / relative).mkdir(parents=True, exist_ok=True)

    return setup


def chain(*steps: Setup) -> Setup:
    def setup(cwd: Path, inputs: Path) -> None:
        for s in steps:
            s(cwd, inputs)

    return setup


def export_into(output: str) -> Setup:
    """The run copies, and an earlier export of student ``s`` in ``output`` the user kept."""

    def setup(cwd: Path, inputs: Path) -> None:
        copy_runs(cwd, inputs)
        folder = cwd / output
        folder.mkdir(parents=True)
        (folder / "s-last.pt").write_bytes(b"an earlier export the user kept")

    return setup


RUN = "{tmp}/runs/good/version_0"
CKPT = RUN + "/checkpoints/last.ckpt"
STOPPED = "{tmp}/runs/stopped/version_0"


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------

# ids of tests/test_bad_input.py's CASES -> group
TEST_GROUPS = {
    "unknown_plugin_class_path": "plugins", "plugin_that_is_not_a_plugin": "plugins", "unknown_model_class": "cohort",
    "unknown_init_arg": "cohort", "unknown_resnet_size": "cohort", "unknown_torchvision_model": "cohort",
    "wrong_type": "config-values", "value_out_of_range": "config-values", "run_name_escaping_root_dir": "paths",
    "negative_gradient_clip": "config-values", "topk_beyond_the_classes": "config-values", "fp16_on_the_cpu": "hardware",
    "empty_config_file": "config-files", "config_file_whose_top_level_is_a_list": "config-files", "data_root_is_a_file": "data",
    "negative_seed": "config-values", "misspelt_option_is_not_an_abbreviation": "cli", "unknown_key_in_yaml": "config-files",
    "duplicate_member_in_yaml": "config-files", "teacher_named_like_a_student": "cohort", "bad_member_name": "cohort",
    "missing_data_folder": "data", "data_folder_without_layout": "data", "image_folder_without_layout": "data",
    "teacher_checkpoint_of_another_architecture": "cohort", "teacher_checkpoint_for_another_class_count": "cohort",
    "teacher_without_checkpoint_or_training": "cohort", "missing_teacher_checkpoint": "cohort",
    "teacher_checkpoint_is_a_plain_pickle": "cohort", "teacher_checkpoint_not_a_torch_file": "cohort",
    "student_checkpoint_for_unknown_student": "cohort", "student_checkpoint_for_another_class_count": "cohort",
    "resume_from_a_corrupted_file": "resume", "resume_from_a_plain_state_dict": "resume", "resume_last_without_a_run": "resume",
    "beta_without_teacher": "plugins", "negative_weight": "plugins", "negative_per_student_weight": "plugins",
    "unknown_disabled_plugin": "plugins", "negative_learning_rate_before_teacher_training": "config-values",
    "negative_meta_learning_rate": "plugins", "root_dir_below_a_file": "paths", "root_dir_where_no_file_can_be_created": "paths",
    "gpu_on_a_machine_without_one": "hardware", "unknown_compile_backend": "config-values", "unknown_precision": "hardware",
    "strategy_fabric_refuses": "hardware", "yaml_syntax_error_in_a_config_file": "config-files",
    "image_folder_with_one_class": "data", "image_folder_with_corrupt_images": "data", "plugin_whose_init_raises": "plugins",
    "two_loss_weight_providers": "plugins",
}


def _skipped(marks: tuple[Any, ...]) -> Optional[str]:
    for mark in marks:
        if getattr(mark, "name", "") == "skipif" and mark.args and mark.args[0]:
            return str(mark.kwargs.get("reason", "skipped by the test"))
    return None


def test_cases() -> list[Case]:
    """tests/test_bad_input.py's tables, as commands (its placeholders name the same inputs)."""
    import test_bad_input as t

    cases = [Case(c[0], TEST_GROUPS.get(c[0], "config-values"), fit(*c[1]), source=FROM_TEST, skip=_skipped(c[3:]))
             for c in t.CASES]
    for cid, command, extra, _needles in t.EVALUATION_CASES:
        extra = [a.replace("{ckpt}", CKPT) for a in extra]
        cases.append(Case(cid, "evaluation", [command, "--config", "{base}", *SMALL, *extra], source=FROM_TEST,
                          setup=copy_runs))
    # the test module's other bad-input tests, as commands
    nonfinite = "bad_input_plugins.NonFiniteLossWeights"
    cases += [
        Case("read_only_root_dir", "paths", fit("--trainer.root_dir", "locked/runs"), source=FROM_TEST,
             setup=lambda cwd, _: (cwd / "locked").mkdir(mode=0o500),
             skip="root writes into a read-only folder" if getattr(os, "geteuid", lambda: -1)() == 0 else None),
        Case("loss_weight_providers_conflict_at_the_first_step", "plugins",
             fit("--plugins", f"[{{class_path: support_plugins.LearnedImageWeights}}, {{class_path: {FIXED}}}]"),
             source=FROM_TEST),
        Case("nonfinite_loss_leaves_an_earlier_run_untouched", "plugins",  # the test's whole epoch: 4 batches
             fit("--optimizer.init_args.lr", "1e6", "--trainer.limit_train_batches", "null", name="good"), setup=copy_runs,
             source=FROM_TEST, late="the loss becomes NaN only after some steps at lr 1e6"),
        Case("nonfinite_loss_on_resume_keeps_the_last_checkpoint", "resume",
             fit("--resume", RUN, "--trainer.max_epochs", "2", "--plugins", plugin(nonfinite), "--resume_changes", "allow",
                 name="good"), setup=copy_runs, source=FROM_TEST),
        Case("command_unknown_plugin", "plugins", fit("--plugins", "[{class_path: nope.Plugin}]"), source=FROM_TEST),
        Case("command_nonfinite_loss_from_a_plugin", "plugins",
             fit("--plugins", plugin(nonfinite, "after_step: 2, value: inf"), "--trainer.limit_train_batches", "null"),
             source=FROM_TEST, late="the plugin's weights become inf at step 2 (of the whole epoch: null lifts the 2 batches)"),
        Case("command_plugin_that_calls_sys_exit", "plugins",
             fit("--plugins", plugin("bad_input_plugins.EndsTheProcess", "code: 0")), source=FROM_TEST),
        Case("disable_plugins_unknown_name", "plugins", fit("--disable_plugins", "no_such_plugin"),
             source="tests/test_cli.py"),
    ]
    return cases


def new_cases() -> list[Case]:
    c: list[Case] = []

    def add(cid: str, group: str, args: list[str], **kw: Any) -> None:
        c.append(Case(cid, group, args, **kw))

    # ---- the command line itself
    add("no_subcommand", "cli", [])
    add("unknown_subcommand", "cli", ["train", "--config", "{base}"])
    add("misspelt_subcommand", "cli", ["fitt", "--config", "{base}"])
    add("fit_without_any_config", "cli", ["fit", "--trainer.root_dir", "runs"])
    add("unknown_option", "cli", fit("--foo", "bar"))
    add("option_without_its_value", "cli", [*fit(), "--trainer.max_epochs"])
    add("config_option_without_a_file", "cli", ["fit", "--config"])
    add("resume_changes_not_a_choice", "cli", fit("--resume_changes", "maybe"))
    add("dry_run_not_a_boolean", "cli", fit("--dry_run", "maybe"))
    add("trace_plugins_not_a_boolean", "cli", fit("--trace_plugins", "2"))
    add("plugins_command_with_an_option", "cli", ["plugins", "--foo"])
    add("positional_argument_to_fit", "cli", [*fit(), "extra.yaml"])
    add("validate_without_config", "cli", ["validate", "--ckpt_path", CKPT], setup=copy_runs)
    add("modules_unknown_member", "cli", ["modules", "--config", "{base}", "--member", "nope"])
    add("modules_without_config", "cli", ["modules"])

    # ---- config files
    add("config_file_missing", "config-files", fit("--config", "{tmp}/nowhere.yaml"))
    add("config_file_is_a_folder", "config-files", fit("--config", "{empty_dir}"))
    add("config_file_is_binary", "config-files", fit("--config", "{binary}"))
    add("config_file_indented_with_tabs", "config-files", fit("--config", "{tabs_yaml}"))
    add("config_file_is_a_scalar", "config-files", fit("--config", "{scalar_yaml}"))
    add("config_file_unknown_section", "config-files", fit("--config", "{unknown_section}"))
    add("config_file_section_is_a_list", "config-files", fit("--config", "{section_list}"))
    add("config_file_duplicate_section", "config-files", fit("--config", "{dup_section}"))
    add("config_file_utf16", "config-files", fit("--config", "{utf16}"))
    add("config_file_undefined_alias", "config-files", fit("--config", "{alias}"))
    add("config_file_python_tag", "config-files", fit("--config", "{python_tag}"),
        note="must be refused without running os.system (no pwned_by_yaml file)")
    add("config_file_float_for_an_int", "config-files", fit("--config", "{float_epochs}"))
    add("config_file_null_students", "config-files", fit("--config", "{null_students}"))
    add("config_file_task_module_missing", "config-files", fit("--config", "{bad_task_module}"))

    # ---- config values: trainer
    tv = "config-values"
    for fld, value in (
        ("max_epochs", "-1"), ("max_epochs", "1.5"), ("max_epochs", "nan"), ("max_steps", "0"), ("max_steps", "-1"),
        ("warmup_epochs", "-1"), ("warmup_epochs", "{ghost: 1}"), ("temperature", "0"), ("temperature", "-2"),
        ("temperature", "nan"), ("temperature", "inf"), ("num_nodes", "0"), ("num_nodes", "-1"),
        ("checkpoint_every_n_epochs", "0"), ("checkpoint_every_n_epochs", "-1"), ("checkpoint_every_n_steps", "0"),
        ("log_every_n_steps", "0"), ("log_every_n_steps", "-5"), ("val_every_n_epochs", "0"),
        ("limit_train_batches", "0"), ("limit_train_batches", "-1"), ("limit_train_batches", "0.5"),
        ("limit_eval_batches", "0"), ("gradient_clip", "0"), ("gradient_clip", "nan"), ("progress_bar", "maybe"),
        ("detect_nonfinite", "2"), ("loggers", "[wandb]"), ("loggers", "[csvv]"), ("loggers", "[{class_path: torch.nn.Linear}]"),
    ):
        slug = value.strip("[]{}: ").replace(".", "_").replace("-", "minus_").replace(" ", "_").replace(":", "")
        add(f"trainer_{fld}_{slug}", tv, fit(f"--trainer.{fld}", value))
    add("seed_above_uint32", tv, fit("--seed", "4294967296"))
    add("seed_float", tv, fit("--seed", "1.5"))
    add("seed_text", tv, fit("--seed", "abc"))
    # optimizer
    for fld, value in (("lr", "-0.1"), ("lr", "nan"), ("lr", "inf"), ("lr", "ten"), ("momentum", "-1"),
                       ("weight_decay", "-1"), ("foo", "1")):
        add(f"optimizer_{fld}_{value.replace('-', 'minus_').replace('.', '_')}", tv, fit(f"--optimizer.init_args.{fld}", value))
    add("optimizer_lr_huge", tv, fit("--optimizer.init_args.lr", "1e300"),
        note="a clear non-finite-loss stop at the first step is the expected outcome")
    add("optimizer_nesterov_without_momentum", tv, fit("--optimizer.init_args.momentum", "0", "--optimizer.init_args.nesterov",
                                                        "true"))
    add("optimizer_misspelt_class", tv, fit("--optimizer", "{class_path: torch.optim.Adamm}"))
    add("optimizer_not_an_optimizer", tv, fit("--optimizer", "{class_path: torch.nn.Linear}"))
    add("optimizer_adam_betas_out_of_range", tv,
        fit("--optimizer", "{class_path: torch.optim.Adam, init_args: {betas: [1.5, 0.9]}}"))
    add("optimizer_lbfgs_needs_a_closure", tv, fit("--optimizer", "{class_path: torch.optim.LBFGS}"))
    # schedule
    add("schedule_misspelt_class", tv, fit("--schedule", "collab_distill.optim.Cosinee"))
    add("schedule_negative_warmup", tv, fit("--schedule.init_args.warmup_epochs", "-1"))
    add("schedule_min_factor_negative", tv, fit("--schedule.init_args.min_factor", "-0.5"))
    add("schedule_min_factor_above_one", tv, fit("--schedule.init_args.min_factor", "2"))
    add("schedule_multistep_negative_gamma", tv,
        fit("--schedule", "{class_path: collab_distill.optim.MultiStep, init_args: {milestones: [1], gamma: -1}}"))
    add("schedule_multistep_without_milestones", tv, fit("--schedule", "{class_path: collab_distill.optim.MultiStep}"))
    add("schedule_warm_restarts_zero_period", tv,
        fit("--schedule", "{class_path: collab_distill.optim.CosineWarmRestarts, init_args: {period: 0}}"))
    add("schedule_torch_scheduler", tv, fit("--schedule", "{class_path: torch.optim.lr_scheduler.StepLR}"))
    # meta (with a meta-learned plugin, so that the settings are used)
    meta_plugin = ["--plugins", plugin("support_plugins.LearnedImageWeights")]
    for fld, value in (("every_n_steps", "0"), ("every_n_steps", "-1"), ("every_n_epochs", "0"),
                       ("steps_in_meta_epoch", "bogus"), ("hypergradient", "third_order"), ("fd_epsilon", "0"),
                       ("fd_epsilon", "-1"), ("grad_clip", "-1"), ("grad_clip", "0")):
        add(f"meta_{fld}_{value.replace('-', 'minus_')}", tv, fit(*meta_plugin, f"--meta.{fld}", value))
    # task
    for value in ("[0]", "[-1]", "[]"):
        add(f"topk_{value.strip('[]').replace('-', 'minus_') or 'empty'}", tv, fit("--task.init_args.topk", value))
    add("task_misspelt_class", tv, fit("--task", "collab_distill.tasks.classification.ImageClassificationn"))
    add("task_detection_on_digits_data", tv,
        fit("--task", "{class_path: collab_distill.tasks.detection.ObjectDetection, "
                      "init_args: {data: {class_path: collab_distill.tasks.classification.Digits}}}"))

    # ---- cohort
    co = "cohort"
    add("students_empty", co, fit("--cohort.students", "{}"))
    add("student_not_a_model_factory", co, fit("--cohort.students", "{s: {class_path: torch.nn.Linear}}"))
    add("student_size_null", co, fit("--cohort.students.s.init_args.size", "null"))
    add("student_detector_on_classification", co,
        fit("--cohort.students", "{s: {class_path: collab_distill.tasks.detection.FasterRCNN, init_args: {backbone: xxs}}}"))
    tvm = "collab_distill.tasks.classification.TorchvisionModel"
    add("torchvision_vit_on_8px_images", co,
        fit("--cohort.students", f"{{s: {{class_path: {tvm}, init_args: {{name: vit_b_16}}}}}}"))
    add("torchvision_detector_name", co,
        fit("--cohort.students", f"{{s: {{class_path: {tvm}, init_args: {{name: fasterrcnn_resnet50_fpn}}}}}}"))
    add("torchvision_missing_weights_file", co,
        fit("--cohort.students", f"{{s: {{class_path: {tvm}, init_args: {{name: resnet18, weights: {{tmp}}/resnet18.pth}}}}}}"))
    add("torchvision_weights_of_another_model", co,
        fit("--cohort.students", f"{{s: {{class_path: {tvm}, init_args: {{name: mobilenet_v3_small, weights: {{s10}}}}}}}}"))
    add("torchvision_num_classes_in_kwargs", co,
        fit("--cohort.students", f"{{s: {{class_path: {tvm}, init_args: {{name: resnet18, kwargs: {{num_classes: 5}}}}}}}}"))
    multi_exit = "collab_distill.tasks.classification.MultiExit"
    add("multi_exit_around_a_torchvision_model", co,
        fit("--cohort.students", f"{{s: {{class_path: {multi_exit}, init_args: {{backbone: {{class_path: {tvm}, "
                                 "init_args: {name: mobilenet_v3_small}}}}}}"))
    add("teacher_checkpoint_is_a_folder", co, fit("--cohort.teachers", teacher("s", "{empty_dir}")))
    add("teacher_checkpoint_zero_bytes", co, fit("--cohort.teachers", teacher("s", "{zero_bytes}")))
    add("teacher_checkpoint_truncated", co, fit("--cohort.teachers", teacher("s", "{truncated}")))
    add("teacher_negative_train_epochs", co, fit("--cohort.teachers", teacher("s", train_epochs=-1)))
    add("teacher_cache_dir_is_a_file", co,
        fit("--cohort.teachers", teacher("xxxs", train_epochs=1, extra="cache_dir: {garbage}")))
    add("teacher_checkpoint_and_train_epochs", co, fit("--cohort.teachers", teacher("s", "{s10}", train_epochs=1)),
        note="both given: which one wins must be said, or it is refused")
    add("student_checkpoint_garbage", co, fit("--cohort.student_checkpoints", "{s: {garbage}}"))
    add("student_checkpoint_missing", co, fit("--cohort.student_checkpoints", "{s: {tmp}/nowhere.pt}"))
    add("student_checkpoint_is_a_folder", co, fit("--cohort.student_checkpoints", "{s: {empty_dir}}"))
    add("student_checkpoint_of_another_architecture", co, fit("--cohort.student_checkpoints", "{s: {s10}}"))
    add("student_checkpoint_from_a_finished_run", co, fit("--cohort.student_checkpoints", "{s: " + CKPT + "}"),
        refuse=False, setup=copy_runs, note="control: a run's last.ckpt warm-starts a student of the same architecture")
    add("stage_with_unknown_student", co, fit("--stages", "[{name: a, students: [ghost]}]"))
    add("stage_with_unknown_teacher", co, fit("--stages", "[{name: a, students: [s], teachers: [ghost]}]"))
    add("stages_empty_list", co, fit("--stages", "[]"))
    add("stages_duplicate_names", co, fit("--stages", "[{name: a, students: [s]}, {name: a, students: [s]}]"))

    # ---- data
    da = "data"
    for fld, value in (("batch_size", "0"), ("batch_size", "-1"), ("eval_batch_size", "0"), ("num_workers", "-1"),
                       ("subset", "0"), ("subset", "-5"), ("subset", "3"), ("meta_fraction", "1.0"),
                       ("val_fraction", "-0.1"), ("test_fraction", "0"), ("test_fraction", "1.5"), ("views", "0"),
                       ("label_noise", "{kind: symmetric, rate: 2}"), ("label_noise", "{kind: bogus, rate: 0.1}")):
        slug = value.strip("{}").split(",")[-1].strip().replace("rate: ", "rate_").replace("-", "minus_").replace(".", "_")
        add(f"digits_{fld}_{slug}", da, fit(*digits(fld, value)))
    add("digits_meta_and_val_leave_nothing", da, fit(*digits("meta_fraction", "0.6"), *digits("val_fraction", "0.6")))
    add("digits_batch_larger_than_the_data", da, fit(*digits("batch_size", "100000")), refuse=False,
        note="control: one batch of every training image")
    add("image_folder_root_is_a_file", da, fit("--task.init_args.data", image_data("{garbage}")))
    add("image_folder_root_missing", da, fit("--task.init_args.data", image_data("{tmp}/nowhere")))
    add("image_folder_empty_class_folders", da, fit("--task.init_args.data", image_data("{empty_classes}")))
    add("image_folder_without_test_split", da, fit("--task.init_args.data", image_data("{no_test}")))
    add("image_folder_test_classes_differ", da, fit("--task.init_args.data", image_data("{other_test_classes}")))
    add("image_folder_zero_byte_image", da, fit("--task.init_args.data", image_data("{zero_byte_image}")))
    add("image_folder_image_size_zero", da,
        fit("--task.init_args.data", data("ImageFolderData", "root: {three_classes}, image_size: 0, subset: null")))
    add("image_folder_image_size_negative", da,
        fit("--task.init_args.data", data("ImageFolderData", "root: {three_classes}, image_size: -8, subset: null")))
    add("image_folder_with_a_text_file", da, fit("--task.init_args.data", image_data("{stray_text}")), refuse=False,
        note="control: a README among the images is not an image")
    add("cifar100_files_are_garbage", da, fit("--task.init_args.data", data("CIFAR100", "root: {cifar_garbage}")))
    add("tiny_imagenet_empty_root", da, fit("--task.init_args.data", data("TinyImageNet", "root: {empty_dir}")))
    for example in ("cifar100", "tiny_imagenet", "imagefolder"):
        add(f"example_{example}_without_its_data", da, ["fit", "--config", f"{{repo}}/examples/{example}.yaml", *SMALL,
                                                        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"])

    # ---- detection (examples/coco_tiny.yaml on a 30-image shapes set)
    de = "detection"
    add("coco_root_missing", de, det(root="{tmp}/nowhere"))
    add("coco_annotations_missing", de, det(),
        setup=shapes_files(lambda d: (d / "annotations" / "instances_train2017.json").unlink()))
    add("coco_annotations_zero_bytes", de, det(), setup=shapes_edit(lambda doc: b""))
    add("coco_annotations_not_json", de, det(), setup=shapes_edit(lambda doc: "images: [1, 2\n"))
    add("coco_annotations_top_level_list", de, det(), setup=shapes_edit(lambda doc: json.dumps([doc])))
    add("coco_no_images", de, det(), setup=shapes_edit(lambda doc: doc.update(images=[], annotations=[])))
    add("coco_no_categories", de, det(), setup=shapes_edit(lambda doc: doc.update(categories=[])))
    add("coco_box_with_three_numbers", de, det(), setup=shapes_edit(_first_box({"bbox": [1.0, 2.0, 3.0]})))
    add("coco_box_negative_width", de, det(), setup=shapes_edit(_first_box({"bbox": [10.0, 10.0, -5.0, 8.0]})))
    add("coco_box_outside_the_image", de, det(), setup=shapes_edit(_first_box({"bbox": [900.0, 900.0, 20.0, 20.0]})))
    add("coco_box_nan", de, det(), setup=shapes_edit(_first_box({"bbox": [float("nan"), 1.0, 2.0, 2.0]})))
    add("coco_box_missing", de, det(), setup=shapes_edit(lambda doc: doc["annotations"][0].pop("bbox")))
    add("coco_unknown_category", de, det(), setup=shapes_edit(_first_box({"category_id": 99})))
    add("coco_annotation_of_an_unknown_image", de, det(), setup=shapes_edit(_first_box({"image_id": 123456})))
    add("coco_every_box_invalid", de, det(), setup=shapes_edit(_every_box({"bbox": [5.0, 5.0, 0.0, 0.0]})))
    add("coco_no_boxes_at_all", de, det(), setup=shapes_edit(lambda doc: doc.update(annotations=[])))
    add("coco_image_file_missing", de, det(),
        setup=shapes_files(lambda d: sorted((d / "train2017").iterdir())[2].unlink()))
    add("coco_image_file_corrupt", de, det(),
        setup=shapes_files(lambda d: sorted((d / "train2017").iterdir())[2].write_bytes(b"not a png")))
    add("coco_val_categories_differ", de, det(),
        setup=shapes_edit(lambda doc: doc.update(categories=doc["categories"][:2],
                                                 annotations=[a for a in doc["annotations"]
                                                              if a["category_id"] in {k["id"] for k in doc["categories"][:2]}]),
                          split="val"))
    add("coco_min_size_zero", de, det("--task.init_args.min_size", "0"), setup=copy_shapes)
    add("coco_regions_per_image_zero", de, det("--task.init_args.regions_per_image", "0"), setup=copy_shapes)
    add("coco_meta_fraction_one", de, det("--task.init_args.data.init_args.meta_fraction", "1.0"), setup=copy_shapes)
    add("coco_annotation_noise_out_of_range", de,
        det("--task.init_args.data.init_args.annotation_noise", "{class_flip: 2.0}"), setup=copy_shapes)
    add("coco_unknown_backbone", de, det("--cohort.students.xxs.init_args.backbone", "resnet19"), setup=copy_shapes)
    add("coco_classification_student", de, det("--cohort.students.xxs", f"{{class_path: {RESNET}, init_args: {{size: xxs}}}}"),
        setup=copy_shapes)
    add("coco_teacher_of_another_task", de,
        det("--cohort.teachers.teacher.checkpoint", "{s10}", "--cohort.teachers.teacher.train_epochs", "0"), setup=copy_shapes)
    add("coco_fpn_imitation_misspelt_path", de,
        det("--config", "{repo}/examples/methods/fpn_imitation.yaml", "--plugins.init_args.student_features",
            "[detector.backbone.fpnn[1]]"), setup=copy_shapes)
    add("coco_tiny_detectron2_without_data", de, det(root="{tmp}/nowhere", config="{repo}/examples/coco_tiny_detectron2.yaml"))
    add("example_coco_without_data", de, ["fit", "--config", "{repo}/examples/coco.yaml", *SMALL, "--trainer.accelerator", "cpu",
                                          "--trainer.precision", "32-true"])
    add("example_coco_torchvision_without_data", de, ["fit", "--config", "{repo}/examples/coco_torchvision.yaml", *SMALL,
                                                      "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"])

    # ---- checkpoints and resume (copies of the finished and the stopped run in the case's runs/)
    re_ = "resume"
    add("resume_missing_path", re_, fit("--resume", "{tmp}/runs/good/version_7", name="good"), setup=copy_runs)
    add("resume_truncated_checkpoint", re_, fit("--resume", STOPPED, name="stopped"),
        setup=with_runs(truncate("runs/stopped/version_0/checkpoints/last.ckpt")))
    add("resume_zero_byte_checkpoint", re_, fit("--resume", STOPPED + "/checkpoints/last.ckpt", name="stopped"),
        setup=with_runs(write("runs/stopped/version_0/checkpoints/last.ckpt", b"")))
    add("resume_last_with_truncated_checkpoint", re_, fit("--resume", "last", name="stopped"),
        setup=with_runs(truncate("runs/stopped/version_0/checkpoints/last.ckpt")))
    add("resume_folder_that_is_not_a_run", re_, fit("--resume", "{tmp}/empty", name="good"), setup=with_runs(mkdir("empty")))
    add("resume_run_without_checkpoints", re_, fit("--resume", STOPPED, name="stopped"),
        setup=with_runs(remove("runs/stopped/version_0/checkpoints")))
    add("resume_config_file_instead_of_checkpoint", re_, fit("--resume", STOPPED + "/config.yaml", name="stopped"),
        setup=copy_runs)
    add("resume_finished_run_folder", re_, fit("--resume", RUN, name="good"), setup=copy_runs)
    add("resume_finished_run_checkpoint", re_, fit("--resume", CKPT, name="good"), setup=copy_runs)
    add("resume_last_only_a_finished_run", re_, fit("--resume", "last", name="good"), setup=copy_runs)
    add("resume_another_seed", re_, fit("--resume", STOPPED, "--seed", "1", name="stopped"), setup=copy_runs)
    add("resume_another_architecture", re_, fit("--resume", STOPPED, "--cohort.students.s.init_args.size", "xxs", name="stopped"),
        setup=copy_runs)
    add("resume_another_architecture_allowed", re_,
        fit("--resume", STOPPED, "--cohort.students.s.init_args.size", "xxs", "--resume_changes", "allow", name="stopped"),
        setup=copy_runs)
    add("resume_another_student_name_allowed", re_,
        fit("--resume", STOPPED, "--cohort.students", f"{{q: {{class_path: {RESNET}, init_args: {{size: xxxs}}}}}}",
            "--resume_changes", "allow", name="stopped"), setup=copy_runs)
    add("resume_fewer_epochs_than_done", re_, fit("--resume", RUN, "--trainer.max_epochs", "0", name="good"), setup=copy_runs)
    add("resume_locked_run_by_path", re_, fit("--resume", STOPPED, name="stopped"), setup=copy_runs, lock=STOPPED)
    add("resume_locked_run_last", re_, fit("--resume", "last", name="stopped"), setup=copy_runs, lock=STOPPED)
    add("resume_with_plugin_whose_load_state_raises", re_,
        fit("--resume", STOPPED, "--plugins", plugin("hostile_plugins.LoadStateRaises"), "--resume_changes", "allow",
            name="stopped"), setup=copy_runs)
    add("resume_results_json_garbage", re_, fit("--resume", RUN, "--trainer.max_epochs", "2", name="good"), refuse=False,
        setup=with_runs(write("runs/good/version_0/results.json", "{not json")),
        note="control: results.json is an output, not resume state (that is in last.ckpt); extending the run writes it anew")
    add("resume_extends_a_finished_run", re_, fit("--resume", RUN, "--trainer.max_epochs", "2", name="good"), refuse=False,
        setup=copy_runs, note="control: a higher max_epochs extends a finished run")
    add("resume_stopped_run", re_, fit("--resume", "last", name="stopped"), refuse=False, setup=copy_runs,
        note="control: --resume last finishes the run max_steps stopped")

    # ---- validate / test
    ev = "evaluation"

    def evaluate(command: str, *extra: str) -> list[str]:
        return [command, "--config", "{base}", *SMALL, *extra]

    add("test_ckpt_path_missing_file", ev, evaluate("test", "--ckpt_path", "{tmp}/nowhere.ckpt"))
    add("test_ckpt_path_is_the_run_folder", ev, evaluate("test", "--ckpt_path", RUN), setup=copy_runs)
    add("test_ckpt_path_plain_state_dict", ev, evaluate("test", "--ckpt_path", "{s10}"))
    add("test_ckpt_path_truncated", ev, evaluate("test", "--ckpt_path", CKPT),
        setup=with_runs(truncate("runs/good/version_0/checkpoints/last.ckpt")))
    add("test_weights_not_a_choice", ev, evaluate("test", "--ckpt_path", CKPT, "--weights", "middle"), setup=copy_runs)
    add("test_on_gpu_without_one", ev, evaluate("test", "--ckpt_path", CKPT, "--trainer.accelerator", "gpu"), setup=copy_runs)
    add("validate_plugin_whose_evaluation_end_raises", ev,
        evaluate("validate", "--ckpt_path", CKPT, "--plugins", plugin("hostile_plugins.EvaluationEndRaises")), setup=copy_runs)
    add("validate_plugin_exits_in_configure", ev,
        evaluate("validate", "--ckpt_path", CKPT, "--plugins", plugin("hostile_plugins.ExitsInConfigure")), setup=copy_runs)
    add("test_of_a_finished_run", ev, ["test", "--config", RUN + "/config.yaml", "--ckpt_path", CKPT, "--weights", "best"],
        refuse=False, setup=copy_runs, note="control")

    # ---- export
    ex = "export"
    add("export_ckpt_path_missing", ex, ["export", "--ckpt_path", "{tmp}/nowhere.ckpt", "--student", "s"])
    add("export_unknown_student", ex, ["export", "--ckpt_path", CKPT, "--student", "nope", "--output", "out"], setup=copy_runs)
    add("export_ckpt_path_garbage", ex, ["export", "--ckpt_path", "{garbage}", "--student", "s", "--output", "out"])
    add("export_ckpt_path_plain_state_dict", ex, ["export", "--ckpt_path", "{s10}", "--student", "s", "--output", "out"])
    add("export_ckpt_path_truncated", ex, ["export", "--ckpt_path", CKPT, "--student", "s", "--output", "out"],
        setup=with_runs(truncate("runs/good/version_0/checkpoints/last.ckpt")))
    add("export_weights_not_a_choice", ex, ["export", "--ckpt_path", CKPT, "--student", "s", "--weights", "middle"],
        setup=copy_runs)
    add("export_without_student", ex, ["export", "--ckpt_path", CKPT], setup=copy_runs)
    add("export_over_an_earlier_export", ex, ["export", "--ckpt_path", CKPT, "--student", "s", "--output", "out"],
        setup=export_into("out"))
    add("export_output_is_a_file", ex, ["export", "--ckpt_path", CKPT, "--student", "s", "--output", "out.pt"],
        setup=with_runs(write("out.pt", b"a file the user kept")))
    add("export_output_unwritable", ex,
        ["export", "--ckpt_path", CKPT, "--student", "s", "--output", "/sys/collab-distill-export"], setup=copy_runs)
    add("export_overwrite_not_a_boolean", ex, ["export", "--ckpt_path", CKPT, "--student", "s", "--overwrite", "maybe"],
        setup=copy_runs)
    add("export_overwrite_true_replaces", ex, ["export", "--ckpt_path", CKPT, "--student", "s", "--output", "out",
                                               "--overwrite", "true"], refuse=False, setup=export_into("out"), note="control")

    # ---- report
    rp = "report"
    add("report_without_run_dir", rp, ["report"])
    add("report_missing_folder", rp, ["report", "{tmp}/nowhere"])
    add("report_of_a_file", rp, ["report", "{garbage}"])
    add("report_of_an_empty_folder", rp, ["report", "{empty_dir}"])
    add("report_of_a_stopped_run", rp, ["report", STOPPED], setup=copy_runs)
    add("report_results_json_garbage", rp, ["report", RUN],
        setup=with_runs(write("runs/good/version_0/results.json", "{not json")))

    # ---- plugins (tests/bad_input_plugins.py, tests/support_plugins.py, benchmarks/hostile_plugins.py)
    pl = "plugins"
    add("plugin_exits_with_code_3", pl, fit("--plugins", plugin("bad_input_plugins.EndsTheProcess", "code: 3")))
    add("plugin_hook_raises_key_error", pl, fit("--plugins", plugin("support_plugins.FailingLossWeights")))
    add("plugin_hook_argument_misspelt", pl, fit("--plugins", plugin("support_plugins.MisspelledArgument")))
    add("plugin_hooks_without_hookimpl", pl, fit("--plugins", plugin("support_plugins.UndecoratedHooks")), refuse=False,
        note="control: a warning names the methods the engine will not call")
    add("plugin_init_arg_wrong_type", pl, fit("--plugins", plugin(FIXED, "alpha: abc")))
    add("plugin_init_arg_unknown", pl, fit("--plugins", plugin(FIXED, "alphaa: 1.0")))
    add("plugin_init_arg_nan", pl, fit("--plugins", plugin(FIXED, "alpha: .nan")))
    add("plugin_required_init_arg_missing", pl, fit("--plugins", plugin("hostile_plugins.RequiredArgument")))
    add("plugin_init_exits", pl, fit("--plugins", plugin("hostile_plugins.InitExits")))
    add("plugin_not_a_plugin_subclass", pl, fit("--plugins", plugin("hostile_plugins.NotAPluginSubclass")))
    add("plugin_module_fails_to_import", pl, fit("--plugins", plugin("broken_plugin_module.Rule")),
        setup=write("broken_plugin_module.py", "import collab_distill_missing_dependency\n"), pythonpath_cwd=True)
    add("plugins_given_as_a_mapping", pl, fit("--plugins", f"{{class_path: {FIXED}}}"),
        note="one plugin, a mapping where the field is a list")
    add("disable_plugins_defaults_without_a_provider", pl, fit("--disable_plugins", "defaults"),
        note="nothing provides loss weights any more")
    add("fitnets_misspelt_feature", pl, fit("--plugins", plugin("collab_distill.plugins.hints.FitNets",
                                                                "student_features: [layer9]"),
                                            "--cohort.teachers", teacher("s", "{s10}")))
    for name in ("WeightsWrongType", "WeightsPlainNumbers", "WeightsWrongShape", "WeightsMissingStudent", "WeightsUnknownStudent",
                 "WeightsNegative", "WeightsIntegerTensor", "WeightsNaNFromStart", "WeightsBadConstant", "TargetsWrongClasses",
                 "TargetsNotAMapping", "TargetsNaN", "ConsensusWithGraph", "AuxiliaryNotScalar", "AuxiliaryNotATensor",
                 "AuxiliaryNaN", "AuxiliaryUndeclaredParameter", "AuxiliaryUnknownStudent", "TermsReservedName", "TermsBadName",
                 "TermsDeclaredAsString", "TermsWrongShape", "TermsUndeclared", "MetaModuleNotWrapped", "MetaModuleDuplicateName",
                 "MetaModuleWithoutParameters", "FeatureUnknownPath", "FeatureUnknownMember", "FeatureAsStrings",
                 "StudentModuleUnknownStudent", "StudentModuleNotAModule", "ConfigureRefuses", "ConfigureRaisesValueError",
                 "FitStartRaises", "EpochEndRaises", "FitEndRaises", "SaveStateUnpicklable",
                 "ReportSectionsWrongType", "ReportFigureOutsideRun", "ExitsInConfigure", "ExitsInFitEnd", "ExitsWithNone",
                 "RaisesBaseException"):
        slug = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
        add(f"plugin_{slug}", pl, fit("--plugins", plugin(f"hostile_plugins.{name}")), late=HOOKS_CALLED_LATE.get(name, ""))
    add("plugin_save_state_clobbers", pl,  # listed first: called after SavesItsState, whose key it overwrites
        fit("--plugins", "[{class_path: hostile_plugins.SaveStateClobbers}, {class_path: hostile_plugins.SavesItsState}]"),
        late="collab_distill_save_state is first called at the first checkpoint, after the first epoch",
        note="plugins are handed a dict of plugin state only: what one can clobber is another plugin's key")
    for name in ("MetaObjectiveNotScalar", "MetaObjectiveNaN", "MetaObjectiveDetached"):
        slug = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
        add(f"plugin_{slug}", pl, fit("--plugins", plugin(f"hostile_plugins.{name}"), "--meta.every_n_steps", "1"))

    # ---- paths
    pa = "paths"
    add("run_name_dot_dot", pa, fit("--trainer.name", ".."))
    add("run_name_dot_dot_twice", pa, fit("--trainer.name", "../.."))
    add("run_name_absolute", pa, fit("--trainer.name", "{box}/elsewhere"))
    add("run_name_inner_escape", pa, fit("--trainer.name", "a/../../../b"))
    add("run_name_empty", pa, fit("--trainer.name", ""), refuse=False, note="control: empty means the config file's name")
    add("run_name_too_long", pa, fit("--trainer.name", "n" * 300))
    add("root_dir_is_a_file", pa, fit("--trainer.root_dir", "{garbage}"))
    add("root_dir_in_proc", pa, fit("--trainer.root_dir", "/proc/collab-distill-runs"))
    add("root_dir_below_dev_null", pa, fit("--trainer.root_dir", "/dev/null/runs"))
    add("root_dir_empty_string", pa, fit("--trainer.root_dir", ""))
    add("root_dir_path_too_long", pa, fit("--trainer.root_dir", "/".join(["d" * 200] * 25)))

    # ---- hardware (this machine has no GPU)
    hw = "hardware"
    for acc in ("cuda", "mps", "tpu", "bogus"):
        add(f"accelerator_{acc}", hw, fit("--trainer.accelerator", acc))
    add("devices_zero", hw, fit("--trainer.devices", "0"))
    add("devices_minus_one", hw, fit("--trainer.devices", "-1"))
    add("devices_text", hw, fit("--trainer.devices", "abc"))
    add("devices_two_on_gpu", hw, fit("--trainer.accelerator", "gpu", "--trainer.devices", "2"))
    add("num_nodes_two_on_one_machine", hw, fit("--trainer.num_nodes", "2"),
        note="world size 2 with nobody to join: must not wait for a second node forever")
    add("fp16_with_accelerator_auto", hw, fit("--trainer.precision", "16-mixed", "--trainer.accelerator", "auto"))
    add("strategy_deepspeed_not_installed", hw, fit("--trainer.strategy", "deepspeed"))
    add("strategy_fsdp_on_cpu", hw, fit("--trainer.strategy", "fsdp"))
    add("precision_empty", hw, fit("--trainer.precision", ""))
    add("bf16_mixed_on_cpu", hw, fit("--trainer.precision", "bf16-mixed"), refuse=False, note="control: CPU autocast")
    add("channels_last_on_cpu", hw, fit("--trainer.channels_last", "true"), refuse=False, note="control")
    return c


def all_cases() -> list[Case]:
    import torch

    cases = test_cases() + new_cases()
    if torch.cuda.is_available():
        for case in cases:
            if case.group == "hardware" and any(a in ("gpu", "cuda") for a in case.args):
                case.skip = case.skip or "this machine has a GPU"
    ids = Counter(case.id for case in cases)
    clash = [i for i, n in ids.items() if n > 1]
    if clash:
        raise SystemExit(f"duplicate case ids: {clash}")
    return cases


# ---------------------------------------------------------------------------------------------
# running and classifying
# ---------------------------------------------------------------------------------------------


def _digests(folder: Path) -> dict[str, str]:
    """Every path under ``folder``: a file's sha256, ``<dir>`` for a folder, ``-> target`` for a link."""
    out: dict[str, str] = {}
    if not folder.exists():
        return out
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = f"-> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "<dir>"
            else:
                try:
                    out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
                except OSError as err:
                    out[rel] = f"<unreadable: {err.strerror}>"
    return out


def _compare(before: dict[str, str], after: dict[str, str]) -> tuple[list[str], list[str]]:
    """(new paths, changed or removed paths). A run folder's ``.lock`` names the process that
    holds it and is rewritten by every process that takes the lock: its content is not compared."""
    new = sorted(p for p in after if p not in before)
    changed = sorted(p for p in before if p not in after
                     or (after[p] != before[p] and before[p] != "<dir>" and Path(p).name != ".lock"))
    return new, changed


class Portable:
    """Replaces this machine's paths in commands and messages."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = sorted(((str(a), b) for a, b in pairs if str(a)), key=lambda p: -len(p[0]))

    def __call__(self, text: str) -> str:
        for path, name in self.pairs:
            text = text.replace(path, name)
        # a message may shorten a long path ('/tmp/hostile_inputs_x...ddd/bad'), so the whole
        # path no longer matches: its temporary folder's name still goes
        return re.sub(r"(?:/[\w.-]+)*/hostile_inputs_\w+", "$WORK", text)


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(f"{{{key}}}", value)
    return text


def _hold_lock(run: Path, env: dict[str, str]) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from collab_distill.run_folder import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    assert holder.stdout is not None
    if holder.stdout.readline().strip() != "locked":
        raise RuntimeError(f"could not lock {run}")
    return holder


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def classify(refuse: bool, rc: Optional[int], out: str, err: str, new: list[str], changed: list[str],
             late: str = "") -> tuple[str, str]:
    """(class, why); ``late``: why the case's error can only come after work has started."""
    text = out + "\n" + err
    errors = [line for line in text.splitlines() if line.startswith(ERROR)]
    started = bool(EPOCH_LINE.search(out))
    if not refuse and rc == 0:
        return ACCEPTED, ""
    if changed:
        return "files changed", f"{len(changed)} existing path(s) modified or removed"
    if rc == 0:
        return "silent", "exit code 0" + (", training ran" if started else "") + (f", {len(new)} new path(s)" if new else "")
    if rc is None:
        return "traceback", f"no exit within {TIMEOUT} s"
    if "Traceback" in text:
        if len(errors) == 1 and err.lstrip().startswith(ERROR):
            return "traceback", "one error line, then a Python traceback"
        return "traceback", "an uncaught exception's traceback" if not errors else "a Python traceback in the output"
    if len(errors) != 1:
        return "traceback", f"{len(errors)} lines starting '{ERROR}'"
    if (started or new) and late:
        return LATE_BY_NATURE, late
    if started or new:
        return "clear but late", ", ".join(filter(None, ["training had started" if started else "",
                                                         f"{len(new)} new path(s)" if new else ""]))
    return "clear and early", ""


def run_case(case: Case, inputs: Path, work: Path, exe: list[str], base_env: dict[str, str], index: int) -> dict[str, Any]:
    box = work / f"{index:03d}_{case.id}"
    cwd = box / "home" / "cwd"  # ../.. of the runs folder still lies inside the box
    cwd.mkdir(parents=True)
    values = {"tmp": str(cwd), "box": str(box), "in": str(inputs), "repo": str(REPO),
              "base": str(inputs / "base.yaml")}
    values.update({k: str(v) for k, v in FIXTURES.items()})
    portable = Portable([(cwd, "$TMP"), (box, "$BOX"), (inputs, "$INPUTS"), (str(Path(sys.executable).parent) + "/", ""),
                         (str(REPO) + "/", ""), (REPO, "."), (str(Path(os.__file__).parent) + "/", "<python>/")])
    args = [_fill(a, values) for a in case.args]
    env = dict(base_env)
    if case.pythonpath_cwd:
        env["PYTHONPATH"] = os.pathsep.join([str(cwd), env["PYTHONPATH"]])
    record: dict[str, Any] = {"id": case.id, "group": case.group, "source": case.source, "refusal_expected": case.refuse,
                              "command": portable(shlex.join(["collab-distill", *args])), "note": case.note}
    if case.skip:
        return {**record, "class": "skipped", "why": case.skip}
    if case.setup is not None:
        case.setup(cwd, inputs)
    holder = _hold_lock(Path(_fill(case.lock, values)), env) if case.lock else None
    before_box, before_inputs = _digests(box), _digests(inputs)
    start = time.perf_counter()
    proc = subprocess.Popen(exe + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
        rc: Optional[int] = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        rc = None
    finally:
        if holder is not None:
            _kill_group(holder)
    seconds = time.perf_counter() - start
    try:  # a child the command left behind (a DDP worker) must not outlive the case
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    new_box, changed_box = _compare(before_box, _digests(box))
    new_in, changed_in = _compare(before_inputs, _digests(inputs))
    new = [f"$BOX/{p}" for p in new_box] + [f"$INPUTS/{p}" for p in new_in]
    changed = [f"$BOX/{p}" for p in changed_box] + [f"$INPUTS/{p}" for p in changed_in]
    cls, why = classify(case.refuse, rc, out, err, new, changed, case.late)
    errors = [line for line in (out + "\n" + err).splitlines() if line.startswith(ERROR)]
    message: list[str] = []
    if errors:  # the error line and the lines that continue its message (indented, or up to a blank line)
        lines = err.splitlines()
        at = next((i for i, line in enumerate(lines) if line.startswith(ERROR)), None)
        if at is not None:
            message = [lines[at]]
            for line in lines[at + 1: at + 6]:
                if not line.strip() or line.startswith((ERROR, "Traceback")):
                    break
                message.append(line.strip())
    err_lines = [portable(line)[:400] for line in err.splitlines() if line.strip()]
    out_lines = [portable(line)[:400] for line in out.splitlines() if line.strip()]
    record.update({
        "exit_code": rc, "class": cls, "why": why, "seconds": round(seconds, 1),
        "first_error_line": portable(errors[0])[:600] if errors else (err_lines[-1] if err_lines else ""),
        "error_message": portable(" ".join(message))[:900],
        "training_started": bool(EPOCH_LINE.search(out)),
        "new_paths": [portable(p) for p in new[:8]], "new_path_count": len(new),
        "changed_paths": [portable(p) for p in changed[:8]],
        "stderr_head": err_lines[:8], "stderr_tail": err_lines[-4:] if len(err_lines) > 8 else [],
        "stdout_head": out_lines[:4],
    })
    if case.id == "config_file_python_tag" and (cwd / "pwned_by_yaml").exists():
        record["why"] = (record["why"] + "; " if record["why"] else "") + "the YAML tag ran os.system"
    return record


FIXTURES: dict[str, Path] = {}


def run(cases: list[Case], jobs: int) -> list[dict[str, Any]]:
    exe_path = Path(sys.executable).with_name("collab-distill")
    exe = [str(exe_path)] if exe_path.is_file() else [sys.executable, "-m", "collab_distill"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NO_COLOR="1", COLUMNS="200", PYTHONDONTWRITEBYTECODE="1")
    census = Path(tempfile.mkdtemp(prefix="hostile_inputs_"))
    try:
        inputs, work = census / "inputs", census / "cases"
        inputs.mkdir()
        work.mkdir()
        t0 = time.perf_counter()
        FIXTURES.update(make_inputs(inputs, exe, env))
        print(f"inputs and the finished run made in {time.perf_counter() - t0:.0f} s ({census})", flush=True)
        results: list[Optional[dict[str, Any]]] = [None] * len(cases)
        lock = threading.Lock()

        def one(i: int) -> None:
            record = run_case(cases[i], inputs, work, exe, env, i)
            shutil.rmtree(work / f"{i:03d}_{cases[i].id}", ignore_errors=True)
            with lock:
                results[i] = record
                done = sum(r is not None for r in results)
                print(f"[{done:3d}/{len(cases)}] {record['class']:<20} {record.get('exit_code')!s:>4} "
                      f"{record.get('seconds', 0):6.1f}s  {cases[i].group}/{cases[i].id}", flush=True)

        if jobs <= 1:
            for i in range(len(cases)):
                one(i)
        else:
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(one, range(len(cases))))
        return [r for r in results if r is not None]
    finally:
        for p in census.rglob("*"):  # a read-only folder a case made must not stop the clean-up
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o700)
        shutil.rmtree(census, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def render(doc: dict[str, Any]) -> str:
    cases = doc["cases"]
    hostile = [c for c in cases if c["class"] in CLASSES]
    counts = Counter(c["class"] for c in hostile)
    lines = [
        "# Hostile inputs to the command line",
        "",
        f"`benchmarks/hostile_inputs.py` ({doc['when']}, torch {doc['torch']}, {doc['machine']}; `--jobs {doc['jobs']}`): "
        f"{len(cases)} cases, each a real `collab-distill` subprocess in a fresh temporary directory (timeout {TIMEOUT} s); "
        f"{len(hostile)} hostile inputs counted, "
        f"{sum(c['class'] == ACCEPTED for c in cases)} controls accepted as intended, "
        f"{sum(c['class'] == 'skipped' for c in cases)} skipped on this machine. "
        f"{sum(c['source'] != 'new' for c in hostile)} of the hostile inputs come from `tests/test_bad_input.py` "
        "(and `tests/test_cli.py`).",
        "",
        "Classes: **clear and early** = exit code != 0, exactly one `collab-distill: error:` line, no traceback, no "
        "training output, no new or changed file; **clear, late by nature** = one clear error line after work had "
        "started, for an input whose fault can only show then (the case says why: a NaN at step N, say); "
        "**clear but late** = one clear error line, but training had started or "
        "files were written; **traceback** = a Python traceback, several or no error lines, or a timeout; "
        "**silent** = exit code 0 for an input that should be refused; **files changed** = an existing file (the finished "
        "run's copy, the user's inputs) was modified or removed.",
        "",
        "| class | hostile inputs |",
        "|---|---|",
        *[f"| {k} | {counts.get(k, 0)} |" for k in CLASSES],
        f"| **total** | **{len(hostile)}** |",
        "",
        "## Per group",
        "",
        "| group | " + " | ".join(CLASSES) + " | total | controls accepted |",
        "|---|" + "---|" * (len(CLASSES) + 2),
    ]
    groups = sorted({c["group"] for c in cases})
    for g in groups:
        in_g = [c for c in hostile if c["group"] == g]
        row = [str(sum(c["class"] == k for c in in_g)) for k in CLASSES]
        accepted = sum(c["class"] == ACCEPTED and c["group"] == g for c in cases)
        lines.append(f"| {g} | " + " | ".join(row) + f" | {len(in_g)} | {accepted} |")
    lines += ["", "## Every case that is not clear and early", "",
              "| id | group | class | exit | command | why | output excerpt |", "|---|---|---|---|---|---|---|"]
    order = {k: i for i, k in enumerate(("files changed", "traceback", "silent", "clear but late", LATE_BY_NATURE))}
    unclear = (c for c in hostile if c["class"] != "clear and early")
    for c in sorted(unclear, key=lambda c: (order[c["class"]], c["group"], c["id"])):
        excerpt = c.get("error_message") or c.get("first_error_line") or ""
        if c["class"] == "traceback":
            excerpt = " ⏎ ".join([*c.get("stderr_head", [])[:2], "…", *c.get("stderr_tail", [])[-2:]]) \
                if c.get("stderr_tail") else " ⏎ ".join(c.get("stderr_head", [])[:5])
        elif c["class"] == "silent":
            excerpt = " ⏎ ".join(c.get("stderr_head", [])[:2] or c.get("stdout_head", [])[:2])
        why = c.get("why", "")
        if c.get("changed_paths"):
            why += ": " + ", ".join(c["changed_paths"][:3])
        elif c.get("new_paths") and c["class"] in ("clear but late", "silent"):
            why += ": " + ", ".join(c["new_paths"][:2])
        lines.append(f"| {c['id']} | {c['group']} | {c['class']} | {c.get('exit_code')} | `{_cell(c['command'])}` | "
                     f"{_cell(why)} | {_cell(excerpt[:500])} |")
    skipped = [c for c in cases if c["class"] == "skipped"]
    if skipped:
        lines += ["", "Skipped here: " + "; ".join(f"{c['id']} ({c['why']})" for c in skipped) + "."]
    controls = [c for c in cases if not c["refusal_expected"]]
    if controls:
        lines += ["", "Controls (expected to succeed): " + ", ".join(f"{c['id']} ({c['class']})" for c in controls) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="GROUP", action="append", help="run only this group (repeatable); merged into "
                        "the existing results")
    parser.add_argument("--case", action="append", help="run only this case id (repeatable); merged like --only")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON")
    args = parser.parse_args(argv)
    json_path, md_path = args.out / "hostile_inputs.json", args.out / "hostile_inputs.md"
    if args.render_only:
        md_path.write_text(render(json.loads(json_path.read_text())))
        return 0
    cases = all_cases()
    groups = sorted({c.group for c in cases})
    if args.only:
        unknown = set(args.only) - set(groups)
        if unknown:
            parser.error(f"unknown group(s) {sorted(unknown)}; groups: {', '.join(groups)}")
        cases = [c for c in cases if c.group in args.only]
    if args.case:
        unknown = set(args.case) - {c.id for c in cases}
        if unknown:
            parser.error(f"unknown case id(s) {sorted(unknown)}")
        cases = [c for c in cases if c.id in args.case]
    if args.list:
        for c in cases:
            print(f"{c.group:<14} {c.id:<58} {'refuse' if c.refuse else 'accept'}  {c.source}")
        print(f"{len(cases)} cases, {sum(c.refuse for c in cases)} hostile")
        return 0
    import platform

    import torch

    records = run(cases, args.jobs)
    if (args.only or args.case) and json_path.exists():
        kept = json.loads(json_path.read_text())
        done = {r["id"] for r in records}
        order = [c.id for c in all_cases()]
        merged = {r["id"]: r for r in kept["cases"] if r["id"] not in done and r["id"] in order}
        merged.update({r["id"]: r for r in records})
        records = [merged[i] for i in order if i in merged]
    doc = {"when": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "jobs": args.jobs,
           "machine": f"{os.cpu_count()} CPU cores, {'a GPU' if torch.cuda.is_available() else 'no GPU'}, {platform.system()}",
           "timeout_s": TIMEOUT, "counts": dict(Counter(r["class"] for r in records)), "cases": records}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(render(doc))
    print(f"wrote {json_path} and {md_path}: {doc['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
