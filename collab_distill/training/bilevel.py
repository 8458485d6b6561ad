"""The bilevel meta step: look ahead one step of every student on a training batch, score the
result on a held-out meta batch, and update only the meta modules (``meta.hypergradient``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from collab_distill.answers import AnswerSource, described, wrong_answer
from collab_distill.meta import BilevelConfig, hypergradient
from collab_distill.records import Knowledge, LossWeights
from collab_distill.task import ConfigError, Task
from collab_distill.training.forward import MemberForward
from collab_distill.training.state import CohortState
from collab_distill.wrapping import unwrap, unwrap_optimizer

if TYPE_CHECKING:
    from collab_distill.data import Cycle
    from collab_distill.engine_view import EngineView

__all__ = ["BilevelStep", "PLUGIN_PREFIX", "flush_meta_steps", "reduce_grads", "sync_buffers"]

#: lookahead parameters of plugin modules: ``"<prefix><module name>/<parameter name>"``
PLUGIN_PREFIX = "@plugin:"

#: ``cohort_loss(batch, records, teacher_records, phase=, signals=, weights_out=)`` -> (loss, logs)
LossFn = Callable[..., tuple[Tensor, dict[str, Any]]]


META_OBJECTIVE = "collab_distill_meta_objective"


class BilevelStep:
    """Computes and applies the meta modules' hypergradients. It also answers
    :meth:`student_module`, which inside the lookahead evaluates a plugin's module at its
    looked-ahead parameters."""

    def __init__(self, *, view: EngineView, task: Task, cohort: CohortState, config: BilevelConfig, hook: Any,
                 forward: MemberForward, loss: LossFn) -> None:
        self.view, self.task, self.cohort, self.config, self.hook = view, task, cohort, config, hook
        self.forward, self.loss = forward, loss
        self.meta_batches: Optional[Cycle] = None  # set when training is prepared
        # inside the lookahead: {student: {module name: looked-ahead parameters}}
        self._bound: Optional[dict[str, dict[str, dict[str, Tensor]]]] = None

    def due(self, epoch: int, batch_in_epoch: int, global_step: int) -> bool:
        """Whether this step runs a meta step (from counters and config only, so every DDP rank
        takes the same branch); the caller checks warm-up and that some meta module trains."""
        config = self.config
        if config.every_n_epochs is not None:
            if epoch % config.every_n_epochs != 0:
                return False
            if config.steps_in_meta_epoch == "every_n_steps":
                return batch_in_epoch % config.every_n_steps == 0
            return batch_in_epoch == 0
        return global_step % config.every_n_steps == 0

    def student_module(self, student: str, name: str) -> Any:
        """A module a plugin attached to ``student``, callable in the current phase."""
        try:
            module = self.cohort.plugin_modules[student][name]
        except KeyError:
            raise KeyError(
                f"no module {name!r} is attached to student {student!r}; return it from collab_distill_student_modules "
                f"(attached: {sorted(self.cohort.plugin_modules.get(student, {}))})"
            ) from None
        if self._bound is None:
            return module
        raw = unwrap(module)
        # cloned buffers: a BatchNorm in the module must not move its statistics in the lookahead
        state = {**{k: b.clone() for k, b in raw.named_buffers()}, **self._bound[student].get(name, {})}
        return lambda *args, **kwargs: functional_call(raw, state, args, kwargs, strict=False)

    def step(self, fabric: Any, step: int, batch: Any, teacher_records: Mapping[str, Knowledge],
             context: Any) -> tuple[dict[str, Tensor], Tensor]:
        """One meta update; returns what to log and ``[loss, grad norm]`` (still on the device)."""
        meta_params, grads, value = self.gradients(fabric, batch, teacher_records, context)
        for p, g in zip(meta_params, grads):
            p.grad = g.detach()
        reduce_grads(fabric, meta_params)
        # the norm before clipping tells users whether the meta objective reaches the modules at all
        grad_norm = torch.nn.utils.clip_grad_norm_(meta_params, self.config.grad_clip or float("inf")).detach()
        for optimizer in self.cohort.meta_optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync_buffers(fabric, self.cohort.synced_modules())
        self.hook.collab_distill_meta_step_end(engine=self.view, step=step, meta_loss=value, grad_norm=grad_norm)
        return {"meta/loss": value, "meta/grad_norm": grad_norm}, torch.stack([value.float(), grad_norm.float()])

    def gradients(self, fabric: Any, batch: Any, teacher_records: Mapping[str, Knowledge], context: Any,
                  meta_batch: Any = None) -> tuple[list[nn.Parameter], list[Tensor], Tensor]:
        """The meta modules' trainable parameters, their hypergradients on this training batch and
        a meta batch (the next one of the meta split unless given, already on the device), and the
        meta objective after the lookahead; nothing is updated."""
        if meta_batch is None:
            assert self.meta_batches is not None
            meta_batch = self.task.move_batch(next(self.meta_batches), fabric)
        cohort = self.cohort
        with torch.no_grad():
            meta_context = self.task.shared_context(meta_batch, cohort.teachers, cohort.students)
        raw = {name: unwrap(model) for name, model in cohort.students.items()}
        params = {name: {n: p for n, p in m.named_parameters() if p.requires_grad} for name, m in raw.items()}
        for name, extras in cohort.plugin_modules.items():  # looked ahead with their student
            for key, module in extras.items():
                own = unwrap(module).named_parameters()
                params[name].update({f"{PLUGIN_PREFIX}{key}/{n}": p for n, p in own if p.requires_grad})
        names = list(raw)

        def run(name: str, theta: Mapping[str, Tensor], data: Any, view: int, ctx: Any, phase: str) -> Knowledge:
            # clone buffers: BatchNorm statistics must not move twice for one real step
            state = {k: v for k, v in theta.items() if not k.startswith(PLUGIN_PREFIX)}
            state.update({k: b.clone() for k, b in raw[name].named_buffers()})
            with fabric.autocast():
                return self.forward(name, raw[name], data, view=view, context=ctx, phase=phase, state=state)

        # only the lookahead's loss is differentiated twice (the exact hypergradient)
        exact = self.task.twice_differentiable if self.config.hypergradient == "second_order" else nullcontext
        # what the weight and target hooks read at the unperturbed parameters (the first call): the
        # finite-difference calls at perturbed ones reuse it, so it stays the constant it is for
        # the exact hypergradient (detached inputs change with the parameters; their gradient is 0)
        signals: dict[str, Knowledge] = {}
        # the loss weights of that first call, with their graph: what the meta objective sees
        weights: dict[str, LossWeights] = {}

        def train_loss(theta: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
            with exact():
                records = {n: run(n, theta[n], batch, i, context, "lookahead") for i, n in enumerate(names)}
            self._bound = _bind(theta)
            try:
                loss = self.loss(batch, records, teacher_records, phase="lookahead", signals=signals or None,
                                 weights_out=None if signals else weights)[0]
                if not signals:
                    signals.update({n: r.detach() for n, r in records.items()})
                return loss
            finally:
                self._bound = None

        def meta_loss(theta: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
            records = {n: run(n, theta[n], meta_batch, 0, meta_context, "meta") for n in names}
            self._bound = _bind(theta)
            try:
                value = self.hook.collab_distill_meta_objective(engine=self.view, batch=meta_batch, records=records,
                                                                weights=weights)
            finally:
                self._bound = None
            if value is None:
                raise ConfigError("no plugin provides a meta objective")
            # under no_grad (a finite difference of the objective, say) no answer has a graph
            detached = isinstance(value, Tensor) and torch.is_grad_enabled() and not value.requires_grad
            if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point() or detached:
                what = described(value) + (" without a graph" if detached else "")
                kwargs = dict(engine=self.view, batch=meta_batch, records=records, weights=weights)
                raise wrong_answer(cast(AnswerSource, self.view), META_OBJECTIVE, kwargs, what,
                                   "a scalar (0-d) floating-point tensor computed from records or weights with their graph "
                                   "(not float(...), .item() or .detach()), so its gradient reaches the meta modules")
            return value

        meta_params = [p for m in cohort.meta_modules.values() for p in m.parameters() if p.requires_grad]
        optimizers = {n: unwrap_optimizer(o) for n, o in cohort.optimizers.items()}
        grads, value = hypergradient(
            params=params, meta_params=meta_params, train_loss=train_loss, meta_loss=meta_loss,
            optimizers=optimizers, config=self.config,
        )
        return meta_params, grads, value


def _bind(theta: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, dict[str, Tensor]]]:
    """``{student: {plugin module: {parameter: looked-ahead tensor}}}`` out of the flat lookahead."""
    bound: dict[str, dict[str, dict[str, Tensor]]] = {}
    for student, values in theta.items():
        for key, value in values.items():
            if key.startswith(PLUGIN_PREFIX):
                module, _, pname = key[len(PLUGIN_PREFIX):].partition("/")
                bound.setdefault(student, {}).setdefault(module, {})[pname] = value
    return bound


def reduce_grads(fabric: Any, params: list[nn.Parameter]) -> None:
    """Average the meta gradients across ranks (one flat all-reduce)."""
    if fabric.world_size == 1 or not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])  # type: ignore[union-attr]
    flat = cast(Tensor, fabric.all_reduce(flat, reduce_op="mean"))
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def sync_buffers(fabric: Any, modules: list[nn.Module]) -> None:
    """Average the floating buffers (BatchNorm statistics) of meta and plugin modules across
    ranks: each rank moves them with its own batches, and, unlike the students, no DDP forward in
    evaluation broadcasts them again."""
    if fabric.world_size == 1:
        return
    for module in modules:
        for b in module.buffers():
            if b.is_floating_point():
                b.copy_(cast(Tensor, fabric.all_reduce(b, reduce_op="mean")))


def flush_meta_steps(pending: list[tuple[int, Tensor]], history: list[dict[str, float]],
                     log: Callable[[Mapping[str, float], int], None]) -> None:
    """Move the ``(step, [loss, grad norm])`` of the meta steps still on the device to ``history``
    and the loggers, each logged at its step (one host transfer)."""
    if not pending:
        return
    for (step, _), (loss, norm) in zip(pending, torch.stack([v for _, v in pending]).cpu().tolist()):
        history.append({"step": step, "loss": loss, "grad_norm": norm})
        log({"train/meta/loss": loss, "train/meta/grad_norm": norm}, step)
    pending.clear()
