"""KDCL (Guo et al., CVPR 2020): students without a teacher learn from an ensemble of themselves.

Every student gets the *same* soft target, built from all students' detached logits; with
``FixedLossWeights(alpha=1, beta=0, gamma=lambda)`` and the engine's temperature tau a student's
loss is the paper's ``CE + lambda * tau^2 * KL(target || student)`` (eq. 2; the paper's CIFAR
setup is tau = 2, lambda = 1). The four ways of building the target (Section 3.2):

* ``naive`` (eq. 4): per image, the logits of the student with the lowest cross-entropy;
* ``linear`` (eq. 5): the convex combination ``alpha^T Z`` of the students' logits with the lowest
  cross-entropy on the batch, solved every step (projected gradient descent on the simplex,
  started at the best single student, so it is never worse than any student);
* ``minlogit`` (eq. 6-7): subtract each student's target-class logit, take the smallest value of
  every class over the students (the target class ends at exactly 0);
* ``general`` (eq. 8-11): a weighted average of the students' distributions, with weights
  ``w = C^-1 1 / (1^T C^-1 1)`` from the matrix ``C_ij = mean_x (f_i(x) - 1)(f_j(x) - 1)`` of the
  students' errors on the true class, measured on the held-out meta split after every epoch
  (equal weights before the first measurement).

Invariant collaborative learning (each student sees its own augmented view of the same images and
the ensemble fuses the views) needs no code here: set the data's ``views`` to the number of
students (``examples/methods/kdcl_views.yaml``); the engine feeds view ``i`` to student ``i``.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from collab_distill.hookspecs import hookimpl
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, SoftTarget
from collab_distill.task import ConfigError

__all__ = [
    "KDCL",
    "naive_logits",
    "linear_weights",
    "minlogit_logits",
    "general_weights",
    "project_to_simplex",
]

Variant = Literal["naive", "linear", "minlogit", "general"]


# ---------------------------------------------------------------------------- the four rules
# Each takes the students' logits stacked as ``[S, U, K]`` and the labels ``[U]`` (units without a
# label, ``-1``, are ignored where labels are needed).


def naive_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 4: for every unit, the logits of the student with the lowest cross-entropy, ``[U, K]``."""
    num_students, units, _ = logits.shape
    labels = labels.clamp_min(0)  # units without a label: any student's CE; they take student 0's
    ce = torch.stack([F.cross_entropy(z, labels, reduction="none") for z in logits])  # [S, U]
    best = ce.argmin(dim=0)
    return logits[best, torch.arange(units, device=logits.device)]


def minlogit_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 6-7: ``min_i (z_i - z_i[y])`` per class; the target class is exactly 0, ``[U, K]``."""
    idx = labels.clamp_min(0)[None, :, None].expand(logits.shape[0], -1, 1)
    shifted = logits - logits.gather(2, idx)
    return shifted.min(dim=0).values


def project_to_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection of ``v`` ``[..., m]`` onto ``{w >= 0, sum w = 1}`` along the last
    dimension (sort-based; no host synchronisation)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = (u - css / k > 0).sum(-1, keepdim=True) - 1  # the condition holds on a prefix
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


#: the line search's trial distances (in weight space) along the projected negative gradient
_TRIAL_STEPS = 2.0 ** torch.arange(1.0, -15.0, -1.0)


def _mean_ce(weights: Tensor, logits: Tensor, onehot: Tensor, mask: Tensor) -> Tensor:
    """Mean CE over the labelled units of ``sum_s w_s z_s`` for ``[J, S]`` weights at once, ``[J]``."""
    log_p = F.log_softmax(torch.einsum("js,suk->juk", weights, logits), dim=-1)
    return -(log_p * onehot).sum(-1).mul(mask).sum(-1) / mask.sum().clamp_min(1)


def linear_weights(logits: Tensor, labels: Tensor, iterations: int = 30) -> Tensor:
    """Eq. 5: ``argmin_{w in simplex} CE(sum_i w_i z_i, y)`` over the batch, ``[S]``.

    The problem is convex in ``w``. Projected gradient descent started at the best single
    student (a vertex of the simplex); each iteration tries 16 step lengths along the projected
    negative gradient at once and keeps the best point, the current one included, so the loss
    never rises and the result is never worse than any one student. Everything stays on the
    device: no host synchronisation in the training step.
    """
    logits = logits.detach().float()
    num_students = logits.shape[0]
    mask = (labels >= 0).to(logits.dtype)
    onehot = F.one_hot(labels.clamp_min(0), logits.shape[-1]).to(logits.dtype)
    vertices = torch.eye(num_students, device=logits.device)
    w = vertices[_mean_ce(vertices, logits, onehot, mask).argmin()]
    steps = _TRIAL_STEPS.to(logits.device)[:, None]
    for _ in range(iterations):
        probs = F.softmax(torch.einsum("s,suk->uk", w, logits), dim=-1)
        grad = torch.einsum("uk,suk->s", (probs - onehot) * mask[:, None], logits) / mask.sum().clamp_min(1)
        direction = grad / grad.norm().clamp_min(1e-12)
        candidates = torch.cat([w[None], project_to_simplex(w[None] - steps * direction[None])])
        w = candidates[_mean_ce(candidates, logits, onehot, mask).argmin()]
    return w


def general_weights(errors: Tensor, nonnegative: bool = True) -> Tensor:
    """Eq. 11: ``w = C^-1 1 / (1^T C^-1 1)`` for the error matrix ``C`` ``[S, S]`` of eq. 10.

    Eq. 11 is the Lagrange solution of ``min w^T C w`` s.t. ``sum w = 1``; it can give negative
    weights, which the paper's constraint ``w_i in [0, 1]`` excludes. With ``nonnegative`` (the
    default) such a solution is replaced by the minimiser of ``w^T C w`` on the simplex
    (projected gradient descent); without it eq. 11 is returned as is. A singular ``C`` (two
    students with identical errors) uses the pseudo-inverse.
    """
    c = errors.double()
    ones = torch.ones(c.shape[0], dtype=c.dtype, device=c.device)
    inv_row_sums = torch.linalg.pinv(c) @ ones
    w = inv_row_sums / inv_row_sums.sum()
    if not nonnegative or bool((w >= 0).all()):
        return w.to(errors.dtype)
    w = project_to_simplex(w.clamp_min(0))
    step = 0.5 / max(float(torch.linalg.matrix_norm(c, ord=2)), 1e-12)  # 1 / Lipschitz of 2Cw
    for _ in range(500):
        w = project_to_simplex(w - step * 2 * (c @ w))
    return w.to(errors.dtype)


def error_matrix(true_class_probs: Tensor) -> Tensor:
    """Eq. 10 with ``t = 1``: ``C_ij = mean_x (f_i(x) - 1)(f_j(x) - 1)`` from ``[S, N]`` probabilities."""
    e = true_class_probs.double() - 1.0
    return e @ e.T / max(e.shape[1], 1)


# ---------------------------------------------------------------------------- the plugin


class KDCL(Plugin):
    """The students' ensemble as every student's consensus (gamma) target.

    Args:
        variant: ``naive``, ``linear``, ``minlogit`` or ``general`` (see the module docstring).
        linear_iterations: projected-gradient iterations of the ``linear`` solve per step.
        nonnegative: ``general`` only; keep the weights on the simplex when eq. 11 gives a
            negative one (see :func:`general_weights`).
        measure_batch_size: ``general`` only; batch size of the per-epoch pass over the meta split.
    """

    def __init__(
        self,
        variant: Variant = "minlogit",
        linear_iterations: int = 30,
        nonnegative: bool = True,
        measure_batch_size: int = 256,
    ) -> None:
        if variant not in ("naive", "linear", "minlogit", "general"):
            raise ConfigError(f"KDCL.variant={variant!r}: choose naive, linear, minlogit or general")
        if linear_iterations < 1:
            raise ConfigError(f"KDCL.linear_iterations={linear_iterations} must be >= 1")
        self.variant = variant
        self.linear_iterations = linear_iterations
        self.nonnegative = nonnegative
        self.measure_batch_size = measure_batch_size
        #: ``general``: the current ensemble weights per student (equal until the first epoch ends)
        self.weights: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"KDCL(variant={self.variant!r})"

    @hookimpl
    def collab_distill_configure(self, engine: Any) -> None:
        students = list(engine.cohort.students)
        if len(students) < 2:
            raise ConfigError("KDCL needs at least two students: the target is their ensemble")
        if not self.weights:
            self.weights = {s: 1.0 / len(students) for s in students}

    @hookimpl
    def collab_distill_consensus_targets(
        self, records: Mapping[str, Knowledge], temperature: float
    ) -> dict[str, SoftTarget]:
        names = list(records)
        logits = torch.stack([records[n].logits.detach().float() for n in names])
        labels = records[names[0]].unit_labels
        if self.variant == "general":
            w = torch.tensor([self.weights[n] for n in names], device=logits.device, dtype=logits.dtype)
            probs = torch.einsum("s,suk->uk", w, F.softmax(logits / temperature, dim=-1))
            target = SoftTarget(probs=probs)
        else:
            if self.variant == "naive":
                fused = naive_logits(logits, labels)
            elif self.variant == "minlogit":
                fused = minlogit_logits(logits, labels)
            else:
                w = linear_weights(logits, labels, self.linear_iterations)
                fused = torch.einsum("s,suk->uk", w, logits)
            target = SoftTarget.from_logits(fused, temperature)
            if not records[names[0]].units_are_images and self.variant != "linear":
                # naive/minlogit need the true class; units without one (detection regions
                # matching no object) get no consensus term rather than an arbitrary target
                target.weight = (labels >= 0).to(logits.dtype)
        return {name: target for name in names}

    # ------------------------------------------------------------ general: eq. 10-11 per epoch

    @hookimpl
    def collab_distill_epoch_end(self, engine: Any, epoch: int) -> None:
        if self.variant != "general":
            return
        names = list(engine.students)
        errors = error_matrix(self._true_class_probs(engine, names))
        if engine.fabric.world_size > 1:
            # every rank measured its shard: combine sums, not means
            count = torch.tensor([float(self._measured)], device=errors.device, dtype=errors.dtype)
            errors = engine.fabric.all_reduce(errors * count, reduce_op="sum")
            count = engine.fabric.all_reduce(count, reduce_op="sum")
            errors = errors / count.clamp_min(1)
        w = general_weights(errors, self.nonnegative)
        self.weights = dict(zip(names, w.tolist()))
        engine.fabric.log_dict({f"kdcl/weight/{n}": v for n, v in self.weights.items()}, step=engine.global_step)

    @torch.no_grad()
    def _true_class_probs(self, engine: Any, names: list[str]) -> Tensor:
        """``[S, N]``: each student's probability of the true class on this rank's meta shard."""
        dataset = engine.task.dataset("meta")
        rank, world = engine.fabric.global_rank, engine.fabric.world_size
        shard = Subset(dataset, list(range(rank, len(dataset), world)))
        loader = DataLoader(shard, batch_size=self.measure_batch_size, collate_fn=engine.task.collate)
        modes = {n: engine.students[n].training for n in names}
        for n in names:
            engine.students[n].eval()
        columns: list[Tensor] = []
        try:
            for batch in loader:
                batch = engine.task.move_batch(batch, engine.fabric)
                rows = []
                for n in names:
                    with engine.fabric.autocast():
                        rec = engine.task.knowledge(engine.students[n], batch)
                    keep = rec.unit_labels >= 0
                    probs = F.softmax(rec.logits.float()[keep], dim=-1)
                    rows.append(probs.gather(1, rec.unit_labels[keep, None]).squeeze(1))
                columns.append(torch.stack(rows))
        finally:
            for n in names:
                engine.students[n].train(modes[n])
        probs = torch.cat(columns, dim=1) if columns else torch.zeros(len(names), 0)
        self._measured = probs.shape[1]
        return probs

    @hookimpl
    def collab_distill_save_state(self, state: dict[str, Any]) -> None:
        if self.variant == "general":
            state["kdcl"] = {"weights": dict(self.weights)}

    @hookimpl
    def collab_distill_load_state(self, state: Mapping[str, Any]) -> None:
        if self.variant == "general" and "kdcl" in state:
            self.weights = dict(state["kdcl"]["weights"])
