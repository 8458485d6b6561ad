"""The generic bilevel meta step shared by every meta-learned plugin.

Given students with parameters ``theta``, meta-learned modules with parameters ``phi``, a
training loss ``L_train(theta, phi)`` and a meta objective ``L_meta(theta)`` on held-out data,
one meta step does::

    theta'(phi) = theta - lr * d L_train(theta, phi) / d theta         (one-step lookahead)
    phi        <- phi - meta_opt( d L_meta(theta'(phi)) / d phi )

Two ways to get ``d L_meta / d phi``:

* ``second_order`` (exact): the lookahead keeps its graph (``create_graph=True``) and the meta
  objective is differentiated through it.
* ``finite_difference`` (cheap, DARTS-style): no double backward. With ``v = dL_meta/dtheta'``
  the hypergradient ``-sum_s lr_s * d^2 L_train / (d phi d theta_s) v_s`` is approximated by a
  central difference of ``dL_train/dphi`` at ``theta +- eps * lr * v``. Works through
  operations without double-backward support (``roi_align``).

Dropping the second-order term (MAML's "first-order") would give the meta modules a zero
gradient here, because ``phi`` reaches ``theta'`` only through the inner gradient; so it is not
offered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn

from collab_distill.task import ConfigError

__all__ = ["MetaModule", "BilevelConfig", "Params", "hypergradient", "lookahead", "meta_summary"]

#: ``{student name: {parameter name: tensor}}``
Params = dict[str, dict[str, Tensor]]


def _default_meta_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4)


@dataclass
class MetaModule:
    """A meta-learned module a plugin hands to the engine.

    The engine owns its device placement, optimizer, checkpointing and updates (only in the
    bilevel step). ``optimizer`` builds the module's optimizer from its parameters.
    """

    name: str
    module: nn.Module
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = _default_meta_optimizer


@dataclass
class BilevelConfig:
    """How and when the engine runs the meta step.

    Args:
        every_n_steps: a meta step every this many training steps (MC-Distil's release: 20).
        every_n_epochs: if set, meta steps happen only in every this many epochs (epochs
            0, n, 2n, ... counted from 0), as ``steps_in_meta_epoch`` says.
        steps_in_meta_epoch: with ``every_n_epochs``: ``first`` runs one meta step at the first
            step of such an epoch; ``every_n_steps`` runs one at every ``every_n_steps``-th step
            of it (batches 0, n, 2n, ... of the epoch), e.g. MetaDistiller's Algorithm 1 updates
            its label generator at every iteration of every 5th epoch (``every_n_epochs: 5``,
            ``steps_in_meta_epoch: every_n_steps``, ``every_n_steps: 1``).
        hypergradient: ``second_order`` (exact, double backward) or ``finite_difference``.
        lookahead_momentum: include the optimizer's momentum buffer in the lookahead, as
            MC-Distil's release does. Off by default, chosen on val: on digits (5 seeds, noise 0
            and 0.4, students with momentum 0.9) the plain step gave the higher mean val top-1
            (91.76 vs 91.37; ``benchmarks/results/lookahead_momentum.md``).
        lookahead_weight_decay: include the optimizer's weight decay in the lookahead.
        fd_epsilon: relative step of the finite-difference hypergradient.
        grad_clip: clip the meta gradient's norm (``None``: no clipping).
    """

    every_n_steps: int = 20
    every_n_epochs: int | None = None
    steps_in_meta_epoch: Literal["first", "every_n_steps"] = "first"
    hypergradient: Literal["second_order", "finite_difference"] = "second_order"
    lookahead_momentum: bool = False
    lookahead_weight_decay: bool = False
    fd_epsilon: float = 0.01
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.every_n_steps < 1:
            raise ValueError("meta.every_n_steps must be >= 1")
        if self.every_n_epochs is not None and self.every_n_epochs < 1:
            raise ValueError("meta.every_n_epochs must be >= 1 or null")
        if self.steps_in_meta_epoch not in ("first", "every_n_steps"):
            raise ValueError(f"meta.steps_in_meta_epoch={self.steps_in_meta_epoch!r} must be 'first' or 'every_n_steps'")
        if not self.fd_epsilon > 0:  # 0 divides by zero (NaN hypergradients); a step size is positive
            raise ConfigError(f"meta.fd_epsilon={self.fd_epsilon!r} must be > 0 (the finite difference's relative "
                              "step, e.g. 0.01)")
        if self.grad_clip is not None and not self.grad_clip > 0:  # 0 silently meant "off"; null says it
            raise ConfigError(f"meta.grad_clip={self.grad_clip!r} must be > 0 (the largest meta-gradient norm) or null "
                              "(no clipping)")


def _optimizer_terms(optimizer: torch.optim.Optimizer | None) -> dict[int, tuple[float, float, float, Tensor | None]]:
    """``id(param) -> (lr, momentum, weight_decay, momentum_buffer)`` read from an optimizer."""
    terms: dict[int, tuple[float, float, float, Tensor | None]] = {}
    if optimizer is None:
        return terms
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        momentum = float(group.get("momentum", 0.0) or 0.0)
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            terms[id(p)] = (lr, momentum, wd, buf)
    return terms


def lookahead(
    params: Params,
    originals: Mapping[str, Mapping[str, nn.Parameter]],
    grads: Mapping[str, Mapping[str, Tensor]],
    optimizers: Mapping[str, torch.optim.Optimizer | None],
    config: BilevelConfig,
    scale: float = 1.0,
) -> Params:
    """One SGD-like step ``theta - lr * (g [+ wd*theta] [+ mu*buf])`` at each student's lr.

    ``scale`` multiplies the step (used by the finite-difference perturbation).
    """
    new: Params = {}
    for student, p in params.items():
        terms = _optimizer_terms(optimizers.get(student))
        new[student] = {}
        for name, value in p.items():
            g = grads[student][name]
            term = terms.get(id(originals[student][name]))
            if term is None:  # no learning rate to look ahead with: a silent lr 1.0 would distort the step
                raise ConfigError(
                    f"meta lookahead: student {student!r} parameter {name!r} requires grad but is in none of "
                    "its optimizer's param groups; add it to the optimizer or set requires_grad=False")
            lr, momentum, wd, buf = term
            step = g
            if config.lookahead_weight_decay and wd:
                step = step + wd * value.detach()
            if config.lookahead_momentum and momentum and buf is not None:
                step = step + momentum * buf
            new[student][name] = value - scale * lr * step
    return new


def _flat(params: Params) -> tuple[list[str], list[str], list[Tensor]]:
    students, names, tensors = [], [], []
    for s, p in params.items():
        for n, t in p.items():
            students.append(s)
            names.append(n)
            tensors.append(t)
    return students, names, tensors


def _unflat(students: list[str], names: list[str], tensors: Iterable[Tensor | None], like: list[Tensor]) -> Params:
    out: Params = {}
    for s, n, t, ref in zip(students, names, tensors, like):
        out.setdefault(s, {})[n] = torch.zeros_like(ref) if t is None else t
    return out


def hypergradient(
    *,
    params: Mapping[str, Mapping[str, nn.Parameter]],
    meta_params: list[nn.Parameter],
    train_loss: Callable[[Params], Tensor],
    meta_loss: Callable[[Params], Tensor],
    optimizers: Mapping[str, torch.optim.Optimizer | None],
    config: BilevelConfig,
) -> tuple[list[Tensor], Tensor]:
    """``d L_meta(theta'(phi)) / d phi`` for every meta parameter, and ``L_meta``'s value (a
    detached 0-dim tensor: reading it is a host synchronisation, left to the caller).

    ``train_loss(params)`` and ``meta_loss(params)`` evaluate the students functionally with the
    given parameters (``{student: {name: tensor}}``); ``params`` are the students' real
    parameters (only those that require grad), which are not modified.
    """
    students, names, theta = _flat({s: dict(p) for s, p in params.items()})
    second_order = config.hypergradient == "second_order"

    inner = train_loss({s: dict(p) for s, p in params.items()})
    g = torch.autograd.grad(inner, theta, create_graph=second_order, allow_unused=True)
    grads = _unflat(students, names, g if second_order else [x.detach() if x is not None else None for x in g], theta)
    base: Params = {s: dict(p) for s, p in params.items()}
    if not second_order:
        base = {s: {n: t.detach() for n, t in p.items()} for s, p in params.items()}
    ahead = lookahead(base, params, grads, optimizers, config)

    if second_order:
        outer = meta_loss(ahead)
        meta_grads = torch.autograd.grad(outer, meta_params, allow_unused=True)
        return [torch.zeros_like(p) if q is None else q for p, q in zip(meta_params, meta_grads)], outer.detach()

    # finite differences: v = dL_meta/dtheta' (and any direct dL_meta/dphi)
    ahead_leaves = {s: {n: t.detach().requires_grad_(True) for n, t in p.items()} for s, p in ahead.items()}
    _, _, ahead_flat = _flat(ahead_leaves)
    outer = meta_loss(ahead_leaves)
    both = torch.autograd.grad(outer, ahead_flat + list(meta_params), allow_unused=True)
    v = _unflat(students, names, both[: len(ahead_flat)], ahead_flat)
    direct = [torch.zeros_like(p) if q is None else q for p, q in zip(meta_params, both[len(ahead_flat) :])]

    # the perturbation direction is lr_s * v_s (the lookahead's own step with v as gradient)
    zero = {s: {n: torch.zeros_like(t) for n, t in p.items()} for s, p in base.items()}
    no_extras = BilevelConfig(**{**config.__dict__, "lookahead_momentum": False, "lookahead_weight_decay": False})
    direction = lookahead(zero, params, v, optimizers, no_extras, scale=-1.0)  # = +lr * v
    norm = torch.sqrt(cast(Tensor, sum((d.float() ** 2).sum() for p in direction.values() for d in p.values())))
    if float(norm) == 0.0:
        return direct, outer.detach()
    eps = config.fd_epsilon / float(norm)

    def grad_phi_at(sign: float) -> list[Tensor]:
        shifted = {s: {n: (base[s][n] + sign * eps * direction[s][n]) for n in p} for s, p in base.items()}
        loss = train_loss(shifted)
        gp = torch.autograd.grad(loss, meta_params, allow_unused=True)
        return [torch.zeros_like(p) if q is None else q for p, q in zip(meta_params, gp)]

    plus, minus = grad_phi_at(+1.0), grad_phi_at(-1.0)
    hyper = [d - (gp - gm) / (2 * eps) for d, gp, gm in zip(direct, plus, minus)]
    return hyper, outer.detach()


def meta_summary(history: list[dict[str, float]]) -> dict[str, float | int | None]:
    """What a run's meta steps did, for ``results.json``: how many, the meta loss at the first
    and last of them (and the mean of the first and last tenth, less noisy), and the
    meta-gradient norm (median, and the share of steps where it was exactly zero: a meta module
    the meta objective does not reach)."""
    if not history:
        return {"steps": 0, "loss_first": None, "loss_last": None, "grad_norm_median": None, "zero_grad_share": None}
    losses = [h["loss"] for h in history]
    norms = sorted(h["grad_norm"] for h in history)
    tenth = max(1, len(history) // 10)
    return {
        "steps": len(history),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first_tenth": sum(losses[:tenth]) / tenth,
        "loss_last_tenth": sum(losses[-tenth:]) / tenth,
        "grad_norm_median": norms[len(norms) // 2],
        "grad_norm_max": norms[-1],
        "zero_grad_share": sum(n == 0.0 for n in norms) / len(norms),
    }
