"""Learning-rate schedules that know the run's length, so configs never repeat ``max_epochs``."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from collab_distill.task import ConfigError

__all__ = ["OptimizerCallable", "Schedule", "Constant", "Cosine", "CosineWarmRestarts", "MultiStep", "sgd"]

#: a student optimizer as configured in YAML: ``class_path: torch.optim.SGD`` + ``init_args``
OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]


def sgd(params: Iterable) -> torch.optim.Optimizer:
    """The default student optimizer: SGD, lr 0.05, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


class Schedule(abc.ABC):
    """Builds a per-epoch LR scheduler for one optimizer once the run length is known."""

    @abc.abstractmethod
    def factor(self, epoch: int, total_epochs: int) -> float:
        """Multiplier of the base learning rate during ``epoch`` (0-based)."""

    def build(self, optimizer: torch.optim.Optimizer, total_epochs: int) -> LRScheduler:
        return LambdaLR(optimizer, lambda e: self.factor(e, max(1, total_epochs)))


def _check_min_factor(min_factor: float) -> None:
    """The floor of a decay is a fraction of the base LR: below 0 the LR turns negative (the
    students climb their loss), above 1 the "decay" raises it."""
    if not 0 <= min_factor <= 1:
        raise ConfigError(f"schedule.init_args.min_factor={min_factor!r} must be between 0 and 1 (the last LR as a "
                          "fraction of the base LR; 0 decays to zero)")


class Constant(Schedule):
    """No decay."""

    def factor(self, epoch: int, total_epochs: int) -> float:
        return 1.0


class Cosine(Schedule):
    """Cosine decay from the base LR to ``min_factor`` x base over the run, after linear warm-up."""

    def __init__(self, warmup_epochs: int = 0, min_factor: float = 0.0) -> None:
        if warmup_epochs < 0:
            raise ConfigError(f"schedule.init_args.warmup_epochs={warmup_epochs!r} must be >= 0 (0: no warm-up)")
        _check_min_factor(min_factor)
        self.warmup_epochs = warmup_epochs
        self.min_factor = min_factor

    def factor(self, epoch: int, total_epochs: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        span = max(1, total_epochs - self.warmup_epochs)
        progress = min(1.0, (epoch - self.warmup_epochs) / span)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class CosineWarmRestarts(Schedule):
    """SGDR: cosine cycles of ``period`` epochs, each ``period_mult`` times longer (MC-Distil's release)."""

    def __init__(self, period: int = 10, period_mult: int = 1, min_factor: float = 0.0) -> None:
        if period < 1 or period_mult < 1:
            raise ValueError("CosineWarmRestarts: period and period_mult must be >= 1")
        _check_min_factor(min_factor)
        self.period = period
        self.period_mult = period_mult
        self.min_factor = min_factor

    def factor(self, epoch: int, total_epochs: int) -> float:
        length, start = self.period, 0
        while epoch >= start + length:
            start += length
            length *= self.period_mult
        progress = (epoch - start) / length
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class MultiStep(Schedule):
    """Multiply the LR by ``gamma`` at each milestone epoch."""

    def __init__(self, milestones: list[int], gamma: float = 0.1) -> None:
        if not gamma > 0:  # a negative factor flips the LR's sign at every other milestone, 0 stops learning
            raise ConfigError(f"schedule.init_args.gamma={gamma!r} must be > 0 (the LR's factor at each milestone, "
                              "e.g. 0.1)")
        if any(m < 0 for m in milestones):
            raise ConfigError(f"schedule.init_args.milestones={milestones!r} must be epochs >= 0")
        self.milestones = sorted(milestones)
        self.gamma = gamma

    def factor(self, epoch: int, total_epochs: int) -> float:
        return self.gamma ** sum(epoch >= m for m in self.milestones)
