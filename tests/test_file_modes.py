"""Files collab-distill writes get the mode any new file gets (``0o666`` less the umask, 0644
under the usual umask 022), as detectron2's and torch's own files do, so that others on a shared
cluster can read runs, teachers, caches and exports (a temporary file from ``mkstemp`` is 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from collab_distill.checkpoint import atomic_save, write_json
from collab_distill.cli import main
from tiny_config import tiny_digits_yaml


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Sets the process umask for the test (``umask(0o027)``) and restores it afterwards."""
    before = os.umask(0o022)
    os.umask(before)
    yield lambda mask: os.umask(mask)
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_save_and_write_json_give_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    atomic_save({"w": torch.zeros(2)}, tmp_path / "teacher.pt")
    atomic_save({"w": torch.ones(2)}, tmp_path / "teacher.pt")  # replacing a file: the new one's mode too
    write_json({"a": 1}, tmp_path / "results.json")
    assert _mode(tmp_path / "teacher.pt") == 0o666 & ~mask
    assert _mode(tmp_path / "results.json") == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "teacher.pt"]


def test_a_run_its_teacher_cache_and_its_export_are_readable_by_others(tmp_path, umask, capsys):
    """A fit that trains its teacher into a cache, then an export: every file is 0644 under
    umask 022, as a file that ``open()`` creates."""
    umask(0o022)
    cache = tmp_path / "cache"
    config = tmp_path / "kd.yaml"
    config.write_text(tiny_digits_yaml(teacher="xxxs").replace("train_epochs: 1}", f"train_epochs: 1, cache_dir: {cache}}}"))
    root = tmp_path / "runs"
    assert main(["fit", "--config", str(config), "--trainer.root_dir", str(root), "--trainer.name", "kd"]) == 0
    run = root / "kd" / "version_0"
    assert main(["export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--student", "s"]) == 0
    capsys.readouterr()
    files = [p for folder in (run, cache) for p in folder.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"teacher.pt", "last.ckpt", "results.json", "s-last.pt"} <= names, names
    assert any(p.parent == cache and p.suffix == ".pt" for p in files), names
    private = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files if _mode(p) != 0o644}
    assert not private, private
