"""KDCL (Guo et al., CVPR 2020): students without a teacher learn from an ensemble of themselves.

Every student gets the *same* soft target, built from all students' detached logits; with
``FixedLossWeights(alpha=1, beta=0, gamma=lambda)`` and the engine's temperature tau a student's
loss is the paper's ``CE + lambda * tau^2 * KL(target || student)`` (eq. 2; the paper's CIFAR
setup is tau = 2, lambda = 1). The four ways of building the target (Section 3.2):

* ``naive`` (eq. 4): per image, the logits of the student with the lowest cross-entropy;
* ``linear`` (eq. 5): per image, the convex combination ``alpha^T Z`` of the students' logits
  (``Z`` is that image's ``m x K`` logit matrix) with the lowest cross-entropy, solved at every
  step for all images at once (projected gradient descent on the simplex, started at the image's
  best single student, so it is never worse than any student on any image). ``linear_scope:
  batch`` solves one weight vector for the whole batch instead (this project's earlier default,
  not the paper's);
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

from collections.abc import Mapping, Sized
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from collab_distill.engine_view import EngineView
from collab_distill.hookspecs import hookimpl
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, SoftTarget
from collab_distill.task import ConfigError

__all__ = [
    "KDCL",
    "naive_logits",
    "linear_weights",
    "linear_weights_per_image",
    "minlogit_logits",
    "general_weights",
    "project_to_simplex",
]

Variant = Literal["naive", "linear", "minlogit", "general"]
LinearScope = Literal["image", "batch"]


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


#: the line search's trial distances (in weight space) along the projected negative gradient:
#: ``2 ** e`` for these exponents (16 lengths, 2 down to 2^-14; built on the device, no copy)
_TRIAL_EXPONENTS = (1.0, -15.0, -1.0)


def _simplex_line_search(w: Tensor, losses: Any, gradient: Any, iterations: int) -> Tensor:
    """Projected gradient descent for ``P`` independent problems on the simplex at once.

    ``w`` ``[P, S]`` holds each problem's starting point, ``losses(candidates [J, P, S]) -> [J, P]``
    each problem's loss at ``J`` points, ``gradient(w [P, S]) -> [P, S]`` its gradient. Every
    iteration moves each problem along its own negative gradient (its component within the
    simplex's plane, normalised) by 16 trial distances (``_TRIAL_EXPONENTS``) at once, projects
    the trial points onto the simplex and keeps, per problem, the best of them and the current
    point (the current point wins ties): every problem's loss is monotone non-increasing, and
    everything stays on the device (no host synchronisation).
    """
    steps = torch.exp2(torch.arange(*_TRIAL_EXPONENTS, device=w.device, dtype=w.dtype))[:, None, None]
    for _ in range(iterations):
        grad = gradient(w)
        grad = grad - grad.mean(dim=-1, keepdim=True)  # a shift along (1, ..., 1) leaves the projection unchanged
        direction = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        candidates = torch.cat([w[None], project_to_simplex(w[None] - steps * direction[None])])  # [J, P, S]
        best = losses(candidates).argmin(dim=0)  # [P]; the first index (the current point) on ties
        w = candidates.gather(0, best[None, :, None].expand(1, *w.shape)).squeeze(0)
    return w


def _targets(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """One-hot labels ``[U, K]`` and the mask of labelled units ``[U]``, in the logits' dtype."""
    mask = (labels >= 0).to(logits.dtype)
    onehot = F.one_hot(labels.clamp_min(0), logits.shape[-1]).to(logits.dtype)
    return onehot, mask


def linear_weights(logits: Tensor, labels: Tensor, iterations: int = 30) -> Tensor:
    """Eq. 5 with one weight vector for the whole batch: ``argmin_{w in simplex}`` of the mean CE
    over the labelled units of ``sum_i w_i z_i``, ``[S]`` (``linear_scope: batch``; this project's
    earlier default, not the paper's, whose combination is per image: :func:`linear_weights_per_image`).

    The problem is convex in ``w``. Projected gradient descent started at the best single
    student (a vertex of the simplex) with a batched monotone line search
    (:func:`_simplex_line_search`), so the result is never worse than any one student on the
    batch. No host synchronisation.
    """
    logits = logits.detach().float()
    onehot, mask = _targets(logits, labels)
    count = mask.sum().clamp_min(1)

    def losses(weights: Tensor) -> Tensor:  # [J, 1, S] -> [J, 1]
        log_p = F.log_softmax(torch.einsum("jps,suk->juk", weights, logits), dim=-1)
        return (-(log_p * onehot).sum(-1).mul(mask).sum(-1) / count)[:, None]

    def gradient(w: Tensor) -> Tensor:  # [1, S]
        probs = F.softmax(torch.einsum("ps,suk->uk", w, logits), dim=-1)
        return torch.einsum("uk,suk->s", (probs - onehot) * mask[:, None], logits)[None] / count

    num_students = logits.shape[0]
    vertices = torch.eye(num_students, device=logits.device, dtype=logits.dtype)
    w = F.one_hot(losses(vertices[:, None]).reshape(1, -1).argmin(dim=1), num_students).to(logits.dtype)  # [1, S]
    return _simplex_line_search(w, losses, gradient, iterations).squeeze(0)


def linear_weights_per_image(logits: Tensor, labels: Tensor, iterations: int = 30) -> Tensor:
    """Eq. 5 as the paper states it, per image: for every unit ``u``, the weights ``w_u`` on the
    simplex minimising ``CE(sum_i w_ui z_i[u], y_u)``, ``[U, S]``.

    Each unit's problem is convex; all of them are solved at once on the device: projected
    gradient descent started at each unit's best single student, with a per-unit monotone line
    search over 16 step lengths (:func:`_simplex_line_search`), so every unit's combination is
    never worse than its best single student. No Python loop over units, no host synchronisation.
    Units without a label (``-1``) have no objective and keep equal weights.
    """
    logits = logits.detach().float()
    num_students, units, _ = logits.shape
    onehot, mask = _targets(logits, labels)
    y = labels.clamp_min(0)

    def losses(weights: Tensor) -> Tensor:  # [J, U, S] -> [J, U]
        log_p = F.log_softmax(torch.einsum("jus,suk->juk", weights, logits), dim=-1)
        return -log_p.gather(-1, y[None, :, None].expand(weights.shape[0], -1, 1)).squeeze(-1) * mask

    def gradient(w: Tensor) -> Tensor:  # [U, S]
        probs = F.softmax(torch.einsum("us,suk->uk", w, logits), dim=-1)
        return torch.einsum("uk,suk->us", (probs - onehot) * mask[:, None], logits)

    ce = -F.log_softmax(logits, dim=-1).gather(-1, y[None, :, None].expand(num_students, -1, 1)).squeeze(-1)  # [S, U]
    w = F.one_hot(ce.argmin(dim=0), num_students).to(logits.dtype)  # each unit's best student
    w = torch.where(mask[:, None] > 0, w, torch.full_like(w, 1.0 / num_students))
    return _simplex_line_search(w, losses, gradient, iterations)


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
        linear_scope: ``linear`` only; ``image`` (default, the paper's eq. 5): one convex
            combination per image (per distillation unit: a region for detection), solved for all
            images at once; ``batch``: one weight vector per batch (this project's earlier
            default, not the paper's).
        linear_iterations: projected-gradient iterations of the ``linear`` solve per step.
        nonnegative: ``general`` only; keep the weights on the simplex when eq. 11 gives a
            negative one (see :func:`general_weights`).
        measure_batch_size: ``general`` only; batch size of the per-epoch pass over the meta split.
    """

    def __init__(
        self,
        variant: Variant = "minlogit",
        linear_scope: LinearScope = "image",
        linear_iterations: int = 30,
        nonnegative: bool = True,
        measure_batch_size: int = 256,
    ) -> None:
        if variant not in ("naive", "linear", "minlogit", "general"):
            raise ConfigError(f"KDCL.variant={variant!r}: choose naive, linear, minlogit or general")
        if linear_scope not in ("image", "batch"):
            raise ConfigError(f"KDCL.linear_scope={linear_scope!r}: choose image (the paper's, per image) or batch")
        if linear_iterations < 1:
            raise ConfigError(f"KDCL.linear_iterations={linear_iterations} must be >= 1")
        self.variant = variant
        self.linear_scope = linear_scope
        self.linear_iterations = linear_iterations
        self.nonnegative = nonnegative
        self.measure_batch_size = measure_batch_size
        #: ``general``: the current ensemble weights per student (equal until the first epoch ends)
        self.weights: dict[str, float] = {}

    def __repr__(self) -> str:
        if self.variant == "linear":
            return f"KDCL(variant='linear', linear_scope={self.linear_scope!r})"
        return f"KDCL(variant={self.variant!r})"

    @hookimpl
    def collab_distill_configure(self, engine: EngineView) -> None:
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
            elif self.linear_scope == "batch":
                w = linear_weights(logits, labels, self.linear_iterations)
                fused = torch.einsum("s,suk->uk", w, logits)
            else:
                w = linear_weights_per_image(logits, labels, self.linear_iterations)
                fused = torch.einsum("us,suk->uk", w, logits)
            target = SoftTarget.from_logits(fused, temperature)
            if not records[names[0]].units_are_images and (self.variant != "linear" or self.linear_scope == "image"):
                # naive/minlogit/per-image linear need the true class; units without one (detection
                # regions matching no object) get no consensus term rather than an arbitrary target
                target.weight = (labels >= 0).to(logits.dtype)
        return {name: target for name in names}

    # ------------------------------------------------------------ general: eq. 10-11 per epoch

    @hookimpl
    def collab_distill_epoch_end(self, engine: EngineView, epoch: int) -> None:
        if self.variant != "general":
            return
        names = list(engine.students)
        errors = error_matrix(self._true_class_probs(engine, names))
        assert engine.fabric is not None  # set before configure
        if engine.fabric.world_size > 1:
            # every rank measured its shard: combine sums, not means
            count = torch.tensor([float(self._measured)], device=errors.device, dtype=errors.dtype)
            errors = cast(Tensor, engine.fabric.all_reduce(errors * count, reduce_op="sum"))
            count = cast(Tensor, engine.fabric.all_reduce(count, reduce_op="sum"))
            errors = errors / count.clamp_min(1)
        w = general_weights(errors, self.nonnegative)
        self.weights = dict(zip(names, w.tolist()))
        engine.log_dict({f"kdcl/weight/{n}": v for n, v in self.weights.items()}, step=engine.global_step)

    @torch.no_grad()
    def _true_class_probs(self, engine: EngineView, names: list[str]) -> Tensor:
        """``[S, N]``: each student's probability of the true class on this rank's meta shard."""
        dataset = engine.task.dataset("meta")
        fabric = engine.fabric
        assert fabric is not None  # set before configure
        rank, world = fabric.global_rank, fabric.world_size
        # a map-style data set: Dataset's stubs lack __len__
        shard = Subset(dataset, list(range(rank, len(cast(Sized, dataset)), world)))
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
                    with fabric.autocast():
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
