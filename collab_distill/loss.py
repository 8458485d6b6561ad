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

What the hooks answer is checked: types, shapes and dtypes every step (free), values (weights
>= 0, everything finite) on the device, read by the NaN guard with its own flags and at once on
the first training step. A wrong answer is a :class:`PluginAnswerError` naming the plugin, the
hook and what was expected; the plugin is found on the error path only, by asking each
implementation alone (pluggy's ``subset_hook_caller``), or from the first training step, where
the providers and the auxiliary terms' plugins are asked one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sized
from typing import TYPE_CHECKING, Any, Optional, Protocol, cast

import torch
from torch import Tensor

from collab_distill.answers import PluginAnswerError, ask_alone, described, in_call_order, wrong_answer
from collab_distill.engine_view import EngineView
from collab_distill.plugin_manager import PluginError
from collab_distill.records import Knowledge, LossWeights, SoftTarget
from collab_distill.task import ConfigError

if TYPE_CHECKING:
    from pluggy import HookImpl

__all__ = ["cohort_loss", "check_loss_weight_providers", "PluginAnswerError"]


WEIGHTS_HOOK = _HOOK = "collab_distill_loss_weights"
AUX_HOOK = "collab_distill_auxiliary_losses"


class Engine(EngineView, Protocol):
    """What the cohort loss uses of the engine: the plugins' view, its plugin manager and hooks."""

    pm: Any
    hook: Any

    @property
    def loss_terms(self) -> list[str]: ...
    flags: Any  # ``flags.providers_checked``: the providers were asked one by one on a real training step
    guard: Any  # the NaN guard (``training.guards.NonFiniteGuard``): plugins' answers are checked with its flags

    def check_finite(self) -> None: ...


class _ProviderConflict(ConfigError):
    """Two plugins answer ``collab_distill_loss_weights`` for the same student."""


def _weight_providers(engine: Engine) -> Optional[list[HookImpl]]:
    """The implementations of ``collab_distill_loss_weights`` in the order pluggy calls them
    (wrappers left out), when two or more of them are not fallbacks (``trylast``, like the
    built-in defaults); otherwise ``None`` (one provider: nothing can conflict)."""
    impls = in_call_order(engine, _HOOK)
    return impls if sum(not i.trylast for i in impls) >= 2 else None


def _holds(key: str) -> Callable[[Any], bool]:
    return lambda answer: isinstance(answer, Mapping) and key in answer


def _check_weights(engine: Engine, provided: Any, records: Mapping[str, Knowledge], kwargs: Mapping[str, Any],
                   plugins: Mapping[str, str]) -> None:
    """The loss-weight provider's answer, checked for what costs nothing (no value is read)."""
    if not isinstance(provided, Mapping):
        raise wrong_answer(engine, _HOOK, kwargs, described(provided), "a mapping {student: LossWeights}")
    for student, weights in provided.items():
        if student not in records:
            raise wrong_answer(engine, _HOOK, kwargs, f"weights for {student!r}, which is not a student",
                               f"weights for the students {sorted(records)}", plugins.get(student))
        if not isinstance(weights, LossWeights):
            raise wrong_answer(engine, _HOOK, kwargs, f"{described(weights)} for {student!r}",
                               "a LossWeights per student (collab_distill.LossWeights)", plugins.get(student))
        problem = weights.problem(records[student])
        if problem is not None:
            which, value, expected = problem
            what = f"constant={value!r}" if which == "constant" else f"{which} {described(value)}"
            raise wrong_answer(engine, _HOOK, kwargs, f"{what} for {student!r}", expected, plugins.get(student))


def _only_answer(engine: Engine, impls: list[HookImpl],
                 kwargs: Mapping[str, Any]) -> tuple[Optional[Mapping[str, LossWeights]], dict[str, str]]:
    """What the firstresult hook returns (the first answer that is not None) and, per student,
    the plugin that gave it, having asked every provider that is not a fallback alone
    (:func:`_ask_alone`): two answers for the same student are a :class:`ConfigError` naming
    both plugins, since pluggy would silently use the first and never ask the second."""
    first: Optional[Mapping[str, LossWeights]] = None
    first_name = ""
    for impl in impls:
        if first is not None and impl.trylast:
            continue  # a fallback answers only when nobody else did
        answer = cast(Optional[Mapping[str, LossWeights]], ask_alone(engine, _HOOK, impls, impl, kwargs))
        if answer is None:
            continue
        if first is None:
            first, first_name = answer, impl.plugin_name
            continue
        both = sorted(set(first) & set(answer)) if isinstance(answer, Mapping) and isinstance(first, Mapping) else []
        if both:
            raise _ProviderConflict(
                f"plugins {first_name} and {impl.plugin_name} both provide loss weights (collab_distill_loss_weights) "
                f"for student(s) {both}; the first answer would be used and the other silently ignored. "
                "Keep one of them under `plugins:`."
            )
    names = {student: first_name for student in first} if isinstance(first, Mapping) else {}
    return first, names


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
            kwargs = dict(engine=engine, batch=batch, records=records, teacher_records=teacher_records, phase="train")
            answer, plugins = _only_answer(engine, impls, kwargs)
            if answer is not None:
                _check_weights(engine, answer, records, kwargs, plugins)
    except PluginError:
        # a provider that cannot answer before training is prepared (it reads a meta module's
        # placed copy, say): the first training step asks every provider again, where the same
        # exception stops the run naming the plugin
        pass
    finally:
        for m, training in modes.items():
            m.training = training


def _provided_weights(engine: Engine, batch: Any, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge],
                      phase: str) -> tuple[dict[str, LossWeights], bool]:
    """Every student's weights (a student in warm-up: supervised only), checked, and whether this
    was the first training step that asked the providers (each alone: conflicts, who answers)."""
    first = next(iter(records.values()))
    supervised_only = LossWeights.constant_weights(first.num_images, 1.0, 0.0, 0.0, first.logits.device)
    warming = {s for s in records if engine.warming_up(s)}
    if len(warming) == len(records):
        return {s: supervised_only for s in records}, False
    # weights from a meta module keep their graph only in the lookahead
    with torch.set_grad_enabled(phase != "train" and torch.is_grad_enabled()):
        kwargs = dict(engine=engine, batch=batch, records=records, teacher_records=teacher_records, phase=phase)
        # until a real step asked them: each provider alone, to find a conflict and who answers
        # (later steps ask pluggy's first answer, as without a check)
        asking = not engine.flags.providers_checked
        plugins: dict[str, str] = {}
        if asking:
            provided, plugins = _only_answer(engine, in_call_order(engine, _HOOK), kwargs)
        else:
            provided = engine.hook.collab_distill_loss_weights(**kwargs)
        first_step = asking and phase == "train"
        if first_step:
            engine.flags.providers_checked = True
            engine.guard.name_sources(_HOOK, plugins)
    if provided is None:
        raise ConfigError("no plugin provides loss weights (the built-in `defaults` plugin is disabled?)")
    _check_weights(engine, provided, records, kwargs, plugins)
    missing = set(records) - set(provided)
    if missing:
        raise ConfigError(f"the loss-weight provider returned no weights for student(s) {sorted(missing)}")
    for student in records:
        unknown = set(getattr(provided[student], "terms", {})) - set(engine.loss_terms)
        if unknown:
            raise ConfigError(f"the loss-weight provider weighs term(s) {sorted(unknown)} of {student!r}, which no plugin "
                              f"declares (declared: {sorted(engine.loss_terms)}); see collab_distill_declare_loss_terms")
    return {s: supervised_only if s in warming else provided[s] for s in records}, first_step


def _targets(engine: Engine, hook: str, kwargs: Mapping[str, Any], records: Mapping[str, Knowledge],
             first_step: bool = False) -> Mapping[str, SoftTarget]:
    """A soft-target or consensus answer, checked for what costs nothing (students, types, shapes);
    on the first training step (which reads the device anyway) its values must be finite too."""
    answer = getattr(engine.hook, hook)(**kwargs)
    if answer is None:
        return {}
    if not isinstance(answer, Mapping):  # before any truth test: a tensor has no single truth value
        raise wrong_answer(engine, hook, kwargs, described(answer), "a mapping {student: SoftTarget}")
    for student, target in answer.items():
        record = records.get(student)
        if record is None:
            raise wrong_answer(engine, hook, kwargs, f"a target for {student!r}, which is not a student",
                               f"targets for the students {sorted(records)}")
        if not isinstance(target, SoftTarget):
            raise wrong_answer(engine, hook, kwargs, f"{described(target)} for {student!r}", "a SoftTarget per student")
        expected = tuple(record.logits.shape)
        if not isinstance(target.probs, Tensor) or target.probs.shape != expected or not target.probs.is_floating_point():
            raise wrong_answer(engine, hook, kwargs, f"probabilities {described(target.probs)} for {student!r}",
                               f"floating-point probabilities of shape [units, classes] = {expected}, as the student's logits")
        if first_step and not bool(torch.isfinite(target.probs).all()):
            raise wrong_answer(engine, hook, kwargs, f"probabilities with NaN/inf for {student!r}",
                               "finite probabilities (each row sums to 1)")
    return answer


def _auxiliary(engine: Engine, kwargs: Mapping[str, Any], first_step: bool) -> list[tuple[str, Tensor]]:
    """Every plugin's auxiliary terms, checked for what costs nothing (each a 0-d float tensor).
    On the first training step, with two or more implementations, each is asked alone (in
    pluggy's order, once) to learn which plugin gives which term."""
    impls = in_call_order(engine, AUX_HOOK) if first_step else []
    groups: list[tuple[Optional[str], Any]]
    if len(impls) >= 2:
        groups = [(impl.plugin_name, ask_alone(engine, AUX_HOOK, impls, impl, kwargs)) for impl in impls]
    else:
        name = impls[0].plugin_name if impls else None
        groups = [(name, group) for group in engine.hook.collab_distill_auxiliary_losses(**kwargs)]
    terms: list[tuple[str, Tensor]] = []
    plugins: dict[str, str] = {}
    for plugin, group in groups:
        if group is None:
            continue
        if not isinstance(group, Mapping):
            raise wrong_answer(engine, AUX_HOOK, kwargs, described(group), "a mapping {term name: scalar tensor}", plugin,
                               lambda answer: not isinstance(answer, Mapping))
        for key, value in group.items():
            if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point():
                raise wrong_answer(engine, AUX_HOOK, kwargs, f"{described(value)} for the term {key!r}",
                                   "a scalar (0-d) floating-point tensor per term", plugin, _holds(key))
            owner, slash, _ = key.partition("/")
            if slash and owner not in kwargs["records"] and owner not in engine.students:  # else silently the cohort's
                raise wrong_answer(engine, AUX_HOOK, kwargs, f"the term {key!r}, but {owner!r} is not a student",
                                   f"'<student>/<term>' for a student's own term (students: {sorted(kwargs['records'])}), "
                                   "or a name without '/' for a term of the whole cohort", plugin, _holds(key))
            terms.append((key, value))
            if plugin is not None:
                plugins[key] = plugin
    if first_step:
        engine.guard.name_sources(AUX_HOOK, plugins)
    return terms


def _watch(engine: Engine, weights: Mapping[str, LossWeights], extra: list[tuple[str, Tensor]], first_step: bool) -> None:
    """Hand the values of this training step's weights and auxiliary losses to the NaN guard:
    numbers are judged now, tensors stay on the device until the guard reads its flags (logging
    steps, checkpoints), so an ordinary step gains no host sync. On the first training step, and
    when a number is wrong, the guard reads them at once."""
    answers = [(_HOOK, student, which, value) for student, w in weights.items() for which, value in w.values()]
    answers += [(AUX_HOOK, key, "", value) for key, value in extra]
    wrong = engine.guard.record_answers(engine.global_step, answers, finite=engine.trainer.detect_nonfinite)
    if first_step or wrong:
        engine.check_finite()


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
    weights, first_step = _provided_weights(engine, batch, signals, teacher_records, phase)
    if weights_out is not None:
        weights_out.update(weights)
    kwargs = dict(engine=engine, batch=batch, records=signals, teacher_records=teacher_records, temperature=tau)
    targets: Mapping[str, SoftTarget] = {}
    consensus: Mapping[str, SoftTarget] = {}
    if any(w.uses("distill") for w in weights.values()):
        targets = _targets(engine, "collab_distill_soft_targets", kwargs, records, first_step)
    if any(w.uses("consensus") for w in weights.values()):
        consensus = _targets(engine, "collab_distill_consensus_targets", kwargs, records, first_step)
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
    extra = _auxiliary(engine, dict(engine=engine, batch=batch, records=records, teacher_records=teacher_records,
                                    weights=weights, phase=phase), first_step)
    total: Tensor | float = 0.0
    for key, value in extra:
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
    if phase == "train" and (first_step or engine.trainer.detect_nonfinite):
        _watch(engine, weights, extra, first_step)
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
