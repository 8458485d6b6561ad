"""Staged runs (TAKD / DGKD chains) and the DGKD guide-dropping rule."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from collab_distill.config import Cohort, Teacher
from collab_distill.plugins.dgkd import DGKD, kept_guides
from collab_distill.records import Knowledge, TargetSet
from collab_distill.stages import Stage, check_stages
from collab_distill.task import ConfigError
from collab_distill.tasks.classification import ResNet
from conftest import REPO, digits_args
from test_cli import run_cli


def cohort():
    return Cohort(students={"a": ResNet("xxs"), "b": ResNet("xs"), "c": ResNet("s")},
                  teachers={"t": Teacher(ResNet("m"), train_epochs=1)})


@pytest.mark.parametrize("stages, message", [
    ([Stage("one", ["a", "b", "c"], ["nobody"])], r"stages\[0\] \('one'\).teachers names 'nobody'"),
    ([Stage("one", ["a"], ["b"]), Stage("two", ["b", "c"], ["t"])], r"'b': it is trained in stages\[1\], not before"),
    ([Stage("one", ["a", "b"], ["t"])], r"student\(s\) \['c'\] are in no stage"),
    ([Stage("one", ["a", "b", "c"]), Stage("two", ["a"])], r"'a' is already trained in stages\[0\]"),
    ([Stage("one", ["a", "b", "x"])], r"names 'x', not a cohort student"),
    ([Stage("a/b", ["a", "b", "c"])], r"name must be letters"),
    ([Stage("one", ["a"]), Stage("one", ["b", "c"])], r"two stages are named 'one'"),
])
def test_bad_stage_lists_are_refused_with_the_field(stages, message):
    with pytest.raises(ConfigError, match=message):
        check_stages(stages, cohort())


def test_a_chain_is_accepted():
    check_stages([Stage("1", ["c"], ["t"]), Stage("2", ["b"], ["t", "c"]), Stage("3", ["a"], ["t", "c", "b"])], cohort())


def test_dgkd_drops_guides_reproducibly_and_never_all():
    names = ["teacher", "s", "xs"]
    draws = [kept_guides(names, 0.5, seed=3, step=k) for k in range(200)]
    assert draws == [kept_guides(names, 0.5, seed=3, step=k) for k in range(200)]  # same on every rank / resume
    assert all(draws) and all(set(d) <= set(names) for d in draws)
    counts = {n: sum(n in d for d in draws) for n in names}
    assert all(60 < c < 160 for c in counts.values()), counts  # each kept about half the time (+ the keep-one rule)
    assert len({tuple(d) for d in draws}) > 4
    assert kept_guides(["teacher"], 0.9, seed=0, step=1) == ["teacher"]  # a single guide is never dropped
    assert kept_guides(names, 0.0, seed=0, step=1) == names


def test_dgkd_target_is_the_mean_of_the_kept_guides_kls():
    labels = torch.tensor([0, 1])
    student = torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 0.0]])
    guides = {"t": torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 1.0]]), "a": torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])}
    engine = type("E", (), {"seed": 0, "global_step": 0})()
    plugin = DGKD(drop_rate=0.0)
    target = plugin.collab_distill_soft_targets(
        engine=engine, records={"s": Knowledge.for_images(student, labels)},
        teacher_records={n: Knowledge.for_images(z, labels) for n, z in guides.items()}, temperature=2.0,
    )["s"]
    assert isinstance(target, TargetSet) and plugin.last_kept == ["t", "a"]
    log_q = F.log_softmax(student / 2, -1)
    kls = [F.kl_div(log_q, F.softmax(z / 2, -1), reduction="none").sum(-1) for z in guides.values()]
    assert torch.allclose(target.kl_per_unit(student, 2.0), (kls[0] + kls[1]) / 2, atol=1e-6)
    assert torch.allclose(TargetSet(target.members, "sum").kl_per_unit(student, 2.0), kls[0] + kls[1], atol=1e-6)


@pytest.mark.slow
def test_staged_run_hands_students_down_and_resumes_after_the_finished_stages(tmp_path, cli_env):
    args = [*digits_args(tmp_path, "takd", epochs=1), "--config", str(REPO / "examples" / "methods" / "takd.yaml"),
            "--trainer.limit_train_batches", "3"]
    run_cli(args, cli_env)
    run = tmp_path / "takd" / "version_0"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished"
    assert set(results["students"]) == {"xxs", "xs", "s"}
    assert [s["name"] for s in results["stages"]] == ["s", "xs", "xxs"]
    assert {row["stage"] for row in results["history"]} == {"s", "xs", "xxs"}
    # stage 2's teacher is exactly the weights stage 1 handed down (its best-on-val state)
    stage2 = torch.load(run / "stages" / "2-xs" / "checkpoints" / "last.ckpt", weights_only=False)
    handed = torch.load(run / "stages" / "1-s" / "students" / "s.pt", weights_only=False)
    assert set(stage2["teachers"]) == {"s"}
    assert all(torch.equal(stage2["teachers"]["s"][k], v) for k, v in handed.items())
    # the cohort teacher was trained once, before the stages
    assert (run / "teachers" / "teacher" / "teacher.pt").is_file()
    assert not (run / "stages" / "1-s" / "teachers").exists()
    # lose the last stage (as a run killed during it has no results.json yet); --resume last redoes only that one
    finished_1 = (run / "stages" / "1-s" / "results.json").stat().st_mtime_ns
    (run / "stages" / "3-xxs" / "results.json").unlink()
    (run / "results.json").unlink()
    proc = run_cli([*args, "--resume", "last"], cli_env)
    assert "stage 3/3" in proc.stdout and "stage 1/3" not in proc.stdout and "stage 2/3" not in proc.stdout
    assert (run / "stages" / "1-s" / "results.json").stat().st_mtime_ns == finished_1
    assert json.loads((run / "results.json").read_text())["status"] == "finished"
    assert not (tmp_path / "takd" / "version_1").exists()


def test_a_bad_stage_fails_before_any_training(tmp_path, cli_env):
    args = [*digits_args(tmp_path, "bad", epochs=1), "--config", str(REPO / "examples" / "methods" / "takd.yaml"),
            "--stages", '[{"name": "s", "students": ["s"], "teachers": ["xs"]}, {"name": "r", "students": ["xs", "xxs"]}]']
    proc = run_cli(args, cli_env, check=False)
    assert proc.returncode == 2
    assert "stages[0] ('s').teachers names 'xs'" in proc.stderr
    assert not (tmp_path / "bad").exists()
