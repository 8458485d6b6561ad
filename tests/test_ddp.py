"""Two-process CPU DDP (gloo) through the CLI: ranks stay identical, including meta modules."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, digits_args
from test_cli import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def test_two_process_ddp_keeps_students_and_meta_modules_identical(tmp_path, cli_env):
    extra = [
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--task.init_args.data.init_args.subset", "600", "--meta.every_n_steps", "3",
        "--plugins", json.dumps([
            {"class_path": "support_plugins.LearnedImageWeights", "init_args": {"in_features": 64}},
            {"class_path": "support_plugins.WeightChecksums"},
        ]),
    ]
    proc = run_cli(digits_args(tmp_path, "ddp", epochs=2, extra=extra), cli_env, timeout=600)
    run = tmp_path / "ddp" / "version_0"
    assert not (tmp_path / "ddp" / "version_1").exists(), "rank 1 must not open a run folder of its own"
    sums = [json.loads((run / f"checksums_rank{r}.json").read_text()) for r in (0, 1)]
    assert sums[0]["world_size"] == 2
    assert sums[0] == sums[1]
    assert "meta:image_weights" in sums[0]
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished"
    # metrics are computed over the whole split, not one rank's shard
    assert results["students"]["xs"]["last"]["test_top1"] * 360 / 100 == pytest.approx(
        round(results["students"]["xs"]["last"]["test_top1"] * 360 / 100), abs=1e-6
    )
    # printed by rank 0 only: once for the teacher's own run, once for the cohort
    assert proc.stdout.count("test top1 (model selection") == 2
    assert proc.stdout.count(f"run folder: {run}\n") == 1


def test_two_process_ddp_kdcl_general_with_views_agrees_on_the_ensemble_weights(tmp_path, cli_env):
    """Each rank measures its shard of the meta split; the error matrix is summed across ranks, so
    both ranks hold the same eq. 11 weights (and not, e.g., the weights of their own shard)."""
    methods = REPO / "examples" / "methods"
    extra = [
        "--config", str(methods / "kdcl_general.yaml"), "--config", str(methods / "kdcl_views.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--task.init_args.data.init_args.subset", "600",
        "--plugins+", json.dumps({"class_path": "support_plugins.WeightChecksums"}),
    ]
    run_cli(digits_args(tmp_path, "kdcl", epochs=2, extra=extra), cli_env, timeout=600)
    run = tmp_path / "kdcl" / "version_0"
    sums = [json.loads((run / f"checksums_rank{r}.json").read_text()) for r in (0, 1)]
    assert sums[0] == sums[1]
    weights = json.loads(sums[0]["plugins"])["kdcl"]["weights"]
    assert set(weights) == {"xxs", "xs", "s"} and abs(sum(weights.values()) - 1) < 1e-6
