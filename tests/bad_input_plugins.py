"""A plugin for tests/test_bad_input.py (importable by ``class_path`` with ``tests/`` on PYTHONPATH)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from collab_distill import Knowledge, LossWeights, Plugin, hookimpl


class NonFiniteLossWeights(Plugin):
    """Supervised-only loss weights whose alpha becomes ``value`` (NaN by default) from training
    step ``after_step`` on: a stand-in for a method whose loss blows up."""

    def __init__(self, after_step: int = 0, value: str = "nan") -> None:
        self.after_step = after_step
        self.value = float(value)

    @hookimpl
    def collab_distill_loss_weights(self, engine: Any, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        alpha = self.value if engine.global_step >= self.after_step else 1.0
        return {name: LossWeights.constant_weights(rec.num_images, alpha, 0.0, 0.0, rec.logits.device)
                for name, rec in records.items()}


class EndsTheProcess(Plugin):
    """Ends the process itself at training step ``step``: ``sys.exit(code)`` (``how: exit``) or
    the KeyboardInterrupt that Ctrl-C raises (``how: interrupt``)."""

    def __init__(self, step: int = 1, how: str = "exit", code: int = 0) -> None:
        self.step, self.how, self.code = step, how, code

    @hookimpl
    def collab_distill_train_step_end(self, step: int) -> None:
        if step == self.step:
            if self.how == "interrupt":
                raise KeyboardInterrupt
            sys.exit(self.code)


class FailsToStart(Plugin):
    """A plugin whose ``__init__`` raises (it cannot read what its ``path`` names)."""

    def __init__(self, path: str = "rules.txt") -> None:
        raise RuntimeError(f"cannot read {path}")


class WrongShapeWeights(Plugin):
    """Per-image loss weights whose beta has one value too many (issue 22: named with its plugin)."""

    @hookimpl
    def collab_distill_loss_weights(self, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        import torch

        out = {}
        for name, rec in records.items():
            w = LossWeights.constant_weights(rec.num_images, 1.0, 0.0, 0.0, rec.logits.device)
            out[name] = LossWeights(w.alpha, torch.zeros(rec.num_images + 1, device=rec.logits.device), w.gamma)
        return out


class NaNImageWeights(Plugin):
    """Per-image loss weights (tensors, no ``constant``) whose beta of one image becomes NaN from
    training step ``after_step`` on: a NaN the engine finds on the device, at a logging step."""

    def __init__(self, after_step: int = 1) -> None:
        self.after_step = after_step

    @hookimpl
    def collab_distill_loss_weights(self, engine: Any, records: Mapping[str, Knowledge]) -> dict[str, LossWeights]:
        import torch

        out = {}
        for name, rec in records.items():
            n, device = rec.num_images, rec.logits.device
            beta = torch.full((n,), 0.5, device=device)
            if engine.global_step >= self.after_step:
                beta[0] = float("nan")
            out[name] = LossWeights(torch.full((n,), 0.5, device=device), beta, torch.zeros(n, device=device))
        return out


class FailsAtEvaluationEnd(Plugin):
    """Raises when an evaluation ends: a `validate` / `test` that fails after its folder was made."""

    @hookimpl
    def collab_distill_evaluation_end(self, split: str) -> None:
        raise RuntimeError(f"cannot summarise the {split} split")
