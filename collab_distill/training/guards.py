"""Checks on the training step that would otherwise fail silently: a non-finite loss (read on
the host only every few steps), plugins' answers whose values are wrong (negative or non-finite
loss weights, a non-finite auxiliary loss: read with the same flags, each blamed on its plugin)
and trainable tensors that reach the loss but no optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from collab_distill.answers import PluginAnswerError
from collab_distill.loss import AUX_HOOK, WEIGHTS_HOOK
from collab_distill.task import ConfigError

__all__ = ["NonFiniteLossError", "NonFiniteGuard", "check_trained_leaves", "untrained_leaves"]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the student and the term, and the plugin
    (``plugin``) and hook (``hook``) when a plugin's answer made it so."""

    def __init__(self, message: str, plugin: Optional[str] = None, hook: Optional[str] = None) -> None:
        super().__init__(message)
        self.plugin, self.hook = plugin, hook

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.plugin, self.hook))


#: one answer a plugin gave: ``(hook, student or term, which weight, value)``
Answer = tuple[str, str, str, "Tensor | float"]


@dataclass
class _Answers:
    """What plugins answered on one step: tensors kept flat on the device (``layout``: hook,
    subject, which, size), numbers already judged (``wrong``: hook, subject, which, problem)."""

    step: int
    layout: list[tuple[str, str, str, int]]
    flat: Optional[Tensor]
    wrong: list[tuple[str, str, str, str]]
    finite: bool


class NonFiniteGuard:
    """Collects per-step finite flags on the device (no host sync per step) and raises at
    :meth:`check`, which the loop calls on logging steps, before every checkpoint and at epoch
    end, so a bad state is never saved.

    It also keeps what plugins answered (:meth:`record_answers`: loss weights must be finite and
    >= 0, auxiliary losses finite), so that a NaN a plugin caused is blamed on it."""

    def __init__(self, students: Iterable[str], every: int) -> None:
        self.students, self.every = list(students), every
        self._flags: list[tuple[int, Tensor]] = []
        self._answers: list[_Answers] = []
        #: ``{(hook, student or term): plugin}``: who answered, as found on the first training step
        self.sources: dict[tuple[str, str], str] = {}

    def record(self, step: int, logs: Mapping[str, Any], loss: Tensor) -> None:
        # each student's "loss" entry is a tensor (plugins' entries may be floats)
        values = [logs[f"{s}/loss"] for s in self.students] + [loss.detach()]
        self._flags.append((step, torch.isfinite(torch.stack(values))))

    def name_sources(self, hook: str, plugins: Mapping[str, str]) -> None:
        """Remember which plugin answered ``hook`` for each student or term (named in errors)."""
        self.sources.update({(hook, key): plugin for key, plugin in plugins.items()})

    def record_answers(self, step: int, answers: Iterable[Answer], finite: bool = True) -> bool:
        """Keep this step's answers for the next :meth:`check`: tensors copied flat on the device
        (one ``cat``, no host sync), numbers judged now. A loss weight (``WEIGHTS_HOOK``) must be
        >= 0, and with ``finite`` every answer finite. Returns whether a number is wrong already
        (the caller then checks at once)."""
        layout, tensors, wrong = [], [], []
        for hook, subject, which, value in answers:
            if isinstance(value, Tensor):
                layout.append((hook, subject, which, value.numel()))
                tensors.append(value.detach().reshape(-1))
                continue
            problem = _problem(hook, not math.isfinite(value), value < 0, finite)
            if problem:
                wrong.append((hook, subject, which, problem))
        flat = torch.cat(tensors) if tensors else None
        self._answers.append(_Answers(step, layout, flat, wrong, finite))
        return bool(wrong)

    def check(self, epoch: int, checkpoint_kept: Callable[[], Optional[str]], blame: str = "") -> None:
        """Raise if any loss since the last check was NaN/inf, or a plugin's answer was wrong (one
        host sync). ``checkpoint_kept`` gives the last good checkpoint's path, if any."""
        if not self._flags and not self._answers:
            return
        steps = [step for step, _ in self._flags]
        parts = [torch.stack([flags for _, flags in self._flags]).flatten()] if self._flags else []
        flats = [a.flat for a in self._answers if a.flat is not None]
        if flats:
            values = torch.cat(flats)
            parts.append(torch.cat([~torch.isfinite(values), values < 0]))
        read = torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.bool)  # the one host sync
        finite = read[: len(steps) * (len(self.students) + 1)].view(len(steps), len(self.students) + 1)
        problems = self._problems(read[finite.numel():])
        self._flags.clear()
        self._answers.clear()
        bad_rows = (~finite).any(dim=1).nonzero()
        first_row = int(bad_rows[0]) if len(bad_rows) else None
        last = checkpoint_kept()
        kept = (f"The last good checkpoint {last} was left untouched (resume with --resume last)."
                if last is not None else "No checkpoint had been written yet.")
        if problems and (first_row is None or problems[0][0] <= steps[first_row]):
            self._raise(epoch, kept, *problems[0])
        if first_row is None:
            return
        bad = [f"{s}/loss" for s, ok in zip(self.students, finite[first_row, :-1].tolist()) if not ok]
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch} step {steps[first_row]}: {', '.join(bad) or 'loss'} "
            f"became NaN/inf (checked every {self.every} steps and before each checkpoint). "
            f"{blame}Lower optimizer.init_args.lr, set trainer.gradient_clip, or check the data and the teacher. {kept}"
        )

    def _problems(self, read: Tensor) -> list[tuple[int, str, str, str, str]]:
        """``(step, hook, subject, which, "non-finite" or "negative")`` of the wrong answers, by step."""
        total = sum(size for a in self._answers for *_, size in a.layout)
        nonfinite, negative = read[:total], read[total:]
        found, offset = [], 0
        for a in self._answers:
            found += [(a.step, hook, subject, which, problem) for hook, subject, which, problem in a.wrong]
            for hook, subject, which, size in a.layout:
                span = slice(offset, offset + size)
                offset += size
                problem = _problem(hook, bool(nonfinite[span].any()), bool(negative[span].any()), a.finite)
                if problem:
                    found.append((a.step, hook, subject, which, problem))
        return sorted(found, key=lambda p: p[0])

    def _raise(self, epoch: int, kept: str, step: int, hook: str, subject: str, which: str, problem: str) -> None:
        plugin = self.sources.get((hook, subject))
        who = f"plugin {plugin!r}" if plugin is not None else "a plugin"
        if problem == "negative":
            raise PluginAnswerError(
                f"{who} answered {hook} with a negative {which} for {subject!r} at step {step}; expected weights >= 0 "
                "(a weight scales a loss term; 0 switches it off)", plugin, hook)
        if hook == AUX_HOOK:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch} step {step}: the auxiliary loss {subject!r} from {who} became NaN/inf "
                f"at step {step}; {hook} must return a finite scalar tensor per term. {kept}", plugin, hook)
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch} step {step}: the loss weights from {who} became NaN/inf at step {step} "
            f"({which} of {subject!r}; {hook} must return finite weights >= 0), so {subject}/loss is NaN/inf: "
            f"fix that plugin (lowering the learning rate would not help). {kept}", plugin, hook)


def _problem(hook: str, nonfinite: bool, negative: bool, finite: bool) -> str:
    """What is wrong with one answer ('' if nothing): weights must be >= 0, everything finite."""
    if nonfinite and finite:
        return "non-finite"
    if negative and hook == WEIGHTS_HOOK:
        return "negative"
    return ""


def check_trained_leaves(loss: Tensor, optimizers: Iterable[Any], meta_modules: Iterable[torch.nn.Module],
                         plugins: Mapping[str, Any]) -> None:
    """Stop when a trainable tensor reaches the loss but no optimizer updates it (a plugin's
    module kept as an attribute instead of declared): it would silently stay at its init."""
    from collab_distill.wrapping import unwrap_optimizer

    trained = {id(p) for opt in optimizers for g in unwrap_optimizer(opt).param_groups for p in g["params"]}
    trained |= {id(p) for m in meta_modules for p in m.parameters()}
    strays = untrained_leaves(loss, trained, plugins)
    if strays:
        raise ConfigError(
            f"trainable parameter(s) reach the loss but no optimizer updates them: {'; '.join(strays)}. "
            "A plugin's trainable module must be returned from collab_distill_student_modules (trained with a "
            "student) or collab_distill_meta_modules (meta-learned), and called through engine.student_module(...)"
        )


def untrained_leaves(loss: Tensor, trained: set[int], owners: Mapping[str, Any]) -> list[str]:
    """Trainable leaf tensors of ``loss``'s graph whose ``id`` is not in ``trained``, described as
    ``"<owner>: <attribute> <shape>"`` when one of ``owners`` (name -> plugin object) holds them."""
    seen, stack, strays = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in trained:
            strays.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    described = []
    for tensor in strays:
        owner = next((f"{name}: {attr}" for name, plugin in owners.items() for attr, value in _tensors_of(plugin)
                      if value is tensor), None)
        described.append(f"{owner or 'an unnamed tensor'} {tuple(tensor.shape)}")
    return described


def _tensors_of(plugin: Any) -> Iterator[tuple[str, Tensor]]:
    """``(attribute path, tensor)`` of the parameters a plugin object holds (for error messages)."""
    for attr, value in vars(plugin).items() if hasattr(plugin, "__dict__") else ():
        if isinstance(value, nn.Module):
            for name, p in value.named_parameters():
                yield f"{attr}.{name}", p
        elif isinstance(value, Tensor):
            yield attr, value
