"""The cohort loss: every student's per-image mix of its terms, summed over students.

``L_s = mean_i [alpha_si * sup_si + beta_si * tau^2 * D(target_si, s_i) + gamma_si * tau^2 * D(consensus_si, s_i)]``
plus every plugin's auxiliary terms. Which weights, targets and consensus come from hooks; a
term whose weight is a constant zero for every student is not computed at all (with lazy
teacher records that also skips the teachers' forward pass).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from collab_distill.records import Knowledge, LossWeights, SoftTarget
from collab_distill.task import ConfigError

if TYPE_CHECKING:
    from collab_distill.engine import Engine

__all__ = ["cohort_loss", "untrained_leaves"]


def _provided_weights(engine: Engine, batch: Any, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge],
                      phase: str) -> dict[str, LossWeights]:
    first = next(iter(records.values()))
    supervised_only = LossWeights.constant_weights(first.num_images, 1.0, 0.0, 0.0, first.logits.device)
    warming = {s for s in records if engine.warming_up(s)}
    if len(warming) == len(records):
        return {s: supervised_only for s in records}
    # weights from a meta module keep their graph only in the lookahead
    with torch.set_grad_enabled(phase != "train" and torch.is_grad_enabled()):
        provided = engine.hook.collab_distill_loss_weights(
            engine=engine, batch=batch, records=records, teacher_records=teacher_records, phase=phase
        )
    if provided is None:
        raise ConfigError("no plugin provides loss weights (the built-in `defaults` plugin is disabled?)")
    missing = set(records) - set(provided)
    if missing:
        raise ConfigError(f"the loss-weight provider returned no weights for student(s) {sorted(missing)}")
    return {s: supervised_only if s in warming else provided[s] for s in records}


def cohort_loss(
    engine: Engine,
    batch: Any,
    records: Mapping[str, Knowledge],
    teacher_records: Mapping[str, Knowledge],
    phase: str = "train",
    detailed: bool = True,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """The total loss and, for logging, ``loss``, ``<student>/loss`` and (when ``detailed``) every
    student's terms and mean weights, detached."""
    tau = engine.trainer.temperature
    weights = _provided_weights(engine, batch, records, teacher_records, phase)
    kwargs = dict(engine=engine, batch=batch, records=records, teacher_records=teacher_records, temperature=tau)
    targets: Mapping[str, SoftTarget] = {}
    consensus: Mapping[str, SoftTarget] = {}
    if any(w.uses("distill") for w in weights.values()):
        targets = engine.hook.collab_distill_soft_targets(**kwargs) or {}
    if any(w.uses("consensus") for w in weights.values()):
        consensus = engine.hook.collab_distill_consensus_targets(**kwargs) or {}
    total: Tensor | float = 0.0
    logs: dict[str, Tensor | float] = {}
    for name, rec in records.items():
        w = weights[name]
        alpha, beta, gamma = w.constant if w.constant is not None else (w.alpha, w.beta, w.gamma)
        per_image = alpha * rec.supervised_loss
        if detailed:
            logs[f"{name}/supervised"] = rec.supervised_loss.detach().mean()
        for term, target, mix in (("distill", targets.get(name), beta), ("consensus", consensus.get(name), gamma)):
            if target is None or not w.uses(term):
                continue
            kl = rec.per_image(target.kl_per_unit(rec.logits, tau))
            per_image = per_image + mix * (tau * tau) * kl
            if detailed:
                logs[f"{name}/{term}"] = kl.detach().mean()
        student_loss = per_image.mean()
        logs[f"{name}/loss"] = student_loss.detach()
        if detailed:
            for key, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
                logs[f"{name}/{key}"] = value if isinstance(value, float) else value.detach().float().mean()
        total = total + student_loss
    extra = engine.hook.collab_distill_auxiliary_losses(
        engine=engine, batch=batch, records=records, teacher_records=teacher_records, weights=weights, phase=phase,
    )
    for group in extra:
        for key, value in (group or {}).items():
            total = total + value
            logs[key] = value.detach()
    assert isinstance(total, Tensor)
    logs["loss"] = total.detach()
    return total, logs


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
