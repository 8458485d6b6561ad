"""``cohort.teachers.NAME.cache_dir``: a teacher trained in one run is reused by later runs whose
teacher training would be the same, and only by those."""

from __future__ import annotations

import json

import torch

from collab_distill.cli import main
from tiny_config import tiny_digits_yaml


def _fit(root, config, *extra: str) -> None:
    assert main(["fit", "--config", str(config), "--trainer.root_dir", str(root), "--trainer.name", "c", *extra]) == 0


def test_a_cached_teacher_is_reused_only_for_the_same_teacher_training(tmp_path, capsys):
    cache = tmp_path / "teachers"
    config = tmp_path / "c.yaml"
    config.write_text(tiny_digits_yaml(teacher="xxs").replace("train_epochs: 1}", f"train_epochs: 1, cache_dir: {cache}}}"))
    root = tmp_path / "runs"
    _fit(root, config)
    first = root / "c" / "version_0"
    (cached,) = cache.glob("t-*.pt")
    assert json.loads(cached.with_suffix(".json").read_text())["run"] == str(first)
    trained = torch.load(first / "teachers" / "t" / "teacher.pt")
    assert all(torch.equal(v, torch.load(cached)[k]) for k, v in trained.items())
    capsys.readouterr()
    _fit(root, config)  # the same teacher training: loaded, not trained, and the same cohort run
    second = root / "c" / "version_1"
    assert "trained weights from the cache" in capsys.readouterr().out
    assert not (second / "teachers" / "t" / "checkpoints").exists()
    reused = torch.load(second / "teachers" / "t" / "teacher.pt")
    assert all(torch.equal(v, reused[k]) for k, v in trained.items())
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=False)["students"]["s"] for r in (first, second))
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    # another seed, or another learning rate, trains (and caches) its own teacher
    _fit(root, config, "--seed", "1")
    _fit(root, config, "--optimizer.init_args.lr", "0.02")
    assert len(list(cache.glob("t-*.pt"))) == 3
    assert (root / "c" / "version_3" / "teachers" / "t" / "checkpoints" / "last.ckpt").is_file()
    # what only concerns the students (the loss mix, their number of epochs) keeps the cached teacher
    _fit(root, config, "--trainer.max_epochs", "2", "--plugins.init_args.beta", "0.2")
    assert len(list(cache.glob("t-*.pt"))) == 3
