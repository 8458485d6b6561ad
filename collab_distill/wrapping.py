"""The user's objects inside Fabric's (and DDP's) wrappers."""

from __future__ import annotations

from typing import Any, cast

import torch
from lightning_fabric.wrappers import is_wrapped
from torch import nn

__all__ = ["unwrap", "unwrap_optimizer"]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's (and DDP's) wrappers; the module itself if unwrapped."""
    # nn.Module.__getattr__ is typed Tensor | Module; a Fabric wrapper's .module is the user's module
    return cast(nn.Module, model.module) if is_wrapped(model) else model


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Fabric's wrapper."""
    return optimizer.optimizer if is_wrapped(optimizer) else optimizer
