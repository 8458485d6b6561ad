"""Resuming never loses or rewrites a run's records: a resume whose config differs is refused (or
accepted and recorded), ``--resume last`` picks only an unfinished run of the same config, a run
folder is locked while a process trains in it, and a run killed in any phase (in-run teacher
training included) resumes to the same bits as an uninterrupted run."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from collab_distill.cli import main
from collab_distill.run_folder import RunLock
from tiny_config import tiny_digits_yaml

# one tiny student on 200 digits: a run takes a few seconds
BASE = tiny_digits_yaml(loggers="[csv]")


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _call(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.fixture()
def config(tmp_path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    return path


def _fit(capsys, config: Path, root: Path, *extra: str, name: str | None = "r") -> tuple[int, str]:
    capsys.readouterr()
    named = ["--trainer.name", name] if name else []
    rc = _call(["fit", "--config", str(config), "--trainer.root_dir", str(root), *named, *extra])
    return rc, capsys.readouterr().err


def _one_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err and err.count("error:") == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


def test_a_resume_with_another_config_is_refused_unless_allowed_and_then_recorded(capsys, config, tmp_path):
    root = tmp_path / "runs"
    assert _fit(capsys, config, root, "--trainer.log_every_n_steps", "2")[0] == 0
    run = root / "r" / "version_0"
    before = _digests(run)
    started = {f: (run / f).read_bytes() for f in ("versions.json", "models.json")}
    refused = [
        (["--seed", "1"], "seed: 0 -> 1"),
        (["--optimizer.init_args.lr", "0.2"], "optimizer.init_args.lr: 0.05 -> 0.2"),
        (["--trainer.max_epochs", "2", "--trainer.temperature", "2"], "trainer.temperature: 4.0 -> 2.0"),
        # max_epochs may grow (an extension), never shrink below the run's plan
        (["--cohort.students.s.init_args.size", "xxs"], "cohort.students.s.init_args.size: 'xxxs' -> 'xxs'"),
    ]
    for extra, needle in refused:
        rc, err = _fit(capsys, config, root, "--resume", str(run), *extra)
        assert rc == 2, err
        _one_error(err, f"--resume {run}", needle, "--resume_changes allow", "start a new run")
        assert _digests(run) == before, extra
    # allowed: a longer run (and another logging cadence) continues in the same folder
    rc, err = _fit(capsys, config, root, "--resume", str(run), "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "3")
    assert rc == 0, err
    resumes = json.loads((run / "resumes.json").read_text())
    assert resumes[0]["from_epoch"] == 1 and set(resumes[0]["changes"]) == {"trainer.max_epochs", "trainer.log_every_n_steps"}
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == 2  # the config it finished with
    assert yaml.safe_load((run / "config.0.yaml").read_text())["trainer"]["max_epochs"] == 1  # the one it started with
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 2 and results["resumes"] == resumes
    assert all((run / f).read_bytes() == text for f, text in started.items())  # how the run started: kept
    # accepted on request: another seed, recorded with the values on both sides
    rc, err = _fit(capsys, config, root, "--resume", str(run), "--trainer.max_epochs", "3", "--seed", "1",
                   "--resume_changes", "allow")
    assert rc == 0, err
    resumes = json.loads((run / "resumes.json").read_text())
    assert resumes[1]["changes"]["seed"] == {"run": 0, "now": 1}
    assert json.loads((run / "results.json").read_text())["seed"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 1
    assert not (root / "r" / "version_1").exists()
    # the metrics log kept every epoch's rows across both resumes
    with (run / "logs" / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    val_steps = sorted({int(float(r["step"])) for r in rows if any(k.startswith("val/") and v for k, v in r.items())})
    assert len(val_steps) == 3, val_steps
    assert min(int(float(r["step"])) for r in rows) < val_steps[0]  # the first epoch's step rows too


def test_a_checkpoint_of_another_architecture_stops_before_any_file_changes(capsys, config, tmp_path):
    root = tmp_path / "runs"
    assert _fit(capsys, config, root)[0] == 0
    run = root / "r" / "version_0"
    before = _digests(run)
    rc, err = _fit(capsys, config, root, "--resume", str(run / "checkpoints" / "last.ckpt"), "--trainer.max_epochs", "2",
                   "--cohort.students.s.init_args.size", "xxs", "--resume_changes", "allow")
    assert rc == 2, err
    _one_error(err, "student 's' of the checkpoint does not fit the configured model", "config.yaml")
    assert _digests(run) == before  # models.json included


def test_resume_last_picks_only_an_unfinished_run_of_this_config(capsys, config, tmp_path):
    root = tmp_path / "runs"
    assert _fit(capsys, config, root)[0] == 0  # version_0: finished, seed 0
    finished = root / "r" / "version_0"
    before = _digests(finished)
    rc, err = _fit(capsys, config, root, "--resume", "last", "--seed", "1")
    assert rc == 2
    _one_error(err, "--resume last: no run under", "has this config", "version_0 (seed: 0 -> 1)")
    rc, err = _fit(capsys, config, root, "--resume", "last")
    assert rc == 2
    _one_error(err, "has finished all 1 epochs", "nothing to resume", "without --resume", "--trainer.max_epochs")
    assert _digests(finished) == before
    # a newer run of seed 1 stopped by max_steps, and a run folder with another config on top
    assert _fit(capsys, config, root, "--seed", "1", "--trainer.max_steps", "2")[0] == 0
    assert _fit(capsys, config, root, "--seed", "2", "--trainer.max_steps", "2")[0] == 0
    stopped = root / "r" / "version_1"
    rc, err = _fit(capsys, config, root, "--resume", "last", "--seed", "1")
    assert rc == 0, err
    results = json.loads((stopped / "results.json").read_text())
    assert results["status"] == "finished" and results["seed"] == 1
    assert _digests(finished) == before
    assert json.loads((root / "r" / "version_2" / "results.json").read_text())["status"] == "stopped"


def test_a_finished_run_named_by_its_folder_or_checkpoint_is_refused_unless_extended(capsys, config, tmp_path):
    """``--resume RUN`` or ``--resume RUN/checkpoints/last.ckpt`` of a run that finished all its
    epochs is refused as ``--resume last`` is, with nothing rewritten (no re-evaluation, no
    resumes.json); a higher ``--trainer.max_epochs`` still extends it."""
    root = tmp_path / "runs"
    assert _fit(capsys, config, root)[0] == 0
    run = root / "r" / "version_0"
    before = _digests(run)
    for how in (str(run), str(run / "checkpoints" / "last.ckpt")):
        rc, err = _fit(capsys, config, root, "--resume", how)
        assert rc == 2, err
        _one_error(err, f"--resume {how}", str(run), "has finished all 1 epochs", "nothing to resume",
                   "without --resume", "--trainer.max_epochs")
        assert _digests(run) == before, how  # results.json kept, no resumes.json
        assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    rc, err = _fit(capsys, config, root, "--resume", str(run), "--trainer.max_epochs", "2")
    assert rc == 0, err
    assert json.loads((run / "results.json").read_text())["epochs"] == 2
    assert len(json.loads((run / "resumes.json").read_text())) == 1


def test_a_locked_run_folder_is_not_joined_and_partial_files_are_cleaned(capsys, config, tmp_path):
    root = tmp_path / "runs"
    assert _fit(capsys, config, root, "--trainer.max_steps", "2")[0] == 0
    run = root / "r" / "version_0"
    # another process holds the folder's lock, as a process training in it does
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from collab_distill.run_folder import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = _digests(run)
        for how in ("last", str(run)):
            rc, err = _fit(capsys, config, root, "--resume", how)
            assert rc == 2, err
            _one_error(err, str(run), "is being trained by another process", f'"pid": {holder.pid}')
            assert _digests(run) == before
    finally:
        holder.kill()
        holder.wait()
    # what a checkpoint write killed mid-way leaves is removed once the folder is locked again
    partial = run / "checkpoints" / "last.ckpt.k3j9x_2a.tmp"
    partial.write_bytes(b"half a checkpoint")
    keep = run / "notes.tmp"  # not a file the run writes: left alone
    keep.write_text("mine")
    rc, err = _fit(capsys, config, root, "--resume", "last")
    assert rc == 0, err
    assert not partial.exists() and keep.read_text() == "mine"
    assert json.loads((run / "results.json").read_text())["status"] == "finished"
    again = RunLock(run)
    again.acquire()  # released at the end of fit (it would raise RunFolderBusy otherwise)
    again.release()


def _cli(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "collab_distill", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_a_run_killed_while_training_its_teacher_resumes_to_the_same_bits(capsys, tmp_path, cli_env):
    """SIGKILL during the in-run teacher training (after its first checkpoint): ``--resume last``
    continues the teacher's own run from its checkpoint and then the cohort; teacher and students
    equal an uninterrupted run's."""
    config = tmp_path / "t.yaml"
    config.write_text(tiny_digits_yaml(subset=600, loggers="[csv]", teacher="xs").replace("train_epochs: 1", "train_epochs: 2")
                      .replace("loggers: [csv]", "loggers: [csv]\n  checkpoint_every_n_steps: 2"))
    common = ["fit", "--config", str(config), "--trainer.root_dir", str(tmp_path), "--trainer.max_epochs", "2"]
    whole = _cli([*common, "--trainer.name", "whole"], cli_env)
    cut = _cli([*common, "--trainer.name", "cut"], cli_env)
    run = tmp_path / "cut" / "version_0"
    teacher_ckpt = run / "teachers" / "t" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not teacher_ckpt.is_file():
        assert cut.poll() is None and time.time() < deadline, cut.communicate()[1][-3000:]
        time.sleep(0.02)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    assert not (run / "teachers" / "t" / "teacher.pt").exists(), "killed after its teacher phase: nothing tested"
    assert not (run / "checkpoints" / "last.ckpt").exists()
    assert whole.wait() == 0, whole.communicate()[1][-3000:]
    # the teacher's own checkpoint is not what a user resumes: the message names the run to resume
    rc, err = _fit(capsys, config, tmp_path, "--trainer.max_epochs", "2", "--resume", str(teacher_ckpt), name="cut")
    assert rc == 2
    _one_error(err, "is the run of one teacher inside the run", f"--resume {run}")
    resumed = subprocess.run([sys.executable, "-m", "collab_distill", *common, "--trainer.name", "cut", "--resume", "last"],
                             env=cli_env, text=True, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = tmp_path / "whole" / "version_0"
    a = torch.load(ref / "teachers" / "t" / "teacher.pt")
    b = torch.load(run / "teachers" / "t" / "teacher.pt")
    assert all(torch.equal(v, b[k]) for k, v in a.items()), "the teacher differs after the resume"
    a = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert _position(a) == _position(b)
    for key, value in a["students"]["s"].items():
        assert torch.equal(value, b["students"]["s"][key]), f"s.{key} differs after resume"
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (ref, run))
    assert ra["students"] == rb["students"]
    assert json.loads((run / "resumes.json").read_text())[0]["from_step"] is None  # no cohort checkpoint yet


def test_a_run_killed_after_its_teacher_phase_restarts_the_cohort_from_the_same_state(capsys, tmp_path):
    """Killed between its teacher's training and its first own checkpoint (emulated by removing
    what the cohort phase wrote): the resume loads the trained teacher and reaches the same bits."""
    config = tmp_path / "t.yaml"
    config.write_text(tiny_digits_yaml(loggers="[csv]", teacher="xxs"))
    root = tmp_path / "runs"
    assert _fit(capsys, config, root)[0] == 0
    run = root / "r" / "version_0"
    whole = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    for path in (run / "checkpoints" / "last.ckpt", run / "results.json", run / "logs" / "csv" / "metrics.csv"):
        path.unlink()
    rc, err = _fit(capsys, config, root, "--resume", "last")
    assert rc == 0, err
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert _position(whole) == _position(resumed)
    for key, value in whole["students"]["s"].items():
        assert torch.equal(value, resumed["students"]["s"][key]), f"s.{key} differs"


def _position(checkpoint):
    """Where a checkpoint's loop stands (its history holds wall-clock seconds, which differ)."""
    return {k: checkpoint["loop"][k] for k in ("epoch", "batch_in_epoch", "global_step")}
