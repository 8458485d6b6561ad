"""Model size and cost, reported next to each cohort member so results can be compared fairly.

MACs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`, i.e. for the matrix
products and convolutions that dominate a network's cost; normalisation, activations, pooling
and biases are not counted, which is the usual convention of papers' "MACs" columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from collab_distill.task import ConfigError

__all__ = ["ForwardCall", "count_parameters", "count_macs", "member_macs", "format_count"]


@dataclass(frozen=True)
class ForwardCall:
    """The arguments of one forward call, for models whose ``forward`` takes more than a tensor:
    a detector counts its cost on a list of image dicts *and* ``mode="predict"``, i.e. on the
    inference pass it is deployed with rather than its training one."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, trainable or not (shared parameters count once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of one forward pass on ``example_input`` (usually ``[1, C, H, W]``).

    The pass runs without gradients and with every submodule in eval mode, so BatchNorm running
    statistics and dropout state are untouched; each submodule's own train/eval flag is put
    back afterwards (a model may deliberately keep some parts, e.g. frozen BN, in eval mode).
    torch's CPU random state is restored too, so counting never shifts a run's random stream.
    A tuple or list ``example_input`` is unpacked into positional arguments; a
    :class:`ForwardCall` gives positional and keyword arguments.
    """
    modes = {m: m.training for m in model.modules()}
    if isinstance(example_input, ForwardCall):
        call = example_input
    else:
        call = ForwardCall(tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,))
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad(), counter:
            call(model)
    finally:
        for module, training in modes.items():
            module.training = training
    return counter.get_total_flops() // 2


def _input_described(example: Any) -> str:
    """``a [1, 3, 8, 8] float32 tensor``, or what a :class:`ForwardCall` holds."""
    if isinstance(example, torch.Tensor):
        return f"a {list(example.shape)} {str(example.dtype).removeprefix('torch.')} tensor"
    if isinstance(example, ForwardCall):
        parts = [_input_described(a) for a in example.args] + [f"{k}={v!r}" for k, v in example.kwargs.items()]
        return f"({', '.join(parts)})"
    if isinstance(example, (list, tuple)):
        return f"[{', '.join(_input_described(e) for e in example)}]"
    if isinstance(example, Mapping):
        return "{" + ", ".join(f"{k}: {_input_described(v)}" for k, v in example.items()) + "}"
    return type(example).__name__


def member_macs(model: nn.Module, example: Any, where: str, factory: str, task: str) -> int:
    """:func:`count_macs` of a cohort member, its first forward pass: a model that fails on the
    task's input (a detector given an image classification batch, a ViT that needs 224 px) is one
    error naming the member (``where``), its factory and the input, with the model's own message,
    instead of the model's traceback once the run has started."""
    try:
        return count_macs(model, example)
    except (ConfigError, MemoryError):
        raise
    except Exception as err:
        said = f"{type(err).__name__}: {err}" if str(err) else f"{type(err).__name__} (without a message)"
        raise ConfigError(
            f"{where}: {factory} ({type(model).__name__}) fails on {task}'s input, {_input_described(example)}: "
            f"{said}; choose a model made for this task and its image size (or data that fits the model)"
        ) from err


def format_count(n: int) -> str:
    """Short human form of a count: ``1234567 -> "1.23M"``, ``456700 -> "456.7K"``, ``12 -> "12"``."""
    if abs(n) < 1000:
        return str(n)
    for suffix, scale, decimals in (("K", 1e3, 1), ("M", 1e6, 2), ("G", 1e9, 2), ("T", 1e12, 2)):
        value = round(n / scale, decimals)
        # move up a unit when rounding reaches 1000 ("1.00M", not "1000.0K")
        if abs(value) < 1000 or suffix == "T":
            return f"{value:.{decimals}f}{suffix}"
    raise AssertionError("unreachable")
