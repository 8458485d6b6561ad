"""The ``collab-distill`` argument parsers (jsonargparse), built in one place.

:func:`build_parsers` returns the root parser together with the parser of every subcommand, as
registered with the root, so that the command line (:mod:`collab_distill.cli`) and export
(:mod:`collab_distill.export`, which re-parses the config saved in a checkpoint with the ``fit``
parser) use the very same parsers without reaching into jsonargparse's private attributes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, get_loader, set_loader

from collab_distill import __version__
from collab_distill.config import Cohort, TrainerConfig
from collab_distill.meta import BilevelConfig
from collab_distill.optim import OptimizerCallable, Schedule
from collab_distill.plugin_manager import Plugin, discover
from collab_distill.stages import Stage
from collab_distill.task import ConfigError, Task

__all__ = ["Parsers", "build_parsers", "build_parser", "check_config_files", "known_keys"]

_DEFAULT_OPTIMIZER = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}}


class Parsers(NamedTuple):
    """The root parser and, by name, the parser of each of its subcommands (the objects that were
    registered with ``root.add_subcommands().add_subcommand``)."""

    root: ArgumentParser
    subcommands: Mapping[str, ArgumentParser]


def _import_known_classes() -> None:
    """Import built-in and installed plugin/task classes so YAML may use their short names."""
    import collab_distill.tasks.classification  # noqa: F401

    for _ in discover():
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


def _syntax_message(err: Exception) -> str:
    """A YAML syntax error as ``line L, column C: problem (context)``, 1-based, without PyYAML's
    ``in "<unicode string>"`` (it does not know the file) and its copy of the line."""
    import yaml

    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return str(err)
    mark = err.problem_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    context = ""
    if err.context and err.context_mark is not None:
        context = f" ({err.context} that starts at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
    return f"{where}: {err.problem}{context}"


def check_config_files(argv: list[str]) -> None:
    """Refuse a ``--config`` file that is not valid YAML, or that has a key given twice, naming
    the file (jsonargparse's own message says "<unicode string>"; the loader check below also
    catches inline YAML values, but does not know which file it reads)."""
    import yaml

    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        try:
            raw = Path(path).read_bytes()
        except (OSError, ValueError):
            continue  # not a readable file (inline YAML, or missing): jsonargparse reports it
        text = _utf8_text(path, raw)
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"{path}: YAML syntax error at {_syntax_message(err)}; fix the YAML there (an unclosed bracket "
                "or quote, a missing ':', or wrong indentation)"
            ) from None
        if node is None:
            raise ConfigError(f"{path}: the config file is empty; give its settings as `key: value` lines "
                              "(e.g. `trainer:` with `max_epochs: 2` indented below it)")
        if not isinstance(node, yaml.MappingNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
            raise ConfigError(f"{path}: the config's top level is {kind}, not a mapping of sections; give "
                              "`section: ...` lines (task, cohort, trainer, plugins, ...)")
        for key, first, second in _duplicate_keys(node):
            raise ConfigError(f"{path}: {_duplicate_message(key, first, second)}")
        _check_sections(path, node)


def _utf8_text(path: str, raw: bytes) -> str:
    """The file's text; a file that is not UTF-8 (a binary file, UTF-16 from an editor) is one
    message naming it, not the decoder's traceback from inside jsonargparse."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        kind = "UTF-16 text, not UTF-8" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "not UTF-8 text (a binary file?)"
        raise ConfigError(
            f"{path}: the config file is {kind} (byte {raw[err.start]:#04x} at position {err.start} "
            "cannot be decoded); give a YAML text file saved as UTF-8"
        ) from None


#: sections whose value is a mapping of their own settings (``trainer: {max_epochs: 2}``)
_MAPPING_SECTIONS = ("cohort", "trainer", "meta")


def _check_sections(path: str, node: Any) -> None:
    """A section such as ``trainer:`` given a list or a single value instead of its settings."""
    import yaml

    for key, value in node.value:
        name = key.value if isinstance(key, yaml.ScalarNode) else None
        if name in _MAPPING_SECTIONS and not isinstance(value, yaml.MappingNode):
            if isinstance(value, yaml.ScalarNode) and value.tag.endswith(":null"):
                continue  # `trainer:` with nothing below it: the defaults
            kind = "a list" if isinstance(value, yaml.SequenceNode) else f"the single value {value.value!r}"
            raise ConfigError(
                f"{path}: section `{name}` (line {key.start_mark.line + 1}) is {kind}, not a mapping of its settings; "
                f"write `{name}:` followed by indented `key: value` lines (`collab-distill fit --help` lists "
                f"the {name}.* keys)"
            )


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


def _run_arguments(parser: ArgumentParser, *, training: bool, evaluating: bool) -> None:
    """The arguments of a command that reads a run's config: ``fit`` (``training``), ``validate`` and
    ``test`` (``evaluating``), and ``modules`` (neither)."""
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config; later flags override it")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, splits, data order and augmentation")
    parser.add_subclass_arguments(Task, "task", required=True, help="the task adapter and its data")
    parser.add_class_arguments(Cohort, "cohort")
    parser.add_class_arguments(TrainerConfig, "trainer")
    parser.add_argument("--optimizer", type=OptimizerCallable, default=_DEFAULT_OPTIMIZER, help="student optimizer")
    cosine = Namespace(class_path="collab_distill.optim.Cosine")
    parser.add_subclass_arguments(Schedule, "schedule", default=cosine, help="student LR schedule")
    parser.add_class_arguments(BilevelConfig, "meta")
    parser.add_argument("--plugins", type=list[Plugin], default=[], help="configured plugins (methods)")
    parser.add_argument("--stages", type=Optional[list[Stage]], default=None,
                        help="train the students in a sequence of runs; earlier students teach later ones")
    parser.add_argument("--disable_plugins", type=Union[list[str], str], default=[],
                        help="always-on plugins to leave out: one name (--disable_plugins NAME) or a list ([A, B])")
    parser.add_argument("--trace_plugins", type=bool, default=False, help="print every hook call")
    if training:
        parser.add_argument("--resume", type=Optional[str], default=None,
                            help="continue a run: its checkpoint, its folder, or `last` (newest unfinished run of this config)")
        parser.add_argument("--dry_run", type=bool, default=False,
                            help="read the data and build the models here (CPU, one process), print the run's plan "
                                 "for its devices (steps per epoch per rank, effective batch) and stop; nothing is written")
        parser.add_argument("--resume_changes", type=str, default="refuse", choices=["refuse", "allow"],
                            help="`allow`: resume although the config differs from the run's in more than where it stops, "
                                 "logging, checkpointing and devices (the differences are recorded in resumes.json)")
    if evaluating:
        # Optional for the parser, so that its absence is reported with the fix (evaluate_checkpoint)
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="the checkpoint to evaluate (required): runs/NAME/version_N/checkpoints/last.ckpt")
        parser.add_argument("--weights", type=str, default="last", choices=["last", "best"], help="last or best-on-val weights")
        parser.add_argument("--output_dir", type=Optional[str], default=None,
                            help="where metrics.json and plugin outputs go (default: a new evaluations/<split>-<weights> "
                                 "folder in the checkpoint's run)")


def build_parsers() -> Parsers:
    """The root parser and its subcommand parsers (``fit``, ``validate``, ``test``, ``modules``,
    ``export``, ``report``, ``plugins``)."""
    _import_known_classes()
    _install_strict_yaml()
    # errors are raised (not printed with a page of usage) and reported by the caller in one message;
    # no abbreviations: a misspelt `--trainer.max_epoch` must not silently mean `max_epochs`
    strict: dict[str, Any] = {"exit_on_error": False, "allow_abbrev": False}
    root = ArgumentParser(prog="collab-distill", description="Collaborative knowledge distillation.",
                          env_prefix="COLLAB_DISTILL", default_env=False, **strict)
    root.add_argument("--version", action="version", version=f"collab-distill {__version__}")
    sub = root.add_subcommands(required=True, dest="subcommand")
    subcommands: dict[str, ArgumentParser] = {}

    def add(name: str, parser: ArgumentParser, help_text: str) -> None:
        subcommands[name] = sub.add_subcommand(name, parser, help=help_text)

    for name, training, help_text in (
        ("fit", True, "train a cohort"),
        ("validate", False, "evaluate the students of a checkpoint on the val split"),
        ("test", False, "evaluate the students of a checkpoint on the test split"),
    ):
        p = ArgumentParser(description=help_text, **strict)
        _run_arguments(p, training=training, evaluating=not training)
        add(name, p, help_text)
    modules_help = "list the module paths of cohort members and their output shapes (for FeatureRequest paths)"
    modules = ArgumentParser(description=f"{modules_help}: the config as `fit` reads it, the members built on the CPU "
                             "and run on two val images", **strict)
    _run_arguments(modules, training=False, evaluating=False)
    modules.add_argument("--member", type=Union[list[str], str], default=[],
                         help="the members to list: one name (--member xs) or a list ([xs, teacher]); default: all")
    add("modules", modules, modules_help)
    export = ArgumentParser(description="write one student's weights (in its model library's own format for detectors), "
                            "and TorchScript and a torch.export program where the model has them", **strict)
    export.add_argument("--ckpt_path", type=str, required=True, help="a run checkpoint (last.ckpt)")
    export.add_argument("--student", type=str, required=True, help="the student to export")
    export.add_argument("--output", type=Optional[str], default=None, help="folder (default: the run's exports/)")
    export.add_argument("--weights", type=Literal["last", "best"], default="last",
                        help="the last weights or the best-on-val ones")
    export.add_argument("--overwrite", type=bool, default=False,
                        help="replace files an earlier export wrote in --output (default: stop and name them)")
    # None: when the model supports it (a detector does not; a note says so), true: required, false: never
    export.add_argument("--torchscript", type=Optional[bool], default=None,
                        help="write a TorchScript file (default: when the model supports it)")
    export.add_argument("--exported_program", type=Optional[bool], default=None,
                        help="write a torch.export program, .pt2 (default: when the model supports it)")
    add("export", export, "export one student")
    report = ArgumentParser(description="render a finished run's results and plots as Markdown and HTML", **strict)
    report.add_argument("run_dir", type=str, help="the run folder (runs/NAME/version_N)")
    add("report", report, "render a run's report")
    plugins = ArgumentParser(description="list installed plugins and the hooks they implement", **strict)
    add("plugins", plugins, "list installed plugins")
    return Parsers(root, MappingProxyType(subcommands))


def build_parser() -> ArgumentParser:
    """The root ``collab-distill`` parser (see :func:`build_parsers` for its subcommand parsers)."""
    return build_parsers().root


def known_keys(parser: ArgumentParser) -> frozenset[str]:
    """The dotted keys ``parser`` accepts (``trainer.max_epochs``, ``task``, ``optimizer.class_path``,
    ...), from jsonargparse's public :meth:`~jsonargparse.ArgumentParser.get_defaults`: every option
    has a default there (``None`` when none is given). A value below such a key (a ``dict`` entry, a
    class's ``init_args``) is not an option of its own and is not listed."""
    return frozenset(parser.get_defaults().keys())
