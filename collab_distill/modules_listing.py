"""``collab-distill modules``: the module paths of cohort members and the shapes of their outputs.

A plugin asks for an intermediate output by module path (``FeatureRequest(member, "layer3")``,
``"backbone.fpn[1]"``). This lists every path a member has, as a request writes it, with the
module's type and the shape of its output, measured the way the engine measures
``engine.feature_shapes``: the members built on the CPU from the configured factories, each run
once through the task (``task.knowledge``) on a batch of the first two val images, students in
training mode and teachers in eval mode, with a forward hook on every submodule.

A module whose output is a dict, tuple or list gets one row per item, written ``path[key]``
(the form a request uses to pick one item); a module called more than once per forward keeps
its last call's output (as feature capture does); one that does not run in that forward (a
``ModuleList``, an unused head) says so.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import Tensor, nn

from collab_distill.config import Cohort
from collab_distill.task import ConfigError, Task

__all__ = ["ModuleRow", "check_members", "module_rows", "print_module_rows"]

#: images in the example batch (two, so that BatchNorm in training mode runs)
EXAMPLE_IMAGES = 2


@dataclass(frozen=True)
class ModuleRow:
    """One output of one module of one member."""

    member: str
    #: the module path as ``named_modules()`` spells it, with ``[key]`` for one item of its output
    path: str
    #: the module's class name
    kind: str
    #: the output's shape with the batch dimension (``[2, 32, 4, 4]``), a type name, or a note
    shape: str
    #: how many times the module ran in the forward pass (0: it did not run)
    calls: int = 1


def check_members(cohort: Cohort, members: Optional[Iterable[str]]) -> list[str]:
    """The members to list (default: every student, then every teacher); an unknown name is one
    error naming the cohort's members."""
    everyone = [*cohort.students, *cohort.teachers]
    chosen = list(dict.fromkeys(members or ()))
    unknown = [name for name in chosen if name not in everyone]
    if unknown:
        raise ConfigError(
            f"--member {', '.join(map(repr, unknown))}: not a member of this cohort; students: {sorted(cohort.students)}, "
            f"teachers: {sorted(cohort.teachers)} (leave out --member to list them all)"
        )
    return chosen or everyone


def _items(output: Any) -> list[tuple[Optional[str], Any]]:
    """``(key, value)`` of what a request can pick from ``output``: itself, or one item of a dict,
    tuple or list (by its key or index)."""
    if isinstance(output, Mapping):
        return [(str(key), value) for key, value in output.items()]
    if isinstance(output, (tuple, list)):
        return [(str(i), value) for i, value in enumerate(output)]
    return [(None, output)]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return str(list(value.shape))
    if isinstance(value, (Mapping, tuple, list)):
        return f"{type(value).__name__} of {len(value)} (not a tensor)"
    return "None" if value is None else f"{type(value).__name__} (not a tensor)"


def _build(task: Task, cohort: Cohort, seed: int) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """``(teachers, students)`` built from their factories for the task's data (no checkpoint is
    loaded: the shapes do not depend on the weights)."""
    info = task.setup(seed)

    def build(kind: str, name: str, factory: Any) -> nn.Module:
        try:
            return task.build_model(factory, info)
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"cohort.{kind}.{name}: building {factory.describe()} failed: {type(err).__name__}: {err}") from err

    teachers = {name: build("teachers", name, teacher.model) for name, teacher in cohort.teachers.items()}
    students = {name: build("students", name, factory) for name, factory in cohort.students.items()}
    return teachers, students


def _hooked_forward(task: Task, model: nn.Module, batch: Any, context: Any) -> dict[str, tuple[int, Any]]:
    """``{path: (calls, last output)}`` of every submodule of ``model`` during its record's forward."""
    seen: dict[str, tuple[int, Any]] = {}

    def hook(path: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            seen[path] = (seen.get(path, (0, None))[0] + 1, output)

        return record

    handles = [module.register_forward_hook(hook(path)) for path, module in model.named_modules() if path]
    try:
        task.knowledge(model, batch, view=0, context=context)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def module_rows(task: Task, cohort: Cohort, seed: int = 0, members: Optional[Sequence[str]] = None) -> list[ModuleRow]:
    """Every submodule's output of the ``members`` (default: all), in ``named_modules()`` order."""
    chosen = check_members(cohort, members)
    torch.manual_seed(seed)
    teachers, students = _build(task, cohort, seed)
    dataset = task.dataset("val")
    size = len(cast(Sized, dataset))
    batch = task.collate([dataset[i] for i in range(min(EXAMPLE_IMAGES, size))])
    rows: list[ModuleRow] = []
    with torch.no_grad():
        context = task.shared_context(batch, teachers, students)
        for name in chosen:
            model = students[name] if name in students else teachers[name]
            model.train(name in students)  # the mode it trains in, as feature capture sees it
            seen = _hooked_forward(task, model, batch, context)
            for path, module in model.named_modules():
                if not path:
                    continue
                kind = type(module).__name__
                calls, output = seen.get(path, (0, None))
                if calls == 0:
                    rows.append(ModuleRow(name, path, kind, "not run in this forward", 0))
                    continue
                for key, value in _items(output):
                    rows.append(ModuleRow(name, path if key is None else f"{path}[{key}]", kind, _describe(value), calls))
    return rows


def print_module_rows(rows: Sequence[ModuleRow]) -> None:
    """The rows as one table (member, module path, module type, output shape)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(f"Module outputs on a batch of {EXAMPLE_IMAGES} val images (students in training mode, teachers in eval "
                  "mode). FeatureRequest(member, PATH) takes a path as listed; engine.feature_shapes gives its shape "
                  "without the first (batch) dimension.", soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("member", "module path", "module type", "output shape"):
        table.add_column(column, overflow="fold")  # a path is never cut short
    for row in rows:
        shape = row.shape if row.calls <= 1 else f"{row.shape} (the last of {row.calls} calls)"
        table.add_row(*map(Text, (row.member, row.path, row.kind, shape)))  # Text: `fpn[pool]` is no markup
    console.print(table)
