"""Building a run's members and what plugins attach to them, all checked before any file is
written: students and teachers from their factories (and checkpoints), feature hooks measured on
real images, plugin modules and meta-module specifications."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Any, Optional, Protocol, cast

import torch
from lightning_fabric import Fabric
from torch import Tensor, nn

from collab_distill import console
from collab_distill.answers import AnswerSource, PluginAnswerError, described, in_call_order, wrong_answer
from collab_distill.checkpoint import load_weights
from collab_distill.config import Cohort, TrainerConfig, check_accelerator, fabric_refused
from collab_distill.engine_view import EngineView
from collab_distill.features import FeatureCapture, FeatureRequest
from collab_distill.meta import MetaModule
from collab_distill.profiling import count_parameters, member_macs
from collab_distill.task import ConfigError, Task, TaskInfo
from collab_distill.wrapping import unwrap_optimizer

if TYPE_CHECKING:
    from lightning_fabric.plugins.precision.precision import _PRECISION_INPUT

    from collab_distill.optim import OptimizerCallable, Schedule
    from collab_distill.training.state import CohortState

__all__ = ["PluginHost", "make_fabric", "warmup_until", "check_warmup", "build_members", "capture_features",
           "collect_plugin_modules", "collect_loss_terms", "collect_meta_specs", "place_for_training"]


class PluginHost(EngineView, AnswerSource, Protocol):
    """The engine as the set-up checks see it: they call the hooks, and on a wrong answer ask
    each plugin alone to name the one that gave it."""

    hook: Any


def _listed(engine: PluginHost, hook: str, group: Any, expected: str, kwargs: Mapping[str, Any]) -> Iterable[Any]:
    """One plugin's answer to a hook that answers a list: a string or a non-iterable is refused
    (a string would be read letter by letter)."""
    def not_a_list(answer: Any) -> bool:
        return isinstance(answer, (str, bytes)) or not isinstance(answer, Iterable)

    if not_a_list(group):
        raise wrong_answer(engine, hook, kwargs, f"{group!r} ({described(group)})", expected, wrong=not_a_list)
    return cast(Iterable[Any], group)


def _holding(item: Any) -> Callable[[Any], bool]:
    """Whether a plugin's answer, asked again, holds ``item`` (by equality: asking again builds it anew)."""
    return lambda answer: any(type(i) is type(item) and i == item for i in answer)


def make_fabric(trainer: TrainerConfig) -> Fabric:
    """The run's Fabric, launched; a setting Fabric refuses is one error naming the fields. The
    engine owns its run's loggers: none for Fabric."""
    check_accelerator(trainer)
    try:
        fabric = Fabric(accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
                        strategy=trainer.strategy, precision=cast("_PRECISION_INPUT", trainer.precision))
    except Exception as err:  # a bare ValueError/TypeError/RuntimeError that names no config key
        raise fabric_refused(trainer, err) from None
    fabric.launch()
    return fabric


def warmup_until(trainer: TrainerConfig, student: str) -> int:
    """The first epoch in which ``student`` leaves its supervised-only warm-up."""
    epochs = trainer.warmup_epochs
    return epochs.get(student, 0) if isinstance(epochs, dict) else epochs


def check_warmup(trainer: TrainerConfig, students: Iterable[str], fabric: Fabric) -> None:
    """Per-student warm-ups name students; a warm-up as long as the run is a warning."""
    students = list(students)
    epochs = trainer.warmup_epochs
    if isinstance(epochs, dict) and set(epochs) - set(students):
        raise ConfigError(f"trainer.warmup_epochs names {sorted(set(epochs) - set(students))}, "
                          f"which are not students ({sorted(students)})")
    never = [s for s in students if warmup_until(trainer, s) >= trainer.max_epochs]
    if never:
        console.plain(fabric, f"[warning] trainer.warmup_epochs >= trainer.max_epochs ({trainer.max_epochs}) for {never}: "
                              "they train on their labels only and the method never applies; lower warmup_epochs")


def build_members(task: Task, info: TaskInfo, cohort: Cohort, seed: int
                  ) -> tuple[dict[str, nn.Module], dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """``(teachers, students, model summary)``: every member built (its initialisation depends
    on the seed and its name only), its checkpoint loaded, its output checked against the data."""
    example = task.example_input(info)
    summaries: dict[str, dict[str, Any]] = {}

    def build(name: str, factory: Any, kind: str) -> nn.Module:
        torch.manual_seed(seed * 1_000 + sum(map(ord, name)))
        try:
            model = task.build_model(factory, info)
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(
                f"cohort.{kind}.{name}: building {factory.describe()} failed: {type(err).__name__}: {err}"
            ) from err
        summary: dict[str, Any] = {"kind": kind[:-1], "model": factory.describe(), "params": count_parameters(model)}
        if example is not None:
            summary["macs"] = member_macs(model, example, f"cohort.{kind}.{name}", factory.describe(), task.describe())
        summaries[name] = summary
        return model

    teachers: dict[str, nn.Module] = {}
    for name, teacher in cohort.teachers.items():
        teachers[name] = build(name, teacher.model, "teachers")
        if teacher.checkpoint is not None:
            load_weights(teachers[name], teacher.checkpoint, member=name, field=f"cohort.teachers.{name}.checkpoint")
    students: dict[str, nn.Module] = {}
    for name, factory in cohort.students.items():
        students[name] = build(name, factory, "students")
        path = cohort.student_checkpoints.get(name)
        if path is not None:
            load_weights(students[name], path, member=name, field=f"cohort.student_checkpoints.{name}")
    if isinstance(example, Tensor):  # model(example) -> logits; a detector's ForwardCall is only counted
        _check_outputs(example, info, {"teachers": teachers, "students": students})
    return teachers, students, summaries


def _check_outputs(example: Tensor, info: TaskInfo, groups: Mapping[str, Mapping[str, nn.Module]]) -> None:
    """Every member must output one logit per class of the data."""
    for kind, members in groups.items():
        for name, model in members.items():
            was_training = model.training
            model.eval()
            with torch.no_grad():
                out = model(example)
            model.train(was_training)
            if isinstance(out, Tensor) and out.shape[-1] != info.num_classes:
                raise ConfigError(
                    f"cohort.{kind}.{name}: the model outputs {out.shape[-1]} classes but the data has "
                    f"{info.num_classes}; build it for {info.num_classes} classes (or fix the checkpoint/data)"
                )


def capture_features(engine: PluginHost, teachers: Mapping[str, nn.Module], students: Mapping[str, nn.Module]
                     ) -> tuple[Optional[FeatureCapture], dict[str, dict[str, tuple[int, ...]]]]:
    """Hook the modules the plugins' ``feature_requests`` name and measure each feature's shape on
    two real images (buffers, modes and the RNG untouched); ``(None, {})`` when nobody asked."""
    hook, kwargs, task = "collab_distill_feature_requests", {"engine": engine}, engine.task
    expected = 'a list of FeatureRequest(member, module path), e.g. [FeatureRequest("s", "layer3")]'
    requests: list[FeatureRequest] = []
    for group in engine.hook.collab_distill_feature_requests(**kwargs):
        for request in _listed(engine, hook, group, expected, kwargs):
            if not isinstance(request, FeatureRequest):
                raise wrong_answer(engine, hook, kwargs, f"{request!r} ({described(request)})", expected,
                                   wrong=_holding(request))
            requests.append(request)
    if not requests:
        return None, {}
    members = {**teachers, **students}
    features = FeatureCapture(members, requests)
    dataset = task.dataset("val")
    size = len(cast(Sized, dataset))  # a map-style data set: Dataset's stubs lack __len__
    batch = task.collate([dataset[i] for i in range(min(2, size))])
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name in features.members():
        model = members[name]
        # the mode it trains in (teachers: eval); buffers (BatchNorm statistics) and RNG untouched
        saved = {k: b.clone() for k, b in model.named_buffers()}
        modes = {m: m.training for m in model.modules()}
        model.train(name in students)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                context = task.shared_context(batch, teachers, students)
                wanted = list(dict.fromkeys(r.feature for r in features.requests[name]))
                with features.recording(name, wanted) as captured:
                    task.knowledge(model, batch, view=0, context=context)
        finally:
            for m, training in modes.items():
                m.training = training
            for k, b in model.named_buffers():
                b.copy_(saved[k])
        shapes[name] = {f: tuple(t.shape[1:]) for f, t in captured.items()}
    return features, shapes


def collect_plugin_modules(answers: list[Any], students: Mapping[str, nn.Module]) -> dict[str, dict[str, nn.Module]]:
    """``{student: {name: module}}`` from the plugins' ``student_modules`` answers, checked."""
    attached: dict[str, dict[str, nn.Module]] = {}
    for group in answers:
        for student, modules in (group or {}).items():
            if student not in students:
                raise ConfigError(
                    f"a plugin attaches modules {sorted(modules)} to {student!r}, which is not a student "
                    f"(students: {sorted(students)})"
                )
            own = attached.setdefault(student, {})
            for name, module in modules.items():
                if name in own:
                    raise ConfigError(f"two plugins attach a module named {name!r} to student {student!r}; rename one")
                if not isinstance(module, nn.Module):
                    raise ConfigError(
                        f"the module {name!r} attached to {student!r} is a {type(module).__name__}, not a torch.nn.Module"
                    )
                own[name] = module
    return attached


_RESERVED = ("supervised", "distill", "consensus", "loss", "alpha", "beta", "gamma")


def collect_loss_terms(engine: PluginHost) -> list[str]:
    """The per-image terms the plugins declare (``declare_loss_terms``), checked; a plugin that
    returns terms (``loss_terms``) but declares none would never be asked for them."""
    hook, kwargs = "collab_distill_declare_loss_terms", {"engine": engine}
    expected = "a list of term names (letters, digits, '_', '-'), e.g. ['hint']"
    names: list[str] = []
    for group in engine.hook.collab_distill_declare_loss_terms(**kwargs):
        for name in _listed(engine, hook, group or (), expected, kwargs):
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in _RESERVED:
                raise ConfigError(f"collab_distill_declare_loss_terms: {name!r} is not a valid term name (letters, digits, "
                                  f"'_', '-'; not one of {', '.join(_RESERVED)})")
            if name in names:
                raise ConfigError(f"two plugins declare a loss term named {name!r}; rename one")
            names.append(name)
    declaring = {impl.plugin for impl in in_call_order(engine, hook)}
    for impl in in_call_order(engine, "collab_distill_loss_terms"):
        if impl.plugin not in declaring:
            raise PluginAnswerError(
                f"plugin {impl.plugin_name!r} implements collab_distill_loss_terms but declares no term "
                f"({hook}), so its terms would never be asked for; declare their names there (e.g. return ['hint'])",
                impl.plugin_name, hook)
    return names


def _declaring(name: str) -> Callable[[Any], bool]:
    """Whether a plugin's ``meta_modules`` answer, asked again, declares a meta module ``name``."""
    return lambda answer: any(isinstance(m, MetaModule) and m.name == name for m in answer)


def collect_meta_specs(view: PluginHost) -> dict[str, MetaModule]:
    """``{name: MetaModule}`` from the plugins' ``meta_modules`` answers, each a module with
    parameters (the meta step's optimizer needs some); an exact hypergradient needs a task that
    can differentiate twice."""
    hook, kwargs = "collab_distill_meta_modules", {"engine": view}
    expected = "a list of MetaModule(name, module) whose modules have parameters"
    specs: dict[str, MetaModule] = {}
    for spec in (m for group in view.hook.collab_distill_meta_modules(**kwargs) if group
                 for m in _listed(view, hook, group, expected, kwargs)):
        if not isinstance(spec, MetaModule) or not isinstance(spec.module, nn.Module):
            what = spec if not isinstance(spec, MetaModule) else spec.module
            raise wrong_answer(view, hook, kwargs, f"{described(what)} ({type(what).__module__}.{type(what).__name__})",
                               "a list of MetaModule(name, module), e.g. [MetaModule('weights', nn.Linear(10, 1))]",
                               wrong=lambda answer: any(not isinstance(m, MetaModule) or not isinstance(m.module, nn.Module)
                                                        for m in answer))
        if next(iter(spec.module.parameters()), None) is None:
            raise wrong_answer(view, hook, kwargs, f"the meta module {spec.name!r} ({type(spec.module).__name__}), "
                               "which has no parameters", "meta modules with parameters the meta step can learn",
                               wrong=_declaring(spec.name))
        if spec.name in specs:
            raise ConfigError(f"two plugins declare a meta module named {spec.name!r}")
        specs[spec.name] = spec
    if specs and view.meta_config.hypergradient == "second_order" and not view.task.double_backward:
        raise ConfigError(
            f"meta.hypergradient=second_order needs a double backward through the students, which "
            f"{view.task.describe()} does not have (roi_align has none); use meta.hypergradient=finite_difference"
        )
    return specs


def place_for_training(fabric: Fabric, state: CohortState, specs: Mapping[str, MetaModule], trainer: TrainerConfig,
                       optimizer: OptimizerCallable, schedule: Schedule, hooked: set[str]) -> bool:
    """Place (and, under DDP, wrap) every trainable module, and build the optimizers and schedulers,
    in ``state``. Members in ``hooked`` (forward hooks capture their features) stay eager under
    ``trainer.compile``, since hooks do not fire inside a compiled graph. Returns whether any meta
    parameter is trainable."""
    backend = trainer.compile
    layout = torch.channels_last if trainer.channels_last else torch.contiguous_format
    for name, model in list(state.students.items()):
        model.to(memory_format=layout)
        extras = state.plugin_modules.get(name, {})
        params = list(model.parameters()) + [p for m in extras.values() for p in m.parameters()]
        for key, module in list(extras.items()):  # moved (and wrapped) like the student; trained by its optimizer
            trainable = any(p.requires_grad for p in module.parameters())
            extras[key] = fabric.setup_module(module) if trainable else fabric.to_device(module)
        # Fabric re-applies torch.compile around its wrapper; unwrap() (the lookahead) stays eager
        compiled = cast(nn.Module, torch.compile(model, backend=backend)) if backend and name not in hooked else model
        state.students[name], state.optimizers[name] = fabric.setup(compiled, optimizer(params))
        state.schedulers[name] = schedule.build(unwrap_optimizer(state.optimizers[name]), trainer.max_epochs)
    for name, model in list(state.teachers.items()):  # a frozen teacher must not be wrapped in DDP
        state.teachers[name] = fabric.to_device(model.eval().requires_grad_(False).to(memory_format=layout))
        if backend and name not in hooked:
            model.compile(backend=backend)  # in place: the state dict keeps its keys
    for name, spec in specs.items():
        module = fabric.to_device(spec.module)
        if backend:
            module.compile(backend=backend)
        state.meta_modules[name] = module
        state.meta_optimizers[name] = spec.optimizer(module.parameters())
    return any(p.requires_grad for m in state.meta_modules.values() for p in m.parameters())
