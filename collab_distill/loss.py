"""The cohort loss: every student's per-image mix of its terms, summed over students.

``L_s = mean_i [alpha_si * sup_si + beta_si * tau^2 * D(target_si, s_i) + gamma_si * tau^2 * D(consensus_si, s_i)]``
plus every plugin's auxiliary terms (a term named ``<student>/<name>`` is that student's). Which
weights, targets and consensus come from hooks; a term whose weight is a constant zero for every
student is not computed at all (with lazy teacher records that also skips the teachers' forward
pass). ``D`` of an image is the mean over its units (regions in detection); per-region weights
(``LossWeights.unit_beta`` / ``unit_gamma``) scale each unit's term before that mean.

Logged on one scale, each term as it enters the loss: ``<s>/supervised`` is
``mean_i alpha_si * sup_si``, ``<s>/distill`` and ``<s>/consensus`` the weighted, tau^2-scaled
terms, auxiliary terms as the plugin returned them; ``<s>/loss`` is their sum, everything student
``s`` optimises, and ``loss`` the sum over students plus any auxiliary term of no student.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sized
from typing import TYPE_CHECKING, Any, Optional, Protocol, cast

import torch
from torch import Tensor, nn

from collab_distill.engine_view import EngineView
from collab_distill.plugin_manager import PluginError
from collab_distill.records import Knowledge, LossWeights, SoftTarget
from collab_distill.task import ConfigError

if TYPE_CHECKING:
    from pluggy import HookImpl

__all__ = ["cohort_loss", "untrained_leaves", "check_loss_weight_providers"]


_HOOK = "collab_distill_loss_weights"


class Engine(EngineView, Protocol):
    """What the cohort loss uses of the engine: the plugins' view, its plugin manager and hooks."""

    pm: Any
    hook: Any

    @property
    def loss_terms(self) -> list[str]: ...
    flags: Any  # ``flags.providers_checked``: the conflict check ran on a real training step


class _ProviderConflict(ConfigError):
    """Two plugins answer ``collab_distill_loss_weights`` for the same student."""


def _weight_providers(engine: Engine) -> Optional[list[HookImpl]]:
    """The implementations of ``collab_distill_loss_weights`` in the order pluggy calls them
    (wrappers left out), when two or more of them are not fallbacks (``trylast``, like the
    built-in defaults); otherwise ``None`` (one provider: nothing can conflict)."""
    impls = [i for i in reversed(engine.pm.hook.collab_distill_loss_weights.get_hookimpls()) if not (i.hookwrapper or i.wrapper)]
    return impls if sum(not i.trylast for i in impls) >= 2 else None


def _only_answer(engine: Engine, impls: list[HookImpl], kwargs: Mapping[str, Any]) -> Optional[Mapping[str, LossWeights]]:
    """What the firstresult hook returns (the first answer that is not None), having asked every
    provider that is not a fallback: two answers for the same student are a :class:`ConfigError`
    naming both plugins, since pluggy would silently use the first and never ask the second.

    Each provider is asked through a hook caller without the others (pluggy's
    ``subset_hook_caller``), so wrappers, tracing and call monitoring still see the call; an
    exception inside it is a :class:`PluginError` naming the plugin, as through ``engine.hook``."""
    first: Optional[Mapping[str, LossWeights]] = None
    first_name = ""
    for impl in impls:
        if first is not None and impl.trylast:
            continue  # a fallback answers only when nobody else did
        others = [i.plugin for i in impls if i.plugin is not impl.plugin]
        ask = engine.pm.subset_hook_caller(_HOOK, remove_plugins=others)
        try:
            answer = cast(Optional[Mapping[str, LossWeights]], ask(**kwargs))
        except (ConfigError, PluginError):
            raise
        except Exception as err:  # named like engine.hook names it (this call bypasses engine.hook)
            message = f"plugin {impl.plugin_name!r} failed in hook {_HOOK}: {type(err).__name__}: {err}"
            raise PluginError(message, impl.plugin_name, _HOOK) from err
        if answer is None:
            continue
        if first is None:
            first, first_name = answer, impl.plugin_name
            continue
        both = sorted(set(first) & set(answer))
        if both:
            raise _ProviderConflict(
                f"plugins {first_name} and {impl.plugin_name} both provide loss weights (collab_distill_loss_weights) "
                f"for student(s) {both}; the first answer would be used and the other silently ignored. "
                "Keep one of them under `plugins:`."
            )
    return first


def check_loss_weight_providers(engine: Engine) -> None:
    """At set-up, ask every loss-weight provider once (on two validation images, no grad, every
    member in eval mode, the RNG untouched), so that two plugins answering for the same student
    stop the run before anything is written or trained. A provider that cannot answer before
    training is prepared (one that reads a meta module, say) is checked at the first training
    step instead: :func:`_provided_weights` asks every provider there."""
    impls = _weight_providers(engine)
    if impls is None:
        return
    members = {**engine.teachers, **engine.students}
    modes = {m: m.training for model in members.values() for m in model.modules()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for model in members.values():
                model.eval()
            dataset = engine.task.dataset("val")
            batch = engine.task.collate([dataset[i] for i in range(min(2, len(cast(Sized, dataset))))])
            context = engine.task.shared_context(batch, engine.teachers, engine.students)
            records = {s: engine.task.knowledge(m, batch, view=0, context=context) for s, m in engine.students.items()}
            teacher_records = engine.teacher_records(batch, context)
            _only_answer(engine, impls, dict(engine=engine, batch=batch, records=records, teacher_records=teacher_records,
                                             phase="train"))
    except PluginError:
        # a provider that cannot answer before training is prepared (it reads a meta module's
        # placed copy, say): the first training step asks every provider again, where the same
        # exception stops the run naming the plugin
        pass
    finally:
        for m, training in modes.items():
            m.training = training


def _provided_weights(engine: Engine, batch: Any, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge],
                      phase: str) -> dict[str, LossWeights]:
    first = next(iter(records.values()))
    supervised_only = LossWeights.constant_weights(first.num_images, 1.0, 0.0, 0.0, first.logits.device)
    warming = {s for s in records if engine.warming_up(s)}
    if len(warming) == len(records):
        return {s: supervised_only for s in records}
    # weights from a meta module keep their graph only in the lookahead
    with torch.set_grad_enabled(phase != "train" and torch.is_grad_enabled()):
        kwargs = dict(engine=engine, batch=batch, records=records, teacher_records=teacher_records, phase=phase)
        # two providers: ask each of them (not only the first that answers) to find a conflict, on
        # the first training step only (later steps ask pluggy's first answer, as without a check)
        impls = None if engine.flags.providers_checked else _weight_providers(engine)
        provided = engine.hook.collab_distill_loss_weights(**kwargs) if impls is None else _only_answer(engine, impls, kwargs)
        if impls is not None and phase == "train":
            engine.flags.providers_checked = True
    if provided is None:
        raise ConfigError("no plugin provides loss weights (the built-in `defaults` plugin is disabled?)")
    missing = set(records) - set(provided)
    if missing:
        raise ConfigError(f"the loss-weight provider returned no weights for student(s) {sorted(missing)}")
    for student in records:
        unknown = set(getattr(provided[student], "terms", {})) - set(engine.loss_terms)
        if unknown:
            raise ConfigError(f"the loss-weight provider weighs term(s) {sorted(unknown)} of {student!r}, which no plugin "
                              f"declares (declared: {sorted(engine.loss_terms)}); see collab_distill_declare_loss_terms")
    return {s: supervised_only if s in warming else provided[s] for s in records}


def cohort_loss(
    engine: Engine,
    batch: Any,
    records: Mapping[str, Knowledge],
    teacher_records: Mapping[str, Knowledge],
    phase: str = "train",
    detailed: bool = True,
    signals: Optional[Mapping[str, Knowledge]] = None,
    weights_out: Optional[dict[str, LossWeights]] = None,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """The total loss and, for logging, ``loss``, ``<student>/loss`` and (when ``detailed``) every
    student's terms and mean weights, detached.

    ``signals``: the students' records that the loss-weight, soft-target and consensus hooks read
    (default: ``records``). The finite-difference meta step evaluates the loss at perturbed
    parameters but must keep what those hooks read (detached inputs of a C-Net, a consensus of the
    students) at the unperturbed ones, as the exact hypergradient treats them: constants.

    ``weights_out``: a dict that receives ``{student: LossWeights}`` as this loss used them (a
    student in warm-up: the supervised-only weights), with their graph where they have one; the
    bilevel step hands the lookahead's to ``collab_distill_meta_objective``.
    """
    tau = engine.trainer.temperature
    signals = records if signals is None else signals
    weights = _provided_weights(engine, batch, signals, teacher_records, phase)
    if weights_out is not None:
        weights_out.update(weights)
    kwargs = dict(engine=engine, batch=batch, records=signals, teacher_records=teacher_records, temperature=tau)
    targets: Mapping[str, SoftTarget] = {}
    consensus: Mapping[str, SoftTarget] = {}
    if any(w.uses("distill") for w in weights.values()):
        targets = engine.hook.collab_distill_soft_targets(**kwargs) or {}
    if any(w.uses("consensus") for w in weights.values()):
        consensus = engine.hook.collab_distill_consensus_targets(**kwargs) or {}
    named = _named_terms(engine, batch, records, teacher_records, weights, tau, phase)
    logs: dict[str, Tensor | float] = {}
    per_student: dict[str, Tensor] = {}
    for name, rec in records.items():
        w = weights[name]
        alpha, beta, gamma = w.factors()
        supervised = alpha * rec.supervised_loss
        per_image = supervised
        if detailed:
            logs[f"{name}/supervised"] = supervised.detach().mean()
        for term, target, mix, spread in (("distill", targets.get(name), beta, w.unit_beta),
                                          ("consensus", consensus.get(name), gamma, w.unit_gamma)):
            if target is None or not w.uses(term):
                continue
            kl = target.kl_per_unit(rec.logits, tau)
            # per-region weights: a factor per unit, spreading the image's weight over its regions
            weighted = mix * (tau * tau) * rec.per_image(kl if spread is None else kl * spread)
            per_image = per_image + weighted
            if detailed:
                logs[f"{name}/{term}"] = weighted.detach().mean()
        for term, values in named.get(name, {}).items():
            weighted = w.term_weight(term) * values
            per_image = per_image + weighted
            if detailed:
                logs[f"{name}/{term}"] = weighted.detach().mean()
        per_student[name] = per_image.mean()
        if detailed:
            for key, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
                logs[f"{name}/{key}"] = value.detach().float().mean() if isinstance(value, Tensor) else value
    extra = engine.hook.collab_distill_auxiliary_losses(
        engine=engine, batch=batch, records=records, teacher_records=teacher_records, weights=weights, phase=phase,
    )
    total: Tensor | float = 0.0
    for group in extra:
        for key, value in (group or {}).items():
            owner = key.split("/", 1)[0]
            if owner in per_student and "/" in key:  # "<student>/<term>": part of that student's loss
                per_student[owner] = per_student[owner] + value
            else:
                total = total + value
            logs[key] = value.detach()
    for name, student_loss in per_student.items():
        logs[f"{name}/loss"] = student_loss.detach()
        total = total + student_loss
    assert isinstance(total, Tensor)
    logs["loss"] = total.detach()
    return total, logs


def _named_terms(engine: Engine, batch: Any, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge],
                 weights: Mapping[str, LossWeights], tau: float, phase: str) -> dict[str, dict[str, Tensor]]:
    """The plugins' declared per-image terms, ``{student: {name: [B]}}``, checked; students in
    warm-up and terms weighing 0 left out."""
    declared = engine.loss_terms
    if not declared:
        return {}
    wanted = {s: w for s, w in weights.items() if not engine.warming_up(s) and any(w.uses(t) for t in declared)}
    if not wanted:
        return {}
    answers = engine.hook.collab_distill_loss_terms(engine=engine, batch=batch, records=records,
                                                    teacher_records=teacher_records, weights=weights,
                                                    temperature=tau, phase=phase)
    out: dict[str, dict[str, Tensor]] = {}
    for answer in answers:
        for student, terms in (answer or {}).items():
            if student not in records:
                raise ConfigError(f"collab_distill_loss_terms returned terms {sorted(terms)} for {student!r}, "
                                  f"which is not a student ({sorted(records)})")
            for term, values in terms.items():
                if term not in declared:
                    raise ConfigError(f"collab_distill_loss_terms returned {term!r} for {student!r}, a term no plugin declared "
                                      f"(declared: {sorted(declared)}); return it from collab_distill_declare_loss_terms")
                expected = (records[student].num_images,)
                if not isinstance(values, Tensor) or tuple(values.shape) != expected or not values.is_floating_point():
                    what = f"shape {tuple(values.shape)} {values.dtype}" if isinstance(values, Tensor) else type(values).__name__
                    raise ConfigError(f"collab_distill_loss_terms: term {term!r} of {student!r} is {what}; "
                                      f"expected one float per image, shape {expected}")
                if term in out.get(student, {}):
                    raise ConfigError(f"two plugins returned the term {term!r} for {student!r}")
                if student in wanted and wanted[student].uses(term):
                    out.setdefault(student, {})[term] = values
    return out


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
