"""The command line as a user runs it: real subprocesses, real files on disk."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
import yaml

from conftest import REPO, digits_args

pytestmark = pytest.mark.slow


_WORKDIR = tempfile.mkdtemp(prefix="collab_distill_cli_")  # empty: nothing in cwd can shadow a module


def run_cli(args, env, check=True, timeout=300):
    proc = subprocess.run(
        [sys.executable, "-m", "collab_distill", *args], env=env, capture_output=True, text=True, timeout=timeout,
        cwd=_WORKDIR,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One small digits KD run through the CLI, shared by the tests that inspect its outputs."""
    import os

    from conftest import TESTS

    env = dict(os.environ, PYTHONPATH=str(TESTS), NO_COLOR="1", COLUMNS="200")
    root = tmp_path_factory.mktemp("runs")
    proc = run_cli(digits_args(root, "kd", epochs=2), env)
    return root / "kd" / "version_0", proc, env


def test_fit_writes_a_complete_run_folder(finished_run):
    run, proc, _ = finished_run
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and results["epochs"] == 2
    for name in ("xxs", "xs", "s"):
        entry = results["students"][name]
        assert 0 <= entry["last"]["test_top1"] <= 100
        assert entry["best_on_val"]["epoch"] in (1, 2)
        assert entry["params"] > 0 and entry["macs"] > 0
    assert "test" in results["teachers"]["teacher"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 2 and config["seed"] == 0
    versions = json.loads((run / "versions.json").read_text())
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"].startswith(torch.__version__[:4])
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "teachers" / "teacher" / "teacher.pt").is_file()
    metrics = (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("step") and "train/loss" in metrics[0] and len(metrics) > 2
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    # the parameter/MAC table and the results table are printed
    assert "MACs" in proc.stdout and "best val" in proc.stdout


def test_a_second_fit_never_overwrites_the_first(finished_run, tmp_path):
    run, _, env = finished_run
    before = (run / "results.json").read_bytes()
    proc = run_cli(digits_args(run.parent.parent, "kd", epochs=1), env)
    assert (run.parent / "version_1" / "results.json").is_file()
    assert (run / "results.json").read_bytes() == before
    assert "version_1" in proc.stdout


def test_print_config_round_trips(tmp_path, cli_env):
    first = run_cli(digits_args(tmp_path, "p", extra=["--print_config"]), cli_env).stdout
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(first)
    second = run_cli(["fit", "--config", str(dumped), "--print_config"], cli_env).stdout
    assert yaml.safe_load(first) == yaml.safe_load(second)
    assert not any(tmp_path.glob("p/*")), "--print_config must not start a run"


def test_overrides_and_seed_reach_the_config(tmp_path, cli_env):
    out = run_cli(digits_args(tmp_path, "o", extra=["--trainer.max_epochs", "7", "--seed", "3", "--print_config"]), cli_env)
    cfg = yaml.safe_load(out.stdout)
    assert cfg["trainer"]["max_epochs"] == 7 and cfg["seed"] == 3


def test_the_readmes_ways_to_compose_the_plugin_list(tmp_path, capsys):
    """plugins+: in a later file appends; --plugins+ appends; --plugins.init_args.X sets the last plugin's X."""
    from collab_distill.cli import main

    kd = ["fit", "--config", str(REPO / "examples" / "digits.yaml"), "--config", str(REPO / "examples" / "methods" / "kd.yaml")]
    add = tmp_path / "add_fitnets.yaml"
    add.write_text("plugins+:\n  - class_path: collab_distill.plugins.hints.FitNets\n    init_args: {weight: 2.0}\n")

    def plugins(*args):
        with pytest.raises(SystemExit) as done:  # jsonargparse exits after printing
            main([*kd, *args, "--print_config"])
        assert done.value.code in (0, None)
        return [(p["class_path"].rsplit(".", 1)[1], p["init_args"]) for p in yaml.safe_load(capsys.readouterr().out)["plugins"]]

    appended = plugins("--config", str(add))
    assert [n for n, _ in appended] == ["FixedLossWeights", "FitNets"] and appended[1][1]["weight"] == 2.0
    on_the_line = plugins("--plugins+", "collab_distill.plugins.hints.FitNets", "--plugins.init_args.weight", "3")
    assert [n for n, _ in on_the_line] == ["FixedLossWeights", "FitNets"] and on_the_line[1][1]["weight"] == 3.0
    last = plugins("--plugins.init_args.beta", "0.5")
    assert last == [("FixedLossWeights", {**last[0][1], "alpha": 0.3, "beta": 0.5})]


def test_plugins_command_lists_builtins_and_their_hooks(cli_env):
    out = run_cli(["plugins"], cli_env).stdout
    assert "defaults" in out and "always on" in out
    assert "fixed_loss_weights" in out and "configurable" in out
    assert "loss_weights" in out and "soft_targets" in out and "meta_objective" in out


def test_export_writes_state_dict_and_torchscript(finished_run, tmp_path):
    run, _, env = finished_run
    out = run_cli(["export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--student", "xs",
                   "--output", str(tmp_path), "--weights", "best"], env)
    assert "xs-best.pt" in out.stdout
    from collab_distill.task import TaskInfo
    from collab_distill.tasks.classification import ResNet

    model = ResNet("xs").build(TaskInfo(num_classes=10, in_channels=1, image_size=(8, 8))).eval()
    model.load_state_dict(torch.load(tmp_path / "xs-best.pt"))
    x = torch.randn(4, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript
        scripted = torch.jit.load(str(tmp_path / "xs-best.torchscript.pt"))
    torch.testing.assert_close(scripted(x), model(x))
    program = torch.export.load(str(tmp_path / "xs-best.pt2"))
    torch.testing.assert_close(program.module()(x), model(x))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    for key, value in ckpt["loop"]["best"]["xs"]["state"].items():
        assert torch.equal(model.state_dict()[key], value)


def test_export_never_replaces_an_earlier_export_unless_asked(finished_run, tmp_path):
    run, _, env = finished_run
    args = ["export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--student", "xs",
            "--output", str(tmp_path), "--torchscript", "false", "--exported_program", "false"]
    run_cli(args, env)
    (tmp_path / "xs-last.pt").write_bytes(b"an earlier export the user kept")
    proc = run_cli(args, env, check=False)
    assert proc.returncode == 2
    assert "already holds an export of 'xs' (xs-last.pt)" in proc.stderr and "--overwrite true" in proc.stderr
    assert (tmp_path / "xs-last.pt").read_bytes() == b"an earlier export the user kept"
    run_cli([*args, "--overwrite", "true"], env)
    assert torch.load(tmp_path / "xs-last.pt", weights_only=True)  # replaced by the real state dict


def test_test_command_reproduces_the_runs_test_metrics(finished_run):
    run, _, env = finished_run
    results = json.loads((run / "results.json").read_text())
    config = run / "config.yaml"
    for weights, key in (("last", "last"), ("best", "best_on_val")):
        out = run_cli(["test", "--config", str(config), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                       "--weights", weights, "--trainer.progress_bar", "false"], env).stdout
        for name in ("xxs", "xs", "s"):
            expected = results["students"][name][key]["test_top1"]
            row = next(line for line in out.splitlines() if line.strip("│ ").startswith(name + " "))
            assert f"{expected:.2f}" in row, (name, weights, row, expected)


def test_killed_run_resumes_to_the_same_weights(tmp_path, cli_env):
    """SIGKILL mid-epoch, ``--resume last``: the final weights equal an uninterrupted run's."""
    common = ["--trainer.checkpoint_every_n_steps", "5", "--task.init_args.data.init_args.subset", "600"]
    run_cli(digits_args(tmp_path, "whole", epochs=2, extra=common), cli_env)
    killed = run_cli(
        digits_args(tmp_path, "cut", epochs=2, extra=[*common, "--plugins+", "support_plugins.KillAtStep",
                                                       "--plugins.step", "13"]),
        cli_env, check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt = torch.load(tmp_path / "cut" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["loop"]["global_step"] == 10
    assert not (tmp_path / "cut" / "version_0" / "results.json").exists()
    # resumed without the plugin that killed it: a config change, accepted on request and recorded
    refused = run_cli(digits_args(tmp_path, "cut", epochs=2, extra=[*common, "--resume", "last"]), cli_env, check=False)
    assert refused.returncode == 2 and "plugins" in refused.stderr, refused.stderr[-2000:]
    run_cli(digits_args(tmp_path, "cut", epochs=2, extra=[*common, "--resume", str(tmp_path / "cut" / "version_0"),
                                                          "--resume_changes", "allow"]), cli_env)
    changes = json.loads((tmp_path / "cut" / "version_0" / "resumes.json").read_text())[0]["changes"]
    assert any(key.startswith("plugins") for key in changes), changes
    a = torch.load(tmp_path / "whole" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert _position(a) == _position(b)
    for name in a["students"]:
        for key, value in a["students"][name].items():
            assert torch.equal(value, b["students"][name][key]), f"{name}.{key} differs after resume"
    ra = json.loads((tmp_path / "whole" / "version_0" / "results.json").read_text())
    rb = json.loads((tmp_path / "cut" / "version_0" / "results.json").read_text())
    assert ra["students"] == rb["students"]
    # the metrics log keeps every row across the kill and the resume: the same rows as the whole run's
    def rows(run):
        with (tmp_path / run / "version_0" / "logs" / "csv" / "metrics.csv").open() as f:
            return sorted((int(float(r["step"])), k, round(float(v), 5)) for r in csv.DictReader(f)
                          for k, v in r.items() if v and k != "step" and k.startswith(("train/", "val/")))
    whole, cut = rows("whole"), rows("cut")
    assert {s for s, _, _ in whole} == {s for s, _, _ in cut} and any(s <= 10 for s, _, _ in cut)
    assert whole == cut


def test_disable_plugins_takes_one_name_as_the_readme_writes_it(tmp_path, cli_env, teacher_file):
    """``--disable_plugins NAME`` (one name, not a list) leaves out an always-on plugin; an unknown
    name is one message listing the installed ones."""
    args = [*digits_args(tmp_path, "off", epochs=1), "--config", str(REPO / "examples" / "methods" / "ce.yaml"),
            "--cohort.teachers.teacher.checkpoint", str(teacher_file), "--cohort.teachers.teacher.train_epochs", "0",
            "--cohort.teachers.teacher.model.init_args.size", "s",
            "--trainer.limit_train_batches", "2"]
    run_cli([*args, "--disable_plugins", "defaults"], cli_env)  # CE's weights come from FixedLossWeights
    assert json.loads((tmp_path / "off" / "version_0" / "results.json").read_text())["status"] == "finished"
    wrong = run_cli([*args, "--disable_plugins", "no_such_plugin"], cli_env, check=False)
    assert wrong.returncode != 0 and "no_such_plugin" in wrong.stderr and "defaults" in wrong.stderr


def _position(checkpoint):
    """Where a checkpoint's loop stands (its history holds wall-clock seconds, which differ)."""
    return {k: checkpoint["loop"][k] for k in ("epoch", "batch_in_epoch", "global_step")}
