"""``collab-distill``: the command line (jsonargparse).

    collab-distill fit --config examples/digits.yaml [--trainer.max_epochs 3] [--seed 1] [--resume last]
    collab-distill validate|test --config X.yaml --ckpt_path runs/x/version_0/checkpoints/last.ckpt
    collab-distill export --ckpt_path ... --student s [--output DIR]
    collab-distill modules --config X.yaml [--member xs]
    collab-distill plugins

Every config error (unknown class, wrong type, bad value, missing data, checkpoint that does not
fit) stops with one message naming the field before any file is written.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ArgumentParser, Namespace

from collab_distill.cli_hints import PluginFailedToStart, argument_hint, located, plugin_instantiators, simplify_union_error
from collab_distill.parsers import (  # build_parser: re-exported
    Parsers,
    build_parser,
    build_parsers,
    check_config_files,
)
from collab_distill.plugin_manager import PluginError, discover, hook_problems, hooks_implemented_by
from collab_distill.task import ConfigError

__all__ = ["main", "build_parser", "engine_from_args"]


def _experiment_name(cfg: Namespace) -> str:
    if cfg.trainer.name:
        return cfg.trainer.name
    configs = cfg.get("config") or []
    if configs:
        last = configs[-1]
        path = getattr(last, "relative", None) or getattr(last, "abs_path", None) or str(last)
        return Path(str(path)).stem
    return "run"


def _raised_at(err: BaseException) -> str:
    """`` (raised at FILE:LINE in FUNCTION; COLLAB_DISTILL_TRACEBACK=1 prints the traceback)``: the
    innermost frame of ``err``'s traceback, which for a plugin's own exception is its code."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return (f" (raised at {last.filename}:{last.lineno} in {last.name}; "
            "COLLAB_DISTILL_TRACEBACK=1 prints the whole traceback)")


def _instantiate(sub_parser: ArgumentParser, cfg: Namespace) -> Namespace:
    """``cfg``'s objects (task, cohort, plugins, ...); a constructor's error names its config node."""
    try:
        instantiators = plugin_instantiators(cfg)
        if "instantiators" in inspect.signature(sub_parser.instantiate).parameters:  # jsonargparse >= 4.53
            return sub_parser.instantiate(cfg, instantiators=instantiators)
        # older releases take them on the parser, which is built afresh for each command
        for instantiator, class_type, subclasses in instantiators:
            sub_parser.add_instantiator(instantiator, class_type, subclasses=subclasses, prepend=True)
        return sub_parser.instantiate(cfg)
    except PluginFailedToStart:
        raise
    except (ConfigError, ValueError, TypeError) as err:
        raise located(cfg, err) from None


def _engine_from(sub_parser: ArgumentParser, cfg: Namespace):
    """The engine that ``cfg`` (parsed by ``sub_parser``: fit, validate or test) describes."""
    from collab_distill.engine import Engine

    cfg.trainer.name = _experiment_name(cfg)
    saved = cfg.clone()
    for action in ("resume", "resume_changes", "dry_run", "ckpt_path", "weights", "output_dir"):  # how to run, not what to run
        if action in saved:
            del saved[action]
    text = sub_parser.dump(saved, skip_unset=False, skip_validation=True)
    init = _instantiate(sub_parser, cfg)
    engine = Engine(
        task=init.task, cohort=init.cohort, trainer=init.trainer, optimizer=init.optimizer,
        schedule=init.schedule, meta=init.meta, plugins=init.plugins,
        disable_plugins=[init.disable_plugins] if isinstance(init.disable_plugins, str) else init.disable_plugins,
        seed=init.seed, trace_plugins=init.trace_plugins, config_text=text, stages=init.get("stages"),
    )
    return engine


def engine_from_args(argv: list[str]) -> Any:
    """The :class:`~collab_distill.engine.Engine` that ``collab-distill fit ARGS`` would run,
    built but not started (for benchmarks and notebooks): ``engine_from_args(["--config", "x.yaml"])``."""
    check_config_files(["fit", *argv])
    parsers = build_parsers()
    cfg = parsers.root.parse_args(["fit", *argv])
    return _engine_from(parsers.subcommands["fit"], cfg.fit)


def _export(cfg: Namespace) -> None:
    from collab_distill.export import export_student

    paths = export_student(
        cfg.ckpt_path, cfg.student, output=cfg.output, weights=cfg.weights,
        torchscript=cfg.torchscript, exported_program=cfg.exported_program, overwrite=cfg.overwrite,
    )
    for p in paths:
        print(p)


def _list_plugins() -> None:
    """The installed plugins, each with the hooks it implements and what keeps it from working as
    meant (``problems``: an import error, a hook that does not exist, arguments a hook does not
    offer, a ``collab_distill_*`` method without ``@hookimpl``)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="collab_distill plugins (entry-point group `collab_distill`)", title_justify="left")
    for col in ("name", "kind", "object", "hooks", "problems"):
        table.add_column(col, overflow="fold")  # an import path is never cut short
    for info in discover():
        if info.error is not None:
            owner = info.distribution.split()[0] if info.distribution else "it"
            problem = f"fails to import: {info.error} (fix: --disable_plugins {info.name}, or uninstall {owner})"
            table.add_row(info.name, Text("broken", style="red"), info.value, "", Text(problem, style="red"))
            continue
        kind = "configurable (list under plugins:)" if info.configurable else "always on"
        problems = Text("; ".join(hook_problems(info.target)), style="yellow")
        table.add_row(info.name, kind, info.value, ", ".join(hooks_implemented_by(info.target)), problems)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _disk_full(err: BaseException, command: Optional[str]) -> Optional[int]:
    """Exit code 1 after one line, for a write that found the disk full (else ``None``)."""
    from collab_distill.checkpoint import disk_full_message

    message = disk_full_message(err, resume=command == "fit")
    if message is None:
        return None
    print(f"collab-distill: error: {message}", file=sys.stderr)
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parsers: Optional[Parsers] = None
    command: Optional[str] = None
    try:
        check_config_files(list(argv))
        parsers = build_parsers()
        cfg = parsers.root.parse_args(argv)
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
        if command == "modules":
            from collab_distill.modules_listing import module_rows, print_module_rows

            init = _instantiate(parsers.subcommands["modules"], cfg.modules)
            members = [init.member] if isinstance(init.member, str) else init.member
            print_module_rows(module_rows(init.task, init.cohort, init.seed, members))
            return 0
        engine = _engine_from(parsers.subcommands[command], cfg[command])
        sub = cfg[command]
        if command == "fit" and sub.dry_run:
            from collab_distill.dry_run import dry_run

            dry_run(engine)
            return 0
        if command == "fit":
            results = engine.fit(resume=sub.resume, allow_changes=sub.resume_changes == "allow")
        else:
            split = "val" if command == "validate" else "test"
            results = engine.evaluate_checkpoint(split, sub.ckpt_path, sub.weights, sub.output_dir)
        return 0 if results is not None else 1
    except argparse.ArgumentError as err:
        # jsonargparse: a wrong type, an unknown option or key, a class_path that cannot be imported
        message = simplify_union_error(str(err).strip())
        try:
            hint = argument_hint(list(argv), parsers or build_parsers())
        except Exception:  # noqa: BLE001 - a hint must never hide the error itself
            hint = "`collab-distill --help` lists the options"
        print(f"collab-distill: error: {message}\n  fix: {hint}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"collab-distill: error: {err}", file=sys.stderr)
        return 2
    except PluginError as err:
        full = _disk_full(err, command)  # e.g. the built-in checkpointing's write
        if full is not None:
            return full
        # which plugin failed in which hook, and the line of its code that raised; the whole
        # traceback only on request, so that the error stays one line
        print(f"collab-distill: error: {err}{_raised_at(err.__cause__ or err)}", file=sys.stderr)
        if os.environ.get("COLLAB_DISTILL_TRACEBACK"):
            import traceback

            traceback.print_exception(err.__cause__ or err, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("collab-distill: interrupted; resume with --resume last", file=sys.stderr)
        return 130
    except Exception as err:
        from collab_distill.engine import NonFiniteLossError

        if isinstance(err, NonFiniteLossError):
            print(f"collab-distill: error: {err}", file=sys.stderr)
            return 1
        full = _disk_full(err, command)
        if full is not None:
            return full
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
