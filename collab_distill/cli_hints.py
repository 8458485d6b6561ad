"""What the command line says when a config or an option is wrong: the field that failed, the
classes a ``class_path`` may name, the keys a section knows (with "did you mean")."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, cast

from jsonargparse import Namespace

from collab_distill.optim import Schedule
from collab_distill.parsers import Parsers, known_keys
from collab_distill.plugin_manager import Plugin
from collab_distill.task import ConfigError, ModelFactory, Task

__all__ = ["located", "argument_hint", "PluginFailedToStart", "plugin_instantiators"]


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


def located(cfg: Namespace, err: Exception) -> ConfigError:
    """A constructor rejected its arguments while the config was instantiated. Find which node of
    the config it was (by building the innermost class nodes again, one by one) and prefix the
    message with its path, e.g. ``cohort.students.s: Unknown ResNet size 'zz' ...``."""
    message = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
    simpler = simplify_union_error(str(err))
    if simpler != str(err):  # the union's complaint names its node already (``task.topk=[0] must be ...``)
        return ConfigError(simpler)
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


class PluginFailedToStart(ConfigError):
    """A configured plugin's ``__init__`` raised: the message names its place under ``plugins``,
    its class and the exception (which is the ``__cause__``)."""


def plugin_instantiators(cfg: Namespace) -> list[tuple[Any, type, bool]]:
    """``instantiators`` for jsonargparse's ``instantiate(cfg)`` that turn an exception raised by a
    plugin's ``__init__`` into :class:`PluginFailedToStart` (jsonargparse would let it escape as a
    long traceback through its own frames, without the plugin's name). A ConfigError the plugin
    raises itself already says what to fix and passes unchanged."""
    nodes = list(cfg.get("plugins") or [])
    created: dict[type, int] = {}

    def instantiate(class_type: type, *args: Any, **kwargs: Any) -> Any:
        nth = created.get(class_type, 0)
        created[class_type] = nth + 1
        try:
            return class_type(*args, **kwargs)
        except ConfigError:
            raise
        except (Exception, SystemExit) as err:  # not Ctrl-C
            name = f"{class_type.__module__}.{class_type.__qualname__}"
            # the nth plugin of this class is the nth node of plugins naming it (jsonargparse builds them in order)
            places = [i for i, node in enumerate(nodes) if _importable(str(node.get("class_path"))) is class_type]
            where = f"plugins[{places[nth]}]" if nth < len(places) else "plugins"
            raise PluginFailedToStart(
                f"{where}: {name} could not be created, its __init__ raised {type(err).__name__}: {err}. "
                "Fix its init_args (or what they point to), or leave it out of `plugins:`"
            ) from err

    return [(instantiate, Plugin, True)]


def _configurable_bases() -> dict[str, tuple[type, ...]]:
    """The base class of what each top-level key configures by ``class_path``."""
    from collab_distill.tasks.classification.data import ClassificationData

    return {"plugins": (Plugin,), "cohort": (ModelFactory,), "task": (Task, ClassificationData), "schedule": (Schedule,)}


def _public_subclasses(base: type) -> Iterator[str]:
    """Import paths of the concrete, public subclasses of ``base`` imported so far."""
    import inspect

    stack: list[type] = list(base.__subclasses__())
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


def _given_options(args: list[str]) -> list[tuple[str, Optional[str]]]:
    """``(key, value)`` of every ``--key value`` and ``--key=value`` in a subcommand's arguments
    (``value`` is ``None`` for a flag given last or before another option)."""
    options: list[tuple[str, Optional[str]]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            continue  # a positional argument
        key, eq, text = arg[2:].partition("=")
        value: Optional[str] = text
        if not eq:
            value = None
            if i < len(args) and not args[i].startswith("--"):
                value, i = args[i], i + 1
        options.append((key, value))
    return options


def _yaml_value(text: str) -> Any:
    """A command-line value as jsonargparse reads it: YAML, else the plain string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _read_config(value: str) -> dict:
    """The mapping a ``--config`` value gives: a YAML file, or YAML text (as jsonargparse accepts)."""
    try:
        text = Path(value).read_text() if Path(value).is_file() else value
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    loaded = _yaml_value(text)
    return loaded if isinstance(loaded, dict) else {}


def _merge(old: Any, new: Any) -> Any:
    """``new`` over ``old``: mappings key by key, except that a node naming another ``class_path``
    replaces the old node (the old init_args belong to the old class)."""
    if isinstance(old, dict) and isinstance(new, dict) and new.get("class_path", old.get("class_path")) == old.get("class_path"):
        merged = dict(old)
        for key, value in new.items():
            merged[key] = _merge(old[key], value) if key in old else value
        return merged
    return new


def _given_input(options: list[tuple[str, Optional[str]]]) -> dict:
    """What the user gave a subcommand, as one nested mapping: the ``--config`` files in order,
    with every ``--a.b.c value`` set at ``a`` / ``b`` / ``c`` (``--key+`` appends to a list)."""
    given: dict = {}
    for key, value in options:
        if value is None:
            continue
        if key == "config":
            given = _merge(given, _read_config(value))
            continue
        append = key.endswith("+")
        *parents, last = key.rstrip("+").split(".")
        node = given
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        new = _yaml_value(value)
        if append:
            old = node.get(last)
            node[last] = (old if isinstance(old, list) else []) + (new if isinstance(new, list) else [new])
        else:
            node[last] = _merge(node[last], new) if last in node else new
    return given


def _unknown_keys(given: Any, known: frozenset[str], prefix: str = "") -> Iterator[str]:
    """The dotted keys of ``given`` that are no option of the parser whose options are ``known``.
    Below an option nothing is checked here (a dict's entries, a class's init_args), nor below a
    class option with a default class (its init_args depend on the class given)."""
    if not isinstance(given, dict):
        return
    for key, value in given.items():
        full = f"{prefix}{key}"
        if full in known or f"{full}.class_path" in known or str(key) in ("help", "print_config"):
            continue
        if any(k.startswith(full + ".") for k in known):  # a group such as `trainer`
            yield from _unknown_keys(value, known, full + ".")
        elif isinstance(value, dict) and value:  # `trainr: {max_epochs: 2}`: the dotted keys, as jsonargparse names them
            yield from _unknown_keys(value, frozenset(), full + ".")
        else:
            yield full


def _expected_classes(annotation: Any) -> tuple[type, ...]:
    """The classes a parameter annotated ``X``, ``Optional[X]`` or ``Union[X, Y]`` takes as a
    ``class_path`` node; none (no check) for any other annotation."""
    import types

    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = tuple(a for a in typing.get_args(annotation) if a is not type(None))
        if all(isinstance(a, type) and typing.get_origin(a) is None for a in args):
            return args
    return ()


def _resolve(class_path: str, expected: tuple[type, ...]) -> Any:
    """The object a ``class_path`` names: an import path, or (as jsonargparse allows) the bare
    name of an imported subclass of the expected classes; ``None`` when there is none."""
    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except Exception:  # noqa: BLE001 - any failure means "not importable"
            return None
    for base in expected:
        for path in _public_subclasses(base):
            if path.rpartition(".")[2] == class_path:
                return _importable(path)
    return None


class _ClassProblem(typing.NamedTuple):
    class_path: str
    cls: Optional[type]  # None: cannot be imported, or is not one of the classes the key takes
    unknown_init_args: list[str]
    accepted_init_args: list[str]


def _class_nodes_given(value: Any, expected: tuple[type, ...]) -> Iterator[tuple[dict, tuple[type, ...]]]:
    """The outermost ``{class_path: ..., init_args: ...}`` nodes in ``value``, in order."""
    if isinstance(value, dict):
        if isinstance(value.get("class_path"), str):
            yield value, expected
            return
        for child in value.values():
            yield from _class_nodes_given(child, expected)
    elif isinstance(value, list):
        for child in value:
            yield from _class_nodes_given(child, expected)


def _class_problem(value: Any, expected: tuple[type, ...]) -> Optional[_ClassProblem]:
    """The first ``class_path`` node in ``value`` (outer nodes before the nodes in their init_args)
    that names no importable class of the ``expected`` classes, or gives init_args its class does
    not take."""
    for node, wanted in _class_nodes_given(value, expected):
        class_path = node["class_path"]
        found = _resolve(class_path, wanted)
        if found is None or (isinstance(found, type) and wanted and not issubclass(found, wanted)):
            return _ClassProblem(class_path, None, [], [])
        if not isinstance(found, type):
            continue  # e.g. a function: nothing to check here
        init_args = node.get("init_args")
        if not isinstance(init_args, dict):
            continue
        try:
            params = inspect.signature(found).parameters.values()
        except (TypeError, ValueError):
            continue
        accepted = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):  # **kwargs: may take its bases' arguments
            unknown = [str(k) for k in init_args if k not in accepted]
            if unknown:
                return _ClassProblem(class_path, found, unknown, accepted)
        try:
            # found is a class, not an instance: mypy's unsound-__init__ check does not apply
            annotations = typing.get_type_hints(cast(Any, found).__init__)
        except Exception:  # noqa: BLE001 - unresolvable annotations: nothing more to check
            annotations = {}
        for name, child in init_args.items():
            problem = _class_problem(child, _expected_classes(annotations.get(name)))
            if problem is not None:
                return problem
    return None


def _union_branches(lines: list[str]) -> list[list[str]]:
    """The top-level ``- ...`` items of a union error's ``Errors:`` list, each with the lines
    indented below it (a nested class's own error)."""
    dashes = [len(line) - len(line.lstrip()) for line in lines if line.lstrip().startswith("- ")]
    if not dashes:
        return []
    level, branches = min(dashes), []
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if indent == level and line.lstrip().startswith("- "):
            branches.append([line.lstrip()[2:]])
        elif branches and indent > level:
            branches[-1].append(line.rstrip())
        elif branches and indent < level:
            break
    return branches


def simplify_union_error(message: str) -> str:
    """jsonargparse's error for a value that no member of a ``Union``/``Optional`` accepts lists
    every member's complaint (``Expected a <class 'NoneType'>`` too) and dumps the given node:
    keep the complaints that say something, a nested class's as the option the user gives
    (``Parser key "task.init_args.data.init_args.augment": Expected a <class 'bool'>. ...``)."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    lines = message.splitlines()
    key = next((line.strip() for line in lines if line.strip().startswith("Parser key")), "")
    useful = []
    for branch in _union_branches(lines):
        if branch[0].startswith("Expected a <class"):
            continue  # a bare type complaint says less than the summary below
        nested = [re.match(r'\s*Parser key "([^"]+)":', line) for line in branch]
        names = [m.group(1) for m in nested if m]
        if names and key:  # a nested class's error: down to its innermost key and complaint
            last = max(i for i, m in enumerate(nested) if m)
            inner = "\n".join(branch[last + 1:])
            leaf = simplify_union_error(inner) if "Union subtypes" in inner else " ".join(x.strip() for x in branch[last + 1:])
            outer = key[len('Parser key "'):-2]
            return f'Parser key "{outer}' + "".join(f".init_args.{n}" for n in names) + f'":\n  {leaf.strip()}'
        useful.append(" ".join(x.strip() for x in branch))
    if useful:
        body = "; ".join(dict.fromkeys(useful))
    else:
        subtypes = next((line for line in lines if line.strip().startswith("Subtypes:")), "")
        names = ["null" if t == "NoneType" else t.rsplit(".", 1)[-1] for t in re.findall(r"<class '([\w.]+)'>", subtypes)]
        names.sort(key=lambda name: name == "null")  # 'float or null' whatever order jsonargparse lists them in
        given = next((line.strip().removeprefix("Given value:").strip() for line in lines
                      if line.strip().startswith("Given value:")), "?")
        body = f"expected {' or '.join(names) or 'another type'}, got {given!r}"
    return f"{key}\n  {body}" if key.endswith(":") else f"{key} {body}".strip()


def argument_hint(argv: list[str], parsers: Parsers) -> str:
    """A fix for a jsonargparse error: the closest name for a misspelt option, key, class or
    init arg, the known classes for a class_path that cannot be imported, and always where
    the options are listed.

    jsonargparse's errors carry no structured details (``ArgumentError(None, message)``, with
    text-only causes), so instead of reading the message, the keys and class_path nodes that the
    user gave (``--config`` files and ``--key value`` options) are checked here against the
    subcommand parser's keys and the classes' signatures."""
    command = next((a for a in argv if a in parsers.subcommands), None)
    hints = []
    if command is not None:
        sub_parser = parsers.subcommands[command]
        known = known_keys(sub_parser)
        given = _given_input(_given_options(argv[argv.index(command) + 1:]))
        candidates = sorted(known | {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)})
        for key in dict.fromkeys(_unknown_keys(given, known)):
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.7)
            if close:
                hints.append(f"did you mean `{close[0]}`?")
        for top, value in given.items():
            bases = _configurable_bases().get(str(top), ())
            problem = _class_problem(value, bases)
            if problem is None:
                continue
            if problem.cls is not None:
                for option in problem.unknown_init_args:
                    close = difflib.get_close_matches(option, problem.accepted_init_args, n=1, cutoff=0.6)
                    if close:
                        hints.append(f"did you mean `{close[0]}`?")
                hints.append(f"{problem.cls.__name__} accepts init_args: {', '.join(problem.accepted_init_args) or 'none'}")
            else:
                # collab-distill's own classes first, then those of installed packages and user modules
                choices = sorted({path for base in bases for path in _public_subclasses(base)},
                                 key=lambda path: (not path.startswith("collab_distill."), path))
                if choices:
                    wanted = problem.class_path.rpartition(".")[2]
                    close = difflib.get_close_matches(wanted, [c.rpartition(".")[2] for c in choices], n=1, cutoff=0.6)
                    if close:
                        hints.append(f"did you mean {next(c for c in choices if c.endswith('.' + close[0]))}?")
                    hints.append(
                        "class_path must be the import path `package.module.ClassName` of an importable class; known: "
                        + ", ".join(choices)
                    )
            break  # jsonargparse stops at the first key that fails
    hints.append(f"`collab-distill {command + ' ' if command else ''}--help` lists every option and its type")
    return "; ".join(hints)
