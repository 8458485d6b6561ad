"""Plugin faults are named (issue 14): a broken plugin package, an exception inside a hook, a
misspelled hook argument, a hook method without ``@hookimpl``; ``collab-distill plugins`` flags
them, ``--trace_plugins`` prints summaries, and hooks know the role of the run they are called in."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

import pytest

from collab_distill import ConfigError, Plugin, PluginError, hookimpl, testing
from collab_distill.cli import main
from collab_distill.engine import Engine
from collab_distill.plugin_manager import NamedHookRelay, PluginWarning, hook_problems, make_plugin_manager
from collab_distill.stages import Stage
from collab_distill.testing import make_records
from collab_distill.tracing import summarise
from support_plugins import FailingLossWeights, MisspelledArgument, RoleRecorder, UndecoratedHooks

Installer = Callable[[dict[str, str], dict[str, str]], None]


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Installer]:
    """Installs a throwaway distribution: ``install({entry point: target}, {module: source})``
    writes ``*.dist-info`` (METADATA, entry_points.txt in group ``collab_distill``) and the
    modules into a folder put first on ``sys.path``, as ``pip install`` would."""
    folder = tmp_path / "site-packages"
    modules: list[str] = []

    def install(entry_points: dict[str, str], sources: dict[str, str]) -> None:
        dist = folder / "collab_distill_probe-0.1.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: collab-distill-probe\nVersion: 0.1\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (dist / "entry_points.txt").write_text(f"[collab_distill]\n{lines}")
        for module, source in sources.items():
            (folder / f"{module}.py").write_text(textwrap.dedent(source))
            modules.append(module)
        monkeypatch.syspath_prepend(str(folder))  # also invalidates the import caches
        seen = {ep.name for ep in importlib.metadata.entry_points(group="collab_distill")}
        assert set(entry_points) <= seen, seen

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def _names(pm) -> set[str]:
    return {name for name, _ in pm.list_name_plugin()}


# ---------------------------------------------------------------------------- 1. a package that fails to import


_BROKEN = """\
import pathlib
pathlib.Path(__file__).with_suffix(".imported").touch()
import collab_distill_missing_dependency
"""


def test_a_plugin_package_that_fails_to_import_is_named_with_its_fix_and_can_be_disabled(
    installed: Installer, tmp_path: Path
) -> None:
    installed({"broken_probe": "cd_probe_broken:Rule"}, {"cd_probe_broken": _BROKEN})
    pm = make_plugin_manager([], ["broken_probe"])  # the user gets on without it
    assert "broken_probe" not in _names(pm) and "defaults" in _names(pm)
    marker = tmp_path / "site-packages" / "cd_probe_broken.imported"
    assert not marker.exists()  # a disabled entry point is not even imported
    with pytest.raises(ConfigError) as err:
        make_plugin_manager()
    message = str(err.value)
    for needle in ("'broken_probe'", "cd_probe_broken:Rule", "collab-distill-probe",
                   "ModuleNotFoundError: No module named 'collab_distill_missing_dependency'",
                   "--disable_plugins broken_probe", "uninstall"):
        assert needle in message, message
    assert marker.exists()


# ---------------------------------------------------------------------------- 2. an exception inside a hook


def _call_loss_weights(hook) -> None:
    hook.collab_distill_loss_weights(engine=None, batch=None, records=make_records(["xxs"]), teacher_records={},
                                     phase="train")


@pytest.mark.parametrize("tracing", ["none", "pluggy", "trace_plugins"])
def test_an_exception_inside_a_hook_names_the_plugin_and_the_hook(tracing: str, capsys) -> None:
    pm = make_plugin_manager([FailingLossWeights()], trace=tracing == "trace_plugins")
    if tracing == "pluggy":
        pm.trace.root.setwriter(lambda *_: None)
        pm.enable_tracing()
    with pytest.raises(PluginError) as err:
        _call_loss_weights(NamedHookRelay(pm))
    assert str(err.value) == "plugin 'FailingLossWeights#0' failed in hook collab_distill_loss_weights: KeyError: 'teacher'"
    assert (err.value.plugin, err.value.hook) == ("FailingLossWeights#0", "collab_distill_loss_weights")
    assert isinstance(err.value.__cause__, KeyError)  # the original traceback is kept as the cause
    assert pm.hook.collab_distill_loss_weights is not None  # engine.pm stays pluggy's own manager


def test_config_errors_from_hooks_pass_unchanged_and_a_nested_hook_names_the_innermost_plugin() -> None:
    class Validates(Plugin):
        @hookimpl
        def collab_distill_configure(self) -> None:
            raise ConfigError("Validates.strength must be positive")

    class Outer(Plugin):
        @hookimpl
        def collab_distill_fit_end(self, engine) -> None:
            engine.hook.collab_distill_save_state(engine=engine, state={})

    class Inner(Plugin):
        @hookimpl
        def collab_distill_save_state(self, state) -> None:
            raise RuntimeError("state is full")

    hook = NamedHookRelay(make_plugin_manager([Validates(), Outer(), Inner()]))
    with pytest.raises(ConfigError, match="^Validates.strength must be positive$"):
        hook.collab_distill_configure(engine=None)

    class FakeEngine:
        pass

    engine = FakeEngine()
    engine.hook = hook  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match=r"^plugin 'Inner#2' failed in hook collab_distill_save_state: RuntimeError"):
        hook.collab_distill_fit_end(engine=engine, results={})


_CLI_CONFIG = """\
task:
  class_path: collab_distill.tasks.classification.ImageClassification
  init_args:
    data: {class_path: collab_distill.tasks.classification.Digits, init_args: {batch_size: 16, subset: 120}}
cohort:
  students:
    s: {class_path: collab_distill.tasks.classification.ResNet, init_args: {size: xxxs}}
trainer: {max_epochs: 1, max_steps: 2, accelerator: cpu, progress_bar: false, loggers: []}
plugins:
  - class_path: support_plugins.FailingLossWeights
"""


def test_the_cli_names_the_failing_plugin_and_its_line_and_prints_the_traceback_on_request(
        tmp_path: Path, capsys, monkeypatch) -> None:
    config = tmp_path / "failing.yaml"
    config.write_text(_CLI_CONFIG)
    monkeypatch.delenv("COLLAB_DISTILL_TRACEBACK", raising=False)
    rc = main(["fit", "--config", str(config), "--trainer.root_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("collab-distill: error: plugin 'FailingLossWeights#0' failed in hook "
                          "collab_distill_loss_weights: KeyError: 'teacher' (raised at "), err
    assert "support_plugins.py:" in err and "COLLAB_DISTILL_TRACEBACK=1" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    monkeypatch.setenv("COLLAB_DISTILL_TRACEBACK", "1")
    rc = main(["fit", "--config", str(config), "--trainer.root_dir", str(tmp_path / "runs2")])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback (most recent call last)" in err and 'teacher = records["teacher"]' in err, err
    assert err.rstrip().endswith("KeyError: 'teacher'"), err


# ---------------------------------------------------------------------------- 3. a misspelled argument


def test_a_misspelled_hook_argument_is_a_config_error_listing_what_the_hook_offers() -> None:
    with pytest.raises(ConfigError) as err:
        make_plugin_manager([MisspelledArgument()])
    message = str(err.value)
    for needle in ("'MisspelledArgument#0'", "collab_distill_loss_weights", "'enigne'", "did you mean 'engine'",
                   "engine, batch, records, teacher_records, phase"):
        assert needle in message, message


# ---------------------------------------------------------------------------- 4. methods the engine never calls


def test_hook_methods_the_engine_never_calls_are_warned_about() -> None:
    with pytest.warns(PluginWarning) as record:
        make_plugin_manager([UndecoratedHooks()])
    messages = [str(w.message) for w in record]
    undecorated = [m for m in messages if "collab_distill_loss_weights" in m]
    assert len(undecorated) == 1 and "'UndecoratedHooks#0'" in undecorated[0], messages
    assert "decorate it with @collab_distill.hookimpl" in undecorated[0]
    unknown = [m for m in messages if "collab_distill_epoch_ends" in m]
    assert len(unknown) == 1 and "no hook" in unknown[0] and "did you mean collab_distill_epoch_end" in unknown[0], messages


def test_a_hookimpl_with_an_unknown_name_stays_an_error_with_close_matches() -> None:
    class Typo(Plugin):
        @hookimpl
        def collab_distill_loss_weight(self, records):  # missing "s"
            return None

    with pytest.raises(ConfigError, match="collab_distill_loss_weight .*did you mean collab_distill_loss_weights"):
        make_plugin_manager([Typo()])


# ---------------------------------------------------------------------------- 5. `collab-distill plugins`


_MODULE_PLUGIN = """\
from collab_distill import hookimpl

def collab_distill_fit_end(engine):  # no @hookimpl
    pass

@hookimpl
def collab_distill_epoch_end(enigne, epoch):
    pass
"""


def test_the_plugins_command_flags_each_plugins_problems(installed: Installer, capsys) -> None:
    installed(
        {"broken_probe": "cd_probe_missing", "module_probe": "cd_probe_module",
         "undecorated_probe": "support_plugins:UndecoratedHooks"},
        {"cd_probe_module": _MODULE_PLUGIN},
    )
    assert hook_problems(UndecoratedHooks) == [
        "collab_distill_epoch_ends is no hook (did you mean collab_distill_epoch_end?)",
        "collab_distill_loss_weights lacks @hookimpl",
    ]
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "problems" in out
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ ") and "_probe" in line}
    assert "broken" in rows["broken_probe"] and "ModuleNotFoundError" in out
    for needle in ("collab_distill_fit_end", "lacks", "'enigne'"):
        assert needle in out, out
    assert "collab_distill_epoch_ends" in out and "fixed_loss_weights" in out, out


# ---------------------------------------------------------------------------- 6. tracing


def test_trace_plugins_prints_summaries_and_who_answered(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(testing, "Engine", partial(Engine, trace_plugins=True))
    testing.tiny_fit([], root_dir=tmp_path, steps=2, teacher=None, students=("xxs",), subset=120, batch_size=16,
                     limit_eval_batches=1)
    out = capsys.readouterr().out
    assert "tensor([" not in out
    assert "[trace:fit] collab_distill_loss_weights(engine=Engine, batch={'inputs': Tensor(shape=[16, 1, 8, 8], " \
           "dtype=float32, device=cpu)" in out, out
    assert "  defaults -> {'xxs': LossWeights(" in out, out
    assert "  StepRecorder#0 -> None" in out, out
    assert "[trace:fit] collab_distill_train_step_end(engine=Engine, step=2, losses={" in out, out
    assert len(out.splitlines()) < 200, len(out.splitlines())


def test_summaries_never_read_a_lazy_mapping_nor_print_values() -> None:
    class Lazy(Mapping):  # like the teachers' records: computed on first access
        def __getitem__(self, key):
            raise AssertionError("the trace computed the teachers' records")

        def __iter__(self):
            return iter(["teacher"])

        def __len__(self) -> int:
            return 1

    records = make_records(["xxs", "xs"], num_images=3)
    text = summarise({"records": records, "teacher_records": Lazy(), "numbers": list(range(10))})
    assert "Lazy(keys=['teacher'])" in text
    assert "'xxs': Knowledge(" in text and "logits=Tensor(shape=[3, 5], dtype=float32, device=cpu)" in text
    assert "[0, 1, 2, 3, 4, 5, ... +4 more]" in text and "tensor(" not in text


# ---------------------------------------------------------------------------- 7. role and rank


_ROLE_PROBE = """\
from collab_distill import hookimpl

SEEN = []

@hookimpl
def collab_distill_epoch_end(engine, epoch):
    SEEN.append((engine.role, engine.fabric.global_rank, engine.fabric.is_global_zero, epoch))
"""


def test_hooks_read_the_role_of_the_run_they_are_called_in(tmp_path: Path, installed: Installer) -> None:
    installed({"role_probe": "cd_probe_roles"}, {"cd_probe_roles": _ROLE_PROBE})
    configured = RoleRecorder()
    run = testing.tiny_fit([configured], root_dir=tmp_path, steps=None, epochs=1, teacher="xxs", teacher_epochs=1,
                           students=("xxs",), subset=120, batch_size=16, limit_eval_batches=1, always_on="installed")
    assert run.engine.role == "fit"
    # an always-on plugin also runs in the teacher's own training; a configured one only in the user's run
    assert sys.modules["cd_probe_roles"].SEEN == [("teacher_training", 0, True, 1), ("fit", 0, True, 1)]
    assert configured.seen == [("fit", 0, 1)]


def test_the_stages_of_a_staged_fit_run_in_the_stage_role(tmp_path: Path, installed: Installer, monkeypatch) -> None:
    installed({"role_probe": "cd_probe_roles"}, {"cd_probe_roles": _ROLE_PROBE})
    monkeypatch.setattr(testing, "Engine", partial(Engine, stages=[Stage("only", ["xxs"], ["teacher"])]))
    configured = RoleRecorder()
    testing.tiny_fit([configured], root_dir=tmp_path, steps=None, epochs=1, teacher="xxs", teacher_epochs=1,
                     students=("xxs",), subset=120, batch_size=16, limit_eval_batches=1, always_on="installed")
    assert [seen[0] for seen in sys.modules["cd_probe_roles"].SEEN] == ["teacher_training", "stage"]
    assert configured.seen == [("stage", 0, 1)]  # a stage runs the configured plugins too


def test_an_unknown_role_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(testing, "Engine", partial(Engine, role="teacher"))
    with pytest.raises(ValueError, match="role 'teacher' .*'fit', 'teacher_training', 'stage'"):
        testing.tiny_engine([], root_dir="unused")
