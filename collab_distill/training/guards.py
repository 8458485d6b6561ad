"""Checks on the training step that would otherwise fail silently: a non-finite loss (read on
the host only every few steps) and trainable tensors that reach the loss but no optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from collab_distill.loss import untrained_leaves
from collab_distill.task import ConfigError

__all__ = ["NonFiniteLossError", "NonFiniteGuard", "check_trained_leaves"]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the student and the term."""


class NonFiniteGuard:
    """Collects per-step finite flags on the device (no host sync per step) and raises at
    :meth:`check`, which the loop calls on logging steps, before every checkpoint and at epoch
    end, so a bad state is never saved."""

    def __init__(self, students: Iterable[str], every: int) -> None:
        self.students, self.every = list(students), every
        self._flags: list[tuple[int, Tensor]] = []

    def record(self, step: int, logs: Mapping[str, Any], loss: Tensor) -> None:
        # each student's "loss" entry is a tensor (plugins' entries may be floats)
        values = [logs[f"{s}/loss"] for s in self.students] + [loss.detach()]
        self._flags.append((step, torch.isfinite(torch.stack(values))))

    def check(self, epoch: int, checkpoint_kept: Callable[[], Optional[str]], blame: str = "") -> None:
        """Raise if any loss since the last check was NaN/inf (one host sync). ``checkpoint_kept``
        gives the last good checkpoint's path, if any; ``blame``: plugins that set loss weights."""
        if not self._flags:
            return
        steps = [step for step, _ in self._flags]
        finite = torch.stack([flags for _, flags in self._flags]).cpu()
        self._flags.clear()
        if bool(finite.all()):
            return
        first_row = int((~finite).any(dim=1).nonzero()[0])
        bad = [f"{s}/loss" for s, ok in zip(self.students, finite[first_row, :-1].tolist()) if not ok]
        last = checkpoint_kept()
        kept = (f"The last good checkpoint {last} was left untouched (resume with --resume last)."
                if last is not None else "No checkpoint had been written yet.")
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch} step {steps[first_row]}: {', '.join(bad) or 'loss'} "
            f"became NaN/inf (checked every {self.every} steps and before each checkpoint). "
            f"{blame}Lower optimizer.init_args.lr, set trainer.gradient_clip, or check the data and the teacher. {kept}"
        )


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
