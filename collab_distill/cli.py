"""``collab-distill``: the command line (jsonargparse).

    collab-distill fit --config examples/digits.yaml [--trainer.max_epochs 3] [--seed 1] [--resume last]
    collab-distill validate|test --config X.yaml --ckpt_path runs/x/version_0/checkpoints/last.ckpt
    collab-distill export --ckpt_path ... --student s [--output DIR]
    collab-distill plugins

Every config error (unknown class, wrong type, bad value, missing data, checkpoint that does not
fit) stops with one message naming the field before any file is written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from collab_distill import __version__
from collab_distill.config import Cohort, TrainerConfig
from collab_distill.meta import BilevelConfig
from collab_distill.optim import Cosine, OptimizerCallable, Schedule
from collab_distill.plugin_manager import Plugin, discover, hooks_implemented_by
from collab_distill.task import ConfigError, Task

__all__ = ["main", "build_parser"]

_DEFAULT_OPTIMIZER = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}}


def _import_known_classes() -> None:
    """Import built-in and installed plugin/task classes so YAML may use their short names."""
    import collab_distill.tasks.classification  # noqa: F401

    for info in discover():
        pass  # loading the entry point imports its module


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
    parser.add_argument("--disable_plugins", type=list[str], default=[], help="always-on plugins to leave out")
    parser.add_argument("--trace_plugins", type=bool, default=False, help="print every hook call")
    if training:
        parser.add_argument("--resume", type=Optional[str], default=None, help="a checkpoint path, or `last`")
    else:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="checkpoint to evaluate")
        parser.add_argument("--weights", type=str, default="last", choices=["last", "best"], help="last or best-on-val weights")


def build_parser() -> ArgumentParser:
    _import_known_classes()
    root = ArgumentParser(prog="collab-distill", description="Collaborative knowledge distillation.", env_prefix="COLLAB_DISTILL", default_env=False)
    root.add_argument("--version", action="version", version=f"collab-distill {__version__}")
    sub = root.add_subcommands(required=True, dest="subcommand")
    for name, training, help_text in (
        ("fit", True, "train a cohort"),
        ("validate", False, "evaluate the students of a checkpoint on the val split"),
        ("test", False, "evaluate the students of a checkpoint on the test split"),
    ):
        p = ArgumentParser(description=help_text)
        _run_arguments(p, training=training)
        sub.add_subcommand(name, p, help=help_text)
    export = ArgumentParser(description="write one student as a plain state dict and TorchScript")
    export.add_argument("--ckpt_path", type=str, required=True, help="a run checkpoint (last.ckpt)")
    export.add_argument("--student", type=str, required=True, help="the student to export")
    export.add_argument("--output", type=Optional[str], default=None, help="folder (default: the run's exports/)")
    export.add_argument("--weights", type=str, default="last", choices=["last", "best"])
    export.add_argument("--torchscript", type=bool, default=True)
    sub.add_subcommand("export", export, help="export one student")
    plugins = ArgumentParser(description="list installed plugins and the hooks they implement")
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
    text = sub_parser.dump(cfg, skip_none=False, skip_check=True)
    init = sub_parser.instantiate_classes(cfg)
    engine = Engine(
        task=init.task, cohort=init.cohort, trainer=init.trainer, optimizer=init.optimizer,
        schedule=init.schedule, meta=init.meta, plugins=init.plugins, disable_plugins=init.disable_plugins,
        seed=init.seed, trace_plugins=init.trace_plugins, config_text=text,
    )
    return engine


def _export(cfg: Namespace) -> None:
    from collab_distill.export import export_student

    paths = export_student(cfg.ckpt_path, cfg.student, output=cfg.output, weights=cfg.weights, torchscript=cfg.torchscript)
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
    Console().print(table)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        cfg = parser.parse_args(argv)
        command = cfg.subcommand
        if command == "plugins":
            _list_plugins()
            return 0
        if command == "export":
            _export(cfg.export)
            return 0
        engine = _engine_from(parser, cfg[command], command)
        sub = cfg[command]
        if command == "fit":
            results = engine.fit(resume=sub.resume)
        else:
            results = engine.evaluate_checkpoint("val" if command == "validate" else "test", sub.ckpt_path, sub.weights)
        return 0 if results is not None else 1
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
