"""``collab-distill``: the command line (jsonargparse).

    collab-distill fit --config examples/digits.yaml [--trainer.max_epochs 3] [--seed 1] [--resume last]
    collab-distill validate|test --config X.yaml --ckpt_path runs/x/version_0/checkpoints/last.ckpt
    collab-distill export --ckpt_path ... --student s [--output DIR]
    collab-distill plugins

Every config error (unknown class, wrong type, bad value, missing data, checkpoint that does not
fit) stops with one message naming the field before any file is written.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, get_loader, set_loader

from collab_distill import __version__
from collab_distill.config import Cohort, TrainerConfig
from collab_distill.meta import BilevelConfig
from collab_distill.optim import OptimizerCallable, Schedule
from collab_distill.plugin_manager import Plugin, discover, hooks_implemented_by
from collab_distill.stages import Stage
from collab_distill.task import ConfigError, ModelFactory, Task

__all__ = ["main", "build_parser", "engine_from_args"]

_DEFAULT_OPTIMIZER = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}}


def _import_known_classes() -> None:
    """Import built-in and installed plugin/task classes so YAML may use their short names."""
    import collab_distill.tasks.classification  # noqa: F401

    for info in discover():
        pass  # loading the entry point imports its module


def _duplicate_keys(node: Any, path: str = "") -> Iterator[tuple[str, int, int]]:
    """``(dotted key, first line, second line)`` of every key given twice in one YAML mapping."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            where = f"{path}.{name}" if path else str(name)
            if name is not None:
                if name in seen:
                    yield where, seen[name] + 1, key.start_mark.line + 1
                seen.setdefault(name, key.start_mark.line)
            yield from _duplicate_keys(value, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{path}[{i}]")


def _duplicate_message(key: str, first: int, second: int) -> str:
    return (
        f"key {key!r} is given twice (lines {first} and {second}); YAML would silently keep only the "
        "last one. Give every key (and every cohort member) a distinct name."
    )


def _check_config_files(argv: list[str]) -> None:
    """Refuse a ``--config`` file with a key given twice, naming the file (the loader check
    below also catches inline YAML values, but does not know which file it reads)."""
    import yaml

    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        try:
            node = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # jsonargparse reports a missing or malformed file
        for key, first, second in _duplicate_keys(node):
            raise ConfigError(f"{path}: {_duplicate_message(key, first, second)}")


def _install_strict_yaml() -> None:
    """YAML silently keeps the last of two equal keys (two students named ``s``: one is lost).
    Refuse such configs instead; everything else is left to jsonargparse's own loader."""
    import yaml

    base = get_loader("yaml")
    if getattr(base, "_collab_distill_strict", False):
        return

    def load(stream: str) -> Any:
        try:
            node = yaml.compose(stream, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            node = None  # the real loader reports it
        for key, first, second in _duplicate_keys(node):
            raise yaml.YAMLError(_duplicate_message(key, first, second))
        return base(stream)

    load._collab_distill_strict = True  # type: ignore[attr-defined]
    set_loader("yaml", load, (yaml.YAMLError,))


def _run_arguments(parser: ArgumentParser, *, training: bool) -> None:
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config; later flags override it")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, splits, data order and augmentation")
    parser.add_subclass_arguments(Task, "task", required=True, help="the task adapter and its data")
    parser.add_class_arguments(Cohort, "cohort")
    parser.add_class_arguments(TrainerConfig, "trainer")
    parser.add_argument("--optimizer", type=OptimizerCallable, default=_DEFAULT_OPTIMIZER, help="student optimizer")
    parser.add_subclass_arguments(Schedule, "schedule", default=Namespace(class_path="collab_distill.optim.Cosine"), help="student LR schedule")
    parser.add_class_arguments(BilevelConfig, "meta")
    parser.add_argument("--plugins", type=list[Plugin], default=[], help="configured plugins (methods)")
    parser.add_argument("--stages", type=Optional[list[Stage]], default=None,
                        help="train the students in a sequence of runs; earlier students teach later ones")
    parser.add_argument("--disable_plugins", type=list[str], default=[], help="always-on plugins to leave out")
    parser.add_argument("--trace_plugins", type=bool, default=False, help="print every hook call")
    if training:
        parser.add_argument("--resume", type=Optional[str], default=None, help="a checkpoint path, or `last`")
    else:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="checkpoint to evaluate")
        parser.add_argument("--weights", type=str, default="last", choices=["last", "best"], help="last or best-on-val weights")
        parser.add_argument("--output_dir", type=Optional[str], default=None,
                            help="where metrics.json and plugin outputs go (default: a new evaluations/<split>-<weights> "
                                 "folder in the checkpoint's run)")


def build_parser() -> ArgumentParser:
    _import_known_classes()
    _install_strict_yaml()
    # errors are raised (not printed with a page of usage) and reported by main() in one message;
    # no abbreviations: a misspelt `--trainer.max_epoch` must not silently mean `max_epochs`
    strict: dict[str, Any] = {"exit_on_error": False, "allow_abbrev": False}
    root = ArgumentParser(prog="collab-distill", description="Collaborative knowledge distillation.", env_prefix="COLLAB_DISTILL", default_env=False, **strict)
    root.add_argument("--version", action="version", version=f"collab-distill {__version__}")
    sub = root.add_subcommands(required=True, dest="subcommand")
    for name, training, help_text in (
        ("fit", True, "train a cohort"),
        ("validate", False, "evaluate the students of a checkpoint on the val split"),
        ("test", False, "evaluate the students of a checkpoint on the test split"),
    ):
        p = ArgumentParser(description=help_text, **strict)
        _run_arguments(p, training=training)
        sub.add_subcommand(name, p, help=help_text)
    export = ArgumentParser(description="write one student as a state dict, TorchScript and a torch.export program", **strict)
    export.add_argument("--ckpt_path", type=str, required=True, help="a run checkpoint (last.ckpt)")
    export.add_argument("--student", type=str, required=True, help="the student to export")
    export.add_argument("--output", type=Optional[str], default=None, help="folder (default: the run's exports/)")
    export.add_argument("--weights", type=str, default="last", choices=["last", "best"])
    export.add_argument("--torchscript", type=bool, default=True, help="also write a TorchScript file")
    export.add_argument("--exported_program", type=bool, default=True, help="also write a torch.export program (.pt2)")
    sub.add_subcommand("export", export, help="export one student")
    report = ArgumentParser(description="render a finished run's results and plots as Markdown and HTML", **strict)
    report.add_argument("run_dir", type=str, help="the run folder (runs/NAME/version_N)")
    sub.add_subcommand("report", report, help="render a run's report")
    plugins = ArgumentParser(description="list installed plugins and the hooks they implement", **strict)
    sub.add_subcommand("plugins", plugins, help="list installed plugins")
    return root


def _experiment_name(cfg: Namespace) -> str:
    if cfg.trainer.name:
        return cfg.trainer.name
    configs = cfg.get("config") or []
    if configs:
        last = configs[-1]
        path = getattr(last, "relative", None) or getattr(last, "abs_path", None) or str(last)
        return Path(str(path)).stem
    return "run"


def _engine_from(parser: ArgumentParser, cfg: Namespace, command: str):
    from collab_distill.engine import Engine

    sub_parser = parser._subcommands_action._name_parser_map[command]
    cfg.trainer.name = _experiment_name(cfg)
    saved = cfg.clone()
    for action in ("resume", "ckpt_path", "weights", "output_dir"):  # how to run, not what to run
        if action in saved:
            del saved[action]
    text = sub_parser.dump(saved, skip_unset=False, skip_validation=True)
    try:
        init = sub_parser.instantiate(cfg)
    except (ConfigError, ValueError, TypeError) as err:
        raise _located(cfg, err) from None
    engine = Engine(
        task=init.task, cohort=init.cohort, trainer=init.trainer, optimizer=init.optimizer,
        schedule=init.schedule, meta=init.meta, plugins=init.plugins, disable_plugins=init.disable_plugins,
        seed=init.seed, trace_plugins=init.trace_plugins, config_text=text, stages=init.get("stages"),
    )
    return engine


def engine_from_args(argv: list[str]) -> Any:
    """The :class:`~collab_distill.engine.Engine` that ``collab-distill fit ARGS`` would run,
    built but not started (for benchmarks and notebooks): ``engine_from_args(["--config", "x.yaml"])``."""
    _check_config_files(["fit", *argv])
    parser = build_parser()
    cfg = parser.parse_args(["fit", *argv])
    return _engine_from(parser, cfg.fit, "fit")


def _class_nodes(value: Any, path: str) -> Iterator[tuple[str, Namespace]]:
    """``(dotted path, node)`` of every ``class_path``/``init_args`` node in a parsed config."""
    if isinstance(value, Namespace):
        if "class_path" in value:
            yield path, value
        for key, child in vars(value).items():
            yield from _class_nodes(child, f"{path}.{key}" if path else key)
    elif isinstance(value, dict):
        for key, child in value.items():
            yield from _class_nodes(child, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, child in enumerate(value):
            yield from _class_nodes(child, f"{path}[{i}]")


def _located(cfg: Namespace, err: Exception) -> ConfigError:
    """A constructor rejected its arguments while the config was instantiated. Find which node of
    the config it was (by building the innermost class nodes again, one by one) and prefix the
    message with its path, e.g. ``cohort.students.s: Unknown ResNet size 'zz' ...``."""
    message = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
    for path, node in _class_nodes(cfg, ""):
        init_args = node.get("init_args")
        if any(True for _ in _class_nodes(init_args, "")):
            continue  # only nodes whose arguments are plain values can be rebuilt alone
        module, _, name = str(node.class_path).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            continue
        kwargs = init_args.as_dict() if isinstance(init_args, Namespace) else dict(init_args or {})
        try:
            cls(**kwargs)
        except Exception as again:  # noqa: BLE001 - only compared with the original error
            if type(again) is type(err) and str(again) == str(err):
                if message.startswith(path):
                    return ConfigError(message)
                return ConfigError(f"{path}: {message}")
    return ConfigError(message)


def _configurable_bases() -> dict[str, tuple[type, ...]]:
    """The base class of what each top-level key configures by ``class_path``."""
    from collab_distill.tasks.classification.data import ClassificationData

    return {"plugins": (Plugin,), "cohort": (ModelFactory,), "task": (Task, ClassificationData), "schedule": (Schedule,)}


def _public_subclasses(base: type) -> Iterator[str]:
    """Import paths of the concrete, public subclasses of ``base`` imported so far."""
    import inspect

    stack = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if not inspect.isabstract(cls) and not cls.__name__.startswith("_"):
            yield f"{cls.__module__}.{cls.__qualname__}"


def _importable(path: str) -> Optional[type]:
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name) if module else None
    except Exception:  # noqa: BLE001 - any failure means "not importable"
        return None
    return found if isinstance(found, type) else None


def _argument_hint(message: str, argv: list[str], parser: ArgumentParser) -> str:
    """A fix for a jsonargparse error: the closest name for a misspelt option, key, class or
    init arg, the known classes for a class_path that cannot be imported, and always where
    the options are listed."""
    command = next((a for a in argv if a in ("fit", "validate", "test", "export", "plugins")), None)
    hints = []
    sub_parser = None
    if command is not None:
        sub_parser = parser._subcommands_action._name_parser_map.get(command)
    if sub_parser is not None:
        known = sorted({a.dest for a in sub_parser._actions if a.dest and a.dest != "help"})
        wrong = re.findall(r"--([\w.\-\[\]]+)", message.split("\n")[0]) + re.findall(r"option '([^']+)'", message)
        for key in wrong:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
            if close:
                hints.append(f"did you mean `{close[0]}`?")
    # the innermost name that could not be imported (a nested error lists its parents first)
    bad = (
        re.findall(r"dot import path string: ([\w.]+)", message)
        or re.findall(r"Import path ([\w.]+) does not correspond", message)
        or re.findall(r"class_path '([\w.]+)'", message)
    )
    key = re.search(r'Parser key "([\w.]+)"', message)
    found = _importable(bad[-1]) if bad else None
    options = re.findall(r"Option '([\w.]+)' is not accepted", message)
    if found is not None and options:
        import inspect

        try:
            accepted = [n for n in inspect.signature(found).parameters if n not in ("self", "args", "kwargs")]
        except (TypeError, ValueError):
            accepted = []
        for option in options:
            close = difflib.get_close_matches(option.rpartition(".")[2], accepted, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean `{close[0]}`?")
        hints.append(f"{found.__name__} accepts init_args: {', '.join(accepted) or 'none'}")
    elif bad and key and (found is None or "does not correspond" in message):
        bases = _configurable_bases().get(key.group(1).split(".")[0], ())
        choices = sorted({path for base in bases for path in _public_subclasses(base)})
        if choices:
            wanted = bad[-1].rpartition(".")[2]
            close = difflib.get_close_matches(wanted, [c.rpartition(".")[2] for c in choices], n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {next(c for c in choices if c.endswith('.' + close[0]))}?")
            hints.append(
                "class_path must be the import path `package.module.ClassName` of an importable class; known: "
                + ", ".join(choices)
            )
    hints.append(f"`collab-distill {command + ' ' if command else ''}--help` lists every option and its type")
    return "; ".join(hints)


def _export(cfg: Namespace) -> None:
    from collab_distill.export import export_student

    paths = export_student(
        cfg.ckpt_path, cfg.student, output=cfg.output, weights=cfg.weights,
        torchscript=cfg.torchscript, exported_program=cfg.exported_program,
    )
    for p in paths:
        print(p)


def _list_plugins() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="collab_distill plugins (entry-point group `collab_distill`)", title_justify="left")
    for col in ("name", "kind", "object", "hooks"):
        table.add_column(col)
    for info in discover():
        if info.error is not None:
            table.add_row(info.name, "[red]broken[/red]", info.value, info.error)
            continue
        kind = "configurable (list under plugins:)" if info.configurable else "always on"
        table.add_row(info.name, kind, info.value, ", ".join(hooks_implemented_by(info.target)))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser: Optional[ArgumentParser] = None
    try:
        _check_config_files(list(argv))
        parser = build_parser()
        cfg = parser.parse_args(argv)
        command = cfg.subcommand
        if command == "plugins":
            _list_plugins()
            return 0
        if command == "report":
            from collab_distill.report import write_report

            for path in write_report(cfg.report.run_dir):
                print(path)
            return 0
        if command == "export":
            _export(cfg.export)
            return 0
        engine = _engine_from(parser, cfg[command], command)
        sub = cfg[command]
        if command == "fit":
            results = engine.fit(resume=sub.resume)
        else:
            results = engine.evaluate_checkpoint("val" if command == "validate" else "test", sub.ckpt_path, sub.weights, sub.output_dir)
        return 0 if results is not None else 1
    except argparse.ArgumentError as err:
        # jsonargparse: a wrong type, an unknown option or key, a class_path that cannot be imported
        message = str(err).strip()
        try:
            hint = _argument_hint(message, list(argv), parser or build_parser())
        except Exception:  # noqa: BLE001 - a hint must never hide the error itself
            hint = "`collab-distill --help` lists the options"
        print(f"collab-distill: error: {message}\n  fix: {hint}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"collab-distill: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("collab-distill: interrupted; resume with --resume last", file=sys.stderr)
        return 130
    except Exception as err:
        from collab_distill.engine import NonFiniteLossError

        if isinstance(err, NonFiniteLossError):
            print(f"collab-distill: error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
