"""The method file composes after a data/cohort config and its runs land in a folder named
after the method (``runs/confidence_kd/version_N``), not after the file (``runs/method/``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collab_distill.cli import main

TEMPLATE = Path(__file__).resolve().parents[1]
METHOD = TEMPLATE / "method.yaml"
DIGITS = TEMPLATE.parent / "digits.yaml"  # collab-distill's examples/digits.yaml; a copied template uses its own


@pytest.mark.skipif(not DIGITS.exists(), reason="needs collab-distill's examples/digits.yaml beside the template")
def test_a_run_of_the_method_file_is_named_after_the_method(tmp_path):
    code = main([
        "fit", "--config", str(DIGITS), "--config", str(METHOD), "--trainer.root_dir", str(tmp_path),
        "--trainer.max_epochs", "1", "--cohort.teachers.teacher.train_epochs", "1",
        "--task.init_args.data.init_args.subset", "200", "--trainer.limit_train_batches", "2",
        "--trainer.limit_eval_batches", "1", "--trainer.progress_bar", "false",
    ])
    assert code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["confidence_kd"]
    results = json.loads((tmp_path / "confidence_kd" / "version_0" / "results.json").read_text())
    assert results["status"] == "finished"
    config = (tmp_path / "confidence_kd" / "version_0" / "config.yaml").read_text()
    assert "collab_distill_confidence_kd.ConfidenceKD" in config
