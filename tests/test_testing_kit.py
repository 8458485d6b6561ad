"""``collab_distill.testing`` gives an author's test the same plugins whatever else is installed
(issue 22): only collab-distill's own always-on plugin runs beside the author's, unless the test
asks for the installed ones."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from collab_distill.testing import outside_entry_points, tiny_engine, tiny_fit

_PROBE = """\
from collab_distill import hookimpl

STEPS = []

@hookimpl
def collab_distill_train_step_end(step):
    STEPS.append(step)
"""

_BROKEN = """\
import pathlib
pathlib.Path(__file__).with_suffix(".imported").touch()
raise ImportError("this package is broken")
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder first on ``sys.path`` holding one throwaway distribution, ``kit-probe``, whose
    entry points are two always-on plugins: ``kit_probe`` (records the steps) and ``kit_broken``
    (fails to import)."""
    folder = tmp_path / "site"
    info = folder / "kit_probe-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kit-probe\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[collab_distill]\nkit_probe = kit_probe_plugin\nkit_broken = kit_broken_plugin\n")
    (folder / "kit_probe_plugin.py").write_text(_PROBE)
    (folder / "kit_broken_plugin.py").write_text(_BROKEN)
    monkeypatch.syspath_prepend(str(folder))
    assert {"kit_probe", "kit_broken"} <= {ep.name for ep in importlib.metadata.entry_points(group="collab_distill")}
    yield folder
    for module in ("kit_probe_plugin", "kit_broken_plugin"):
        sys.modules.pop(module, None)


def _registered(engine) -> set[str]:
    return {name for name, _ in engine.pm.list_name_plugin()}


def test_only_the_builtin_always_on_plugin_runs_unless_the_installed_ones_are_asked_for(site: Path, tmp_path: Path):
    outside = outside_entry_points()  # (with whatever else this environment has installed)
    assert {"kit_broken", "kit_probe"} <= set(outside) and not {"defaults", "fixed_loss_weights"} & set(outside)
    small = dict(students=("xxs",), teacher=None, subset=64, batch_size=16, limit_eval_batches=1)

    run = tiny_fit([], root_dir=tmp_path / "builtin", steps=2, **small)
    assert "defaults" in _registered(run.engine) and not {"kit_probe", "kit_broken"} & _registered(run.engine)
    assert "kit_probe_plugin" not in sys.modules and not (site / "kit_broken_plugin.imported").exists()  # never imported
    assert len(run.losses) == 2

    run = tiny_fit([], root_dir=tmp_path / "installed", steps=2, always_on="installed", disable_plugins=["kit_broken"], **small)
    assert {"defaults", "kit_probe"} <= _registered(run.engine) and "kit_broken" not in _registered(run.engine)
    assert sys.modules["kit_probe_plugin"].STEPS == [1, 2]


def test_installed_always_on_plugins_are_what_a_fit_loads_broken_ones_included(site: Path, tmp_path: Path):
    from collab_distill import ConfigError

    with pytest.raises(ConfigError, match="kit_broken"):  # as `collab-distill fit` would stop
        tiny_engine([], root_dir=tmp_path, always_on="installed")
    assert (site / "kit_broken_plugin.imported").exists()
    with pytest.raises(ValueError, match="always_on='all' must be 'builtin' or 'installed'"):
        tiny_engine([], root_dir=tmp_path, always_on="all")  # type: ignore[arg-type]
