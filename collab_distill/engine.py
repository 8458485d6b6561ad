"""The cohort training loop on Lightning Fabric.

One screen of control flow (:meth:`Engine.fit` and :meth:`Engine.training_step`); every
decision about *what* each student learns from comes from plugin hooks, and the bilevel meta
step is a separate named function (:meth:`Engine.meta_step`). Nothing in here knows a method by
name.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Mapping, Sized
from collections.abc import Mapping as MappingABC
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from lightning_fabric import Fabric
from torch import Tensor, nn
from torch.func import functional_call

from collab_distill import console
from collab_distill.checkpoint import atomic_save, load_weights, write_json
from collab_distill.config import Cohort, TrainerConfig, check_accelerator, check_optimizer, fabric_refused
from collab_distill.data import Cycle, make_loader
from collab_distill.evaluation import evaluate, evaluate_checkpoint
from collab_distill.features import FeatureCapture, FeatureRequest
from collab_distill.loss import check_loss_weight_providers, cohort_loss, untrained_leaves
from collab_distill.meta import BilevelConfig, MetaModule, hypergradient, meta_summary
from collab_distill.nested import train_teachers
from collab_distill.optim import Constant, OptimizerCallable, Schedule, sgd
from collab_distill.plugin_manager import ROLES, NamedHookRelay, make_plugin_manager
from collab_distill.records import Knowledge
from collab_distill.report import write_sections
from collab_distill.run_folder import (
    RunLock,
    check_run_target,
    checkpoint_state,
    make_loggers,
    open_run_dir,
    resolve_resume,
    restore,
)
from collab_distill.stages import Stage, check_stages
from collab_distill.task import ConfigError, Task, TaskInfo
from collab_distill.wrapping import unwrap, unwrap_optimizer

if TYPE_CHECKING:
    from lightning_fabric.plugins.precision.precision import _PRECISION_INPUT

__all__ = ["Engine", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the student and the term."""


class _TaskCall(nn.Module):
    """Lets ``functional_call`` swap a model's parameters while the task runs it.

    The task may call submodules of the model directly (detectors do), so parameters are
    replaced on the whole model for the duration of :meth:`Task.knowledge`.
    """

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, batch: Any, view: int, context: Any) -> Knowledge:
        return self.task.knowledge(self.model, batch, view=view, context=context)


class _LazyRecords(MappingABC):
    """The frozen teachers' records, computed (without grad) on first access only.

    A step whose rule never looks at a teacher (CE, a warm-up epoch) skips its forward pass.
    """

    def __init__(self, teachers: Mapping[str, nn.Module], compute: Any) -> None:
        self._teachers, self._compute = teachers, compute
        self._records: Optional[dict[str, Knowledge]] = None

    def _computed(self) -> dict[str, Knowledge]:
        if self._records is None:
            self._records = {name: self._compute(name, model) for name, model in self._teachers.items()}
        return self._records

    @property
    def resolved(self) -> bool:
        return self._records is not None

    def resolve(self) -> None:
        self._computed()

    def __getitem__(self, name: str) -> Knowledge:
        return self._computed()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._teachers)

    def __len__(self) -> int:
        return len(self._teachers)

    def __bool__(self) -> bool:
        return bool(self._teachers)


class Engine:
    """Trains a cohort (students, frozen teachers, meta-learned modules) on a task.

    Args:
        task: the task adapter (data, models' forward, metrics).
        cohort: students and teachers.
        trainer: loop, hardware, run folder.
        optimizer: the student optimizer (``class_path: torch.optim.SGD`` + ``init_args``).
        schedule: the per-epoch learning-rate schedule of the students.
        meta: when and how the bilevel meta step runs (used only if a plugin has meta modules).
        plugins: configured plugins (methods); always-on plugins come from entry points.
        disable_plugins: names of always-on plugins to leave out.
        seed: seeds model initialisation, data splits, data order and augmentation.
        trace_plugins: print every hook call (debugging a plugin).
        run_dir: write into this folder instead of a new ``root_dir/name/version_N``.
        stages: train the students in a sequence of runs, earlier students teaching later ones
            (teacher-assistant chains); see :mod:`collab_distill.stages`.
        role: which run this is, for plugins (``engine.role``): ``"fit"`` (the user's run),
            ``"teacher_training"`` (a teacher's own run inside it) or ``"stage"`` (a stage of a
            staged fit); nested runs pass theirs.
    """

    def __init__(
        self,
        task: Task,
        cohort: Cohort,
        trainer: Optional[TrainerConfig] = None,
        optimizer: OptimizerCallable = sgd,
        schedule: Optional[Schedule] = None,
        meta: Optional[BilevelConfig] = None,
        plugins: Optional[list[Any]] = None,
        disable_plugins: Optional[list[str]] = None,
        seed: int = 0,
        trace_plugins: bool = False,
        config_text: Optional[str] = None,
        fabric: Optional[Fabric] = None,
        run_dir: Optional[str] = None,
        stages: Optional[list[Stage]] = None,
        role: str = "fit",
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"Engine: role {role!r} is not one of {', '.join(map(repr, ROLES))}")
        #: which run this is (``"fit"``, ``"teacher_training"``, ``"stage"``): hooks of every role share the plugins
        self.role = role
        self.task = task
        self.cohort = cohort
        self.trainer = trainer or TrainerConfig()
        self.optimizer_factory = optimizer
        self.schedule = schedule or Constant()
        self.meta_config = meta or BilevelConfig()
        if not 0 <= seed < 2**32:  # numpy's (and Fabric's seed_everything's) range
            raise ConfigError(f"seed={seed} must be between 0 and 4294967295 (2**32 - 1)")
        self.seed = seed
        self.config_text = config_text
        #: pluggy's plugin manager (plugins, hook implementations); call hooks through ``hook``
        self.pm = make_plugin_manager(plugins or [], disable_plugins or [], trace=trace_plugins)
        self.trace_plugins = trace_plugins  # nested runs trace too
        # kept so that nested runs (the stages of a staged fit) use the same plugins
        self.plugin_objects: list[Any] = list(plugins or [])
        self.disabled_plugins: list[str] = list(disable_plugins or [])
        self.stages = list(stages) if stages else None
        #: ``self.hook.collab_distill_x(...)``: an exception in a plugin becomes a PluginError naming it
        self.hook = NamedHookRelay(self.pm)
        self.fabric = fabric
        self._owns_fabric = fabric is None
        self.info: Optional[TaskInfo] = None
        self.students: dict[str, nn.Module] = {}
        self.teachers: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.meta_modules: dict[str, nn.Module] = {}
        self.meta_optimizers: dict[str, torch.optim.Optimizer] = {}
        #: ``{student: {name: module}}`` that plugins attached (see ``collab_distill_student_modules``)
        self.plugin_modules: dict[str, dict[str, nn.Module]] = {}
        #: forward hooks of the requested features (``None``: no plugin asked for any)
        self.features: Optional[FeatureCapture] = None
        self.feature_shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        # inside the bilevel lookahead: {student: {module name: looked-ahead parameters}}
        self._lookahead_modules: Optional[dict[str, dict[str, dict[str, Tensor]]]] = None
        self._leaves_checked = False  # trainable tensors outside every optimizer are looked for once
        self.run_dir: Optional[Path] = None
        #: rank 0's lock on the run folder while ``fit`` runs (``None`` elsewhere)
        self.run_lock: Optional[RunLock] = None
        #: the run's ``resumes.json``: one entry per ``--resume``, with what the config changed
        self.resumes: list[dict[str, Any]] = []
        #: the run's loggers (``trainer.loggers``), created with the run folder
        self.loggers: list[Any] = []
        self.fitting = False  # True inside fit(); validate/test of a checkpoint run with it False
        # write into this folder instead of a new root_dir/name/version_N (nested teacher runs)
        self._run_dir_override: Optional[Path] = Path(run_dir) if run_dir is not None else None
        self._meta_trainable = False
        self.epoch = 0
        self.global_step = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        #: one ``{"step", "loss", "grad_norm"}`` per meta step: whether the meta modules learn
        self.meta_history: list[dict[str, float]] = []
        self._pending_meta: list[tuple[int, Tensor]] = []  # (step, [loss, grad norm]) not yet on the host
        self.best: dict[str, dict[str, Any]] = {}
        self.model_summary: dict[str, dict[str, Any]] = {}
        self._is_setup = False
        self._teachers_used = False  # did the last step need the teachers' records?
        # (step, [students + total] finite flags on the device) since the last check: no per-step sync
        self._finite_flags: list[tuple[int, Tensor]] = []

    # ------------------------------------------------------------------ setup

    def warming_up_until(self, student: str) -> int:
        """The first epoch in which ``student`` leaves its supervised-only warm-up."""
        epochs = self.trainer.warmup_epochs
        return epochs.get(student, 0) if isinstance(epochs, dict) else epochs

    def warming_up(self, student: str) -> bool:
        """Whether ``student`` is still in its supervised-only warm-up."""
        return self.epoch < self.warming_up_until(student)

    @property
    def in_warmup(self) -> bool:
        """Some student is still warming up (meta steps wait for all of them)."""
        return any(self.warming_up(s) for s in self.cohort.students)

    @property
    def has_meta(self) -> bool:
        return bool(self.meta_modules)

    def setup(self) -> None:
        """Validate everything and build the cohort; writes no file."""
        # bad settings stop here, before any file is written and before (teacher) training starts
        if self._is_setup:
            return
        if self.stages:
            check_stages(self.stages, self.cohort)
        t = self.trainer
        if self.fabric is None:
            check_accelerator(t)
            try:
                # no Fabric loggers: the engine owns its run's loggers (created with the run folder)
                self.fabric = Fabric(
                    accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                    # the config is a plain str, checked by TrainerConfig (Fabric's stubs take only the Literal names)
                    precision=cast("_PRECISION_INPUT", t.precision),
                )
            except Exception as err:  # a bare ValueError/TypeError/RuntimeError that names no config key
                raise fabric_refused(t, err) from None
            self.fabric.launch()
        check_optimizer(self.optimizer_factory, "optimizer", self.fabric.device, key="optimizer")
        self.fabric.seed_everything(self.seed, verbose=False)
        self.info = self.task.setup(self.seed)
        self._build_members()
        epochs = self.trainer.warmup_epochs
        if isinstance(epochs, dict) and set(epochs) - set(self.cohort.students):
            raise ConfigError(
                f"trainer.warmup_epochs names {sorted(set(epochs) - set(self.cohort.students))}, "
                f"which are not students ({sorted(self.cohort.students)})"
            )
        never = [s for s in self.cohort.students if self.warming_up_until(s) >= t.max_epochs]
        if never:
            console.plain(self.fabric, f"[warning] trainer.warmup_epochs >= trainer.max_epochs ({t.max_epochs}) for {never}: "
                         "they train on their labels only and the method never applies; lower warmup_epochs")
        self.hook.collab_distill_configure(engine=self)
        self._setup_features()
        self._collect_plugin_modules()
        self._collect_meta_modules()
        for name, spec in self.meta_specs.items():
            check_optimizer(spec.optimizer, f"meta module {name!r}", self.fabric.device)
        check_loss_weight_providers(self)
        self._is_setup = True

    def _build_members(self) -> None:
        assert self.info is not None and self.fabric is not None
        info = self.info  # narrowed to TaskInfo for the closure below
        example = self.task.example_input(info)
        from collab_distill.profiling import count_macs, count_parameters

        def build(name: str, factory: Any, kind: str) -> nn.Module:
            # each member's initialisation depends on the seed and its name only
            torch.manual_seed(self.seed * 1_000 + sum(map(ord, name)))
            try:
                model = self.task.build_model(factory, info)
            except ConfigError:
                raise
            except Exception as err:
                raise ConfigError(
                    f"cohort.{kind}.{name}: building {factory.describe()} failed: {type(err).__name__}: {err}"
                ) from err
            summary: dict[str, Any] = {"kind": kind[:-1], "model": factory.describe(), "params": count_parameters(model)}
            if example is not None:
                summary["macs"] = count_macs(model, example)
            self.model_summary[name] = summary
            return model

        for name, teacher in self.cohort.teachers.items():
            model = build(name, teacher.model, "teachers")
            if teacher.checkpoint is not None:
                load_weights(model, teacher.checkpoint, member=name, field=f"cohort.teachers.{name}.checkpoint")
            self.teachers[name] = model
        for name, factory in self.cohort.students.items():
            model = build(name, factory, "students")
            path = self.cohort.student_checkpoints.get(name)
            if path is not None:
                load_weights(model, path, member=name, field=f"cohort.student_checkpoints.{name}")
            self.students[name] = model
        if isinstance(example, Tensor):  # model(example) -> logits; a detector's ForwardCall is only counted
            self._check_outputs(example)

    def _check_outputs(self, example: Any) -> None:
        """Every member must output one logit per class of the data."""
        assert self.info is not None
        for kind, members in (("teachers", self.teachers), ("students", self.students)):
            for name, model in members.items():
                was_training = model.training
                model.eval()
                with torch.no_grad():
                    out = model(example)
                model.train(was_training)
                if isinstance(out, Tensor) and out.shape[-1] != self.info.num_classes:
                    raise ConfigError(
                        f"cohort.{kind}.{name}: the model outputs {out.shape[-1]} classes but the data has "
                        f"{self.info.num_classes}; build it for {self.info.num_classes} classes (or fix the checkpoint/data)"
                    )

    def _setup_features(self) -> None:
        """Hook the requested modules and measure each feature's shape on two real images."""
        answers = self.hook.collab_distill_feature_requests(engine=self)
        requests: list[FeatureRequest] = [r for group in answers if group for r in group]
        if not requests:
            return
        self.features = FeatureCapture({**self.teachers, **self.students}, requests)
        dataset = self.task.dataset("val")
        size = len(cast(Sized, dataset))  # a map-style data set: Dataset's stubs lack __len__
        batch = self.task.collate([dataset[i] for i in range(min(2, size))])
        members = {**self.teachers, **self.students}
        for name in self.features.members():
            model = members[name]
            # the mode it trains in (teachers: eval); buffers (BatchNorm statistics) and RNG untouched
            saved = {k: b.clone() for k, b in model.named_buffers()}
            modes = {m: m.training for m in model.modules()}
            model.train(name in self.students)
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    context = self.task.shared_context(batch, self.teachers, self.students)
                    features = list(dict.fromkeys(r.feature for r in self.features.requests[name]))
                    with self.features.recording(name, features) as captured:
                        self.task.knowledge(model, batch, view=0, context=context)
            finally:
                for m, training in modes.items():
                    m.training = training
                for k, b in model.named_buffers():
                    b.copy_(saved[k])
            self.feature_shapes[name] = {f: tuple(t.shape[1:]) for f, t in captured.items()}

    def _collect_plugin_modules(self) -> None:
        for group in self.hook.collab_distill_student_modules(engine=self):
            for student, modules in (group or {}).items():
                if student not in self.students:
                    raise ConfigError(
                        f"a plugin attaches modules {sorted(modules)} to {student!r}, which is not a student "
                        f"(students: {sorted(self.students)})"
                    )
                own = self.plugin_modules.setdefault(student, {})
                for name, module in modules.items():
                    if name in own:
                        raise ConfigError(f"two plugins attach a module named {name!r} to student {student!r}; rename one")
                    if not isinstance(module, nn.Module):
                        raise ConfigError(
                            f"the module {name!r} attached to {student!r} is a {type(module).__name__}, not a torch.nn.Module"
                        )
                    own[name] = module

    def student_module(self, student: str, name: str) -> Any:
        """A module a plugin attached to ``student``, callable in the current phase."""
        try:
            module = self.plugin_modules[student][name]
        except KeyError:
            raise KeyError(
                f"no module {name!r} is attached to student {student!r}; return it from collab_distill_student_modules "
                f"(attached: {sorted(self.plugin_modules.get(student, {}))})"
            ) from None
        if self._lookahead_modules is None:
            return module
        raw = unwrap(module)
        # cloned buffers: a BatchNorm in the module must not move its statistics in the lookahead
        state = {**{k: b.clone() for k, b in raw.named_buffers()}, **self._lookahead_modules[student].get(name, {})}
        return lambda *args, **kwargs: functional_call(raw, state, args, kwargs, strict=False)

    def teacher_records(self, batch: Any, context: Any = None) -> _LazyRecords:
        """The frozen teachers' records of ``batch``, computed (no grad, under the run's
        autocast, with requested features) when first read."""

        def compute(name: str, model: nn.Module) -> Knowledge:
            assert self.fabric is not None
            with torch.no_grad(), self.fabric.autocast():  # teachers are not wrapped by Fabric
                return self.member_knowledge(name, model, batch, view=0, context=context, phase="train")

        return _LazyRecords(self.teachers, compute)

    def member_knowledge(self, name: str, model: Any, batch: Any, *, view: int, context: Any, phase: str) -> Knowledge:
        """``task.knowledge`` of one member with the features that some request wants in this
        ``phase`` (the caller sets grad mode and autocast)."""
        wanted = self.features.active(name, self, phase) if self.features is not None else []
        if not wanted:
            return self.task.knowledge(model, batch, view=view, context=context)
        assert self.features is not None
        with self.features.recording(name, wanted) as captured:
            record = self.task.knowledge(model, batch, view=view, context=context)
        record.features.update(captured)
        return record

    def _collect_meta_modules(self) -> None:
        specs: list[MetaModule] = [m for group in self.hook.collab_distill_meta_modules(engine=self) if group for m in group]
        self.meta_specs: dict[str, MetaModule] = {}
        for spec in specs:
            if spec.name in self.meta_specs:
                raise ConfigError(f"two plugins declare a meta module named {spec.name!r}")
            self.meta_specs[spec.name] = spec
        if self.meta_specs and self.meta_config.hypergradient == "second_order" and not self.task.double_backward:
            raise ConfigError(
                f"meta.hypergradient=second_order needs a double backward through the students, which "
                f"{self.task.describe()} does not have (roi_align has none); use meta.hypergradient=finite_difference"
            )

    def prepare_training(self) -> None:
        """Set up (if not yet), wrap students for the strategy, and build optimizers, schedulers
        and loaders: everything a training step needs, without a run folder."""
        self.setup()
        fabric = self.fabric
        assert fabric is not None
        backend = self.trainer.compile
        # forward hooks (requested features) do not fire inside a compiled graph: such members stay eager
        hooked = set(self.features.members()) if self.features is not None else set()
        layout = torch.channels_last if self.trainer.channels_last else torch.contiguous_format
        for name, model in list(self.students.items()):
            model.to(memory_format=layout)
            extras = self.plugin_modules.get(name, {})
            params = list(model.parameters()) + [p for m in extras.values() for p in m.parameters()]
            for key, module in list(extras.items()):
                # moved and (under DDP) wrapped like the student; trained by the student's optimizer
                trainable = any(p.requires_grad for p in module.parameters())
                extras[key] = fabric.setup_module(module) if trainable else fabric.to_device(module)
            optimizer = self.optimizer_factory(params)
            # Fabric re-applies torch.compile around its wrapper; unwrap() (the lookahead) stays eager
            # torch.compile's stubs return a Callable; for a module it is an OptimizedModule (an nn.Module)
            compiled = cast(nn.Module, torch.compile(model, backend=backend)) if backend and name not in hooked else model
            model, optimizer = fabric.setup(compiled, optimizer)
            self.students[name], self.optimizers[name] = model, optimizer
            self.schedulers[name] = self.schedule.build(unwrap_optimizer(optimizer), self.trainer.max_epochs)
        for name, model in list(self.teachers.items()):
            # a frozen teacher must not be wrapped in DDP
            self.teachers[name] = fabric.to_device(model.eval().requires_grad_(False).to(memory_format=layout))
            if backend and name not in hooked:
                model.compile(backend=backend)  # in place: the state dict keeps its keys
        for name, spec in self.meta_specs.items():
            module = fabric.to_device(spec.module)
            if backend:
                module.compile(backend=backend)
            self.meta_modules[name] = module
            self.meta_optimizers[name] = spec.optimizer(module.parameters())
        self._meta_trainable = any(p.requires_grad for m in self.meta_modules.values() for p in m.parameters())
        self.loaders = {split: make_loader(self.task, split, self.seed, fabric) for split in ("train", "meta", "val", "test")}
        self.meta_batches = Cycle(*self.loaders["meta"])

    # ------------------------------------------------------------------ the loss

    def cohort_loss(
        self,
        batch: Any,
        records: Mapping[str, Knowledge],
        teacher_records: Mapping[str, Knowledge],
        phase: str = "train",
        detailed: bool = True,
        signals: Optional[Mapping[str, Knowledge]] = None,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The cohort's loss on one batch (see :func:`collab_distill.loss.cohort_loss`)."""
        return cohort_loss(self, batch, records, teacher_records, phase, detailed, signals)


    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Any) -> dict[str, Tensor | float]:
        """One optimisation step of every student (and a meta step when one is due)."""
        assert self.fabric is not None
        context = self.task.shared_context(batch, self.teachers, self.students)
        teacher_records = self.teacher_records(batch, context)
        if self._teachers_used:
            # run the teachers before the students, as a hand-written loop would: computing them
            # lazily after the students' forward costs up to ~15% per step in allocator page faults
            teacher_records.resolve()
        meta_log: dict[str, Tensor] = {}
        if self.meta_step_due():
            meta_log = self.meta_step(batch, teacher_records, context)
        records = {
            name: self.member_knowledge(name, model, batch, view=i, context=context, phase="train")
            for i, (name, model) in enumerate(self.students.items())
        }
        detailed = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        loss, logs = self.cohort_loss(batch, records, teacher_records, phase="train", detailed=detailed)
        self._teachers_used = teacher_records.resolved
        if not self._leaves_checked:
            self._check_trained_leaves(loss)
        if self.trainer.detect_nonfinite:
            # no host sync here: flags accumulate on the device and are read on logging steps,
            # before every checkpoint and at epoch end (so a bad state is never saved)
            # each student's "loss" entry is a tensor (plugins' entries may be floats)
            finite = torch.isfinite(torch.stack([cast(Tensor, logs[f"{s}/loss"]) for s in records] + [loss.detach()]))
            self._finite_flags.append((self.global_step, finite))
            if detailed:
                self._check_finite()
        if detailed:
            self.flush_meta_history()
        self.fabric.backward(loss)
        for name, optimizer in self.optimizers.items():
            if self.trainer.gradient_clip is not None:
                self.fabric.clip_gradients(self.students[name], optimizer, max_norm=self.trainer.gradient_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        logs.update(meta_log)
        return logs

    def _check_trained_leaves(self, loss: Tensor) -> None:
        """Stop when a trainable tensor reaches the loss but no optimizer updates it (a plugin's
        module kept as an attribute instead of declared): it would silently stay at its init."""
        self._leaves_checked = True
        trained = {id(p) for opt in self.optimizers.values() for g in unwrap_optimizer(opt).param_groups for p in g["params"]}
        trained |= {id(p) for m in self.meta_modules.values() for p in m.parameters()}
        # every registered plugin has a name (get_name is Optional only for unregistered objects)
        strays = untrained_leaves(loss, trained, {cast(str, self.pm.get_name(p)): p for p in self.pm.get_plugins()})
        if strays:
            raise ConfigError(
                f"trainable parameter(s) reach the loss but no optimizer updates them: {'; '.join(strays)}. "
                "A plugin's trainable module must be returned from collab_distill_student_modules (trained with a "
                "student) or collab_distill_meta_modules (meta-learned), and called through engine.student_module(...)"
            )

    def _check_finite(self) -> None:
        """Raise if any loss since the last check was NaN/inf (one host sync)."""
        if not self._finite_flags:
            return
        steps = [step for step, _ in self._finite_flags]
        finite = torch.stack([flags for _, flags in self._finite_flags]).cpu()
        self._finite_flags.clear()
        if bool(finite.all()):
            return
        first_row = int((~finite).any(dim=1).nonzero()[0])
        step = steps[first_row]
        bad = [f"{s}/loss" for s, ok in zip(self.students, finite[first_row, :-1].tolist()) if not ok]
        last = self.run_dir / "checkpoints" / "last.ckpt" if self.run_dir is not None else None
        kept = (
            f"The last good checkpoint {last} was left untouched (resume with --resume last)."
            if last is not None and last.is_file() else "No checkpoint had been written yet."
        )
        raise NonFiniteLossError(
            f"non-finite loss at epoch {self.epoch} step {step}: {', '.join(bad) or 'loss'} "
            f"became NaN/inf (checked every {self.trainer.log_every_n_steps} steps and before each checkpoint). "
            "Lower optimizer.init_args.lr, set trainer.gradient_clip, or check the data and "
            f"the teacher. {kept}"
        )

    def meta_step_due(self) -> bool:
        """Whether this step runs the bilevel meta step."""
        # decided from counters and config only, so every DDP rank takes the same branch
        if not self.has_meta or self.in_warmup:
            return False
        if not self._meta_trainable:
            return False  # every meta module is frozen
        config = self.meta_config
        if config.every_n_epochs is not None:
            if self.epoch % config.every_n_epochs != 0:
                return False
            if config.steps_in_meta_epoch == "every_n_steps":
                return self.batch_in_epoch % config.every_n_steps == 0
            return self.batch_in_epoch == 0
        return self.global_step % config.every_n_steps == 0

    def meta_step(self, batch: Any, teacher_records: Mapping[str, Knowledge], context: Any) -> dict[str, Tensor]:
        """The bilevel step: look ahead one step of every student, score the result on a
        held-out meta batch, and update only the meta modules."""
        meta_params, grads, value = self.meta_gradients(batch, teacher_records, context)
        for p, g in zip(meta_params, grads):
            p.grad = g.detach()
        self._reduce_meta_grads(meta_params)
        # the norm before clipping tells users whether the meta objective reaches the modules at all
        grad_norm = torch.nn.utils.clip_grad_norm_(meta_params, self.meta_config.grad_clip or float("inf")).detach()
        for optimizer in self.meta_optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self._sync_module_buffers()
        # read on the host at the next logging step (no synchronisation here)
        self._pending_meta.append((self.global_step, torch.stack([value.float(), grad_norm.float()])))
        self.hook.collab_distill_meta_step_end(engine=self, step=self.global_step, meta_loss=value, grad_norm=grad_norm)
        return {"meta/loss": value, "meta/grad_norm": grad_norm}

    def meta_gradients(self, batch: Any, teacher_records: Mapping[str, Knowledge], context: Any,
                       meta_batch: Any = None) -> tuple[list[nn.Parameter], list[Tensor], Tensor]:
        """The meta modules' trainable parameters, their hypergradients (``meta.hypergradient``)
        on this training batch and a meta batch (the next one of the meta split unless given,
        already on the device), and the meta objective after the lookahead; nothing is updated."""
        assert self.fabric is not None
        fabric = self.fabric  # narrowed to Fabric for the closure below
        if meta_batch is None:
            meta_batch = self.task.move_batch(next(self.meta_batches), fabric)
        with torch.no_grad():
            meta_context = self.task.shared_context(meta_batch, self.teachers, self.students)
        raw = {name: unwrap(model) for name, model in self.students.items()}
        params = {name: {n: p for n, p in m.named_parameters() if p.requires_grad} for name, m in raw.items()}
        for name, extras in self.plugin_modules.items():  # looked ahead with their student
            for key, module in extras.items():
                own = unwrap(module).named_parameters()
                params[name].update({f"{_PLUGIN_PREFIX}{key}/{n}": p for n, p in own if p.requires_grad})
        names = list(raw)

        def run(name: str, theta: Mapping[str, Tensor], data: Any, view: int, ctx: Any, phase: str) -> Knowledge:
            # clone buffers: BatchNorm statistics must not move twice for one real step
            state = {f"model.{k}": v for k, v in theta.items() if not k.startswith(_PLUGIN_PREFIX)}
            state.update({f"model.{k}": b.clone() for k, b in raw[name].named_buffers()})
            with fabric.autocast():
                wanted = self.features.active(name, self, phase) if self.features is not None else []
                if not wanted:
                    return functional_call(_TaskCall(self.task, raw[name]), state, (data, view, ctx), strict=False)
                assert self.features is not None
                with self.features.recording(name, wanted) as captured:
                    record = functional_call(_TaskCall(self.task, raw[name]), state, (data, view, ctx), strict=False)
            record.features.update(captured)
            return record

        def bind(theta: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, dict[str, Tensor]]]:
            bound: dict[str, dict[str, dict[str, Tensor]]] = {}
            for student, values in theta.items():
                for key, value in values.items():
                    if key.startswith(_PLUGIN_PREFIX):
                        module, _, pname = key[len(_PLUGIN_PREFIX):].partition("/")
                        bound.setdefault(student, {}).setdefault(module, {})[pname] = value
            return bound

        # only the lookahead's loss is differentiated twice (the exact hypergradient)
        exact = self.task.twice_differentiable if self.meta_config.hypergradient == "second_order" else nullcontext
        # what the weight and target hooks read at the unperturbed parameters (the first call): the
        # finite-difference calls at perturbed ones reuse it, so it stays the constant it is for
        # the exact hypergradient (detached inputs change with the parameters; their gradient is 0)
        signals: dict[str, Knowledge] = {}

        def train_loss(theta: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
            with exact():
                records = {n: run(n, theta[n], batch, i, context, "lookahead") for i, n in enumerate(names)}
            self._lookahead_modules = bind(theta)
            try:
                loss = self.cohort_loss(batch, records, teacher_records, phase="lookahead", signals=signals or None)[0]
                if not signals:
                    signals.update({n: r.detach() for n, r in records.items()})
                return loss
            finally:
                self._lookahead_modules = None

        def meta_loss(theta: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
            records = {n: run(n, theta[n], meta_batch, 0, meta_context, "meta") for n in names}
            self._lookahead_modules = bind(theta)
            try:
                value = self.hook.collab_distill_meta_objective(engine=self, batch=meta_batch, records=records)
            finally:
                self._lookahead_modules = None
            if value is None:
                raise ConfigError("no plugin provides a meta objective")
            return value

        meta_params = [p for m in self.meta_modules.values() for p in m.parameters() if p.requires_grad]
        optimizers = {n: unwrap_optimizer(o) for n, o in self.optimizers.items()}
        grads, value = hypergradient(
            params=params, meta_params=meta_params, train_loss=train_loss, meta_loss=meta_loss,
            optimizers=optimizers, config=self.meta_config,
        )
        return meta_params, grads, value

    def flush_meta_history(self) -> None:
        """Move the meta steps since the last flush to ``meta_history`` and the loggers, each at the
        step it belongs to (one host transfer; called on logging steps, at epoch end and before a
        checkpoint)."""
        if not self._pending_meta:
            return
        values = torch.stack([v for _, v in self._pending_meta]).cpu().tolist()
        for (step, _), (loss, norm) in zip(self._pending_meta, values):
            self.meta_history.append({"step": step, "loss": loss, "grad_norm": norm})
            self.log_dict({"train/meta/loss": loss, "train/meta/grad_norm": norm}, step=step + 1)
        self._pending_meta.clear()

    def _reduce_meta_grads(self, params: list[nn.Parameter]) -> None:
        assert self.fabric is not None
        if self.fabric.world_size == 1 or not params:
            return
        flat = torch.cat([p.grad.flatten() for p in params])  # type: ignore[union-attr]
        # all_reduce returns the type it is given (its stubs: any collection)
        flat = cast(Tensor, self.fabric.all_reduce(flat, reduce_op="mean"))
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def _sync_module_buffers(self) -> None:
        """Average the floating buffers (BatchNorm statistics) of meta and plugin modules across
        ranks: each rank moves them with its own batches, and, unlike the students, no DDP
        forward in evaluation broadcasts them again."""
        assert self.fabric is not None
        if self.fabric.world_size == 1:
            return
        modules = [*self.meta_modules.values(), *(m for mods in self.plugin_modules.values() for m in mods.values())]
        for module in modules:
            for b in module.buffers():
                if b.is_floating_point():
                    b.copy_(cast(Tensor, self.fabric.all_reduce(b, reduce_op="mean")))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, split: str, members: Optional[Mapping[str, nn.Module]] = None) -> dict[str, dict[str, float]]:
        """Metrics of every student (or of ``members``) on ``split``."""
        return evaluate(self, split, members)


    # ------------------------------------------------------------------ fit

    def prepare(self, resume: Optional[str] = None, allow_changes: bool = False) -> None:
        """Everything ``fit`` does before its first step: set up, open (or, with ``resume``, reuse)
        the run folder, pre-train teachers, prepare training, restore the checkpoint.

        ``allow_changes``: resume although the config differs from the run's in more than
        :data:`~collab_distill.run_folder.RESUMABLE_CHANGES` (recorded in ``resumes.json``)."""
        self.fitting = True
        self.setup()
        point = resolve_resume(self, resume, allow_changes, nested=self._run_dir_override is not None)
        if self._run_dir_override is None:
            check_run_target(self, point)
        # a nested run (in-run teacher training, a stage) writes inside its parent's locked folder
        self.run_dir = open_run_dir(self, point, self._run_dir_override, lock=self._run_dir_override is None)
        state = point.state if point is not None else None
        # no checkpoint yet (killed while training teachers): the run's own steps start again
        resume_step = state["loop"]["global_step"] if state is not None else (0 if point is not None else None)
        self.loggers = make_loggers(list(self.trainer.loggers), self.run_dir, resume_step)
        train_teachers(self)
        self.prepare_training()
        if state is not None:
            restore(self, state)

    def release_run_folder(self) -> None:
        """Unlock the run folder (at the end of ``fit``, however it ends)."""
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        """Log to the run's loggers (rank 0 writes)."""
        assert self.fabric is not None
        if self.fabric.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(dict(metrics), step)

    def finalize_loggers(self) -> None:
        for logger in self.loggers:
            logger.finalize("success")

    def fit(self, resume: Optional[str] = None, allow_changes: bool = False) -> dict[str, Any]:
        """Train the cohort; returns (and writes) the run's results.

        ``resume``: a run's checkpoint, its folder, or ``last`` (the newest unfinished run of this
        config); ``allow_changes``: see :meth:`prepare`."""
        try:
            if self.stages:
                from collab_distill.stages import fit_stages

                return fit_stages(self, resume, allow_changes)
            return self._fit(resume, allow_changes)
        finally:
            self.release_run_folder()

    def _fit(self, resume: Optional[str], allow_changes: bool) -> dict[str, Any]:
        self.prepare(resume, allow_changes)
        self.hook.collab_distill_fit_start(engine=self)
        fabric = self.fabric
        assert fabric is not None
        loader, sampler = self.loaders["train"]
        steps_per_epoch = min(len(loader), self.trainer.limit_train_batches or len(loader))
        stop = False
        while self.epoch < self.trainer.max_epochs and not stop:
            sampler.select_epoch(self.epoch, self.batch_in_epoch)
            for m in self.students.values():
                m.train()
            started = time.perf_counter()
            title = f"epoch {self.epoch + 1}/{self.trainer.max_epochs}"
            with console.progress(fabric, title, steps_per_epoch - self.batch_in_epoch, self.trainer.progress_bar) as bar:
                for batch in loader:
                    if self.batch_in_epoch >= steps_per_epoch:
                        break
                    batch = self.task.move_batch(batch, fabric)
                    logs = self.training_step(batch)
                    self.global_step += 1
                    self.batch_in_epoch += 1
                    self.hook.collab_distill_train_step_end(engine=self, step=self.global_step, losses=logs)
                    if self.global_step % self.trainer.log_every_n_steps == 0:
                        self.log_dict({f"train/{k}": float(v) for k, v in logs.items()}, step=self.global_step)
                    logged = self.global_step % self.trainer.log_every_n_steps == 0
                    bar.advance(float(logs["loss"]) if bar.enabled and logged else None)
                    if self.trainer.checkpoint_every_n_steps and self.global_step % self.trainer.checkpoint_every_n_steps == 0:
                        self.save_checkpoint()
                    if self.trainer.max_steps is not None and self.global_step >= self.trainer.max_steps:
                        stop = True
                        break
            if stop and self.batch_in_epoch < steps_per_epoch:
                self.save_checkpoint()
                break
            self._end_epoch(time.perf_counter() - started)
        results = self._finish()
        return results

    def _end_epoch(self, seconds: float) -> None:
        assert self.fabric is not None
        self._check_finite()
        self.flush_meta_history()
        self._sync_module_buffers()
        for scheduler in self.schedulers.values():
            scheduler.step()
        row: dict[str, Any] = {"epoch": self.epoch + 1, "seconds": round(seconds, 3)}
        last = self.epoch + 1 == self.trainer.max_epochs
        if (self.epoch + 1) % self.trainer.val_every_n_epochs == 0 or last:
            metrics = self.evaluate("val")
            for name, values in metrics.items():
                for key, value in values.items():
                    row[f"{name}/val_{key}"] = value
                self._track_best(name, values)
            self.log_dict({f"val/{k}": v for k, v in row.items() if "/" in k}, step=self.global_step)
            console.epoch_table(self.fabric, row, list(self.students), self.task_selection_metric)
        self.history.append(row)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.hook.collab_distill_epoch_end(engine=self, epoch=self.epoch, metrics=row)
        if self.epoch % self.trainer.checkpoint_every_n_epochs == 0 or last:
            self.save_checkpoint()

    @property
    def task_selection_metric(self) -> str:
        return getattr(self.task, "selection_metric", "top1")

    def _track_best(self, name: str, values: Mapping[str, float]) -> None:
        key = self.task_selection_metric
        value = values.get(key)
        if value is None:
            return
        current = self.best.get(name)
        if current is None or value > current["value"]:
            state = {k: v.detach().cpu().clone() for k, v in unwrap(self.students[name]).state_dict().items()}
            self.best[name] = {"value": value, "epoch": self.epoch + 1, "state": state}

    def _finish(self) -> dict[str, Any]:
        """Test every student with its last and its best-on-val weights; write results.json."""
        assert self.fabric is not None and self.run_dir is not None
        if self.trainer.max_steps is not None and self.epoch < self.trainer.max_epochs:
            results: dict[str, Any] = {"status": "stopped", "global_step": self.global_step, "epoch": self.epoch}
            if self.fabric.is_global_zero:
                write_json(results, self.run_dir / "results.json")
            self.finalize_loggers()
            return results
        last = self.evaluate("test")
        best_members = {}
        for name, model in self.students.items():
            entry = self.best.get(name)
            clone = copy.deepcopy(unwrap(model))
            if entry is not None:
                clone.load_state_dict(entry["state"])
            best_members[name] = clone
        best = self.evaluate("test", best_members)
        last_val = self.history[-1] if self.history else {}
        students: dict[str, Any] = {}
        for name in self.students:
            entry = self.best.get(name, {})
            students[name] = {
                **self.model_summary.get(name, {}),
                "last": {
                    "epoch": self.epoch,
                    **{f"val_{k.split('/val_', 1)[1]}": v for k, v in last_val.items() if k.startswith(f"{name}/val_")},
                    **{f"test_{k}": v for k, v in last[name].items()},
                },
                "best_on_val": {
                    "epoch": entry.get("epoch"),
                    f"val_{self.task_selection_metric}": entry.get("value"),
                    **{f"test_{k}": v for k, v in best[name].items()},
                },
            }
        results = {
            "status": "finished",
            "seed": self.seed,
            "epochs": self.epoch,
            "global_step": self.global_step,
            "selection_metric": self.task_selection_metric,
            "students": students,
            "teachers": {n: self.model_summary.get(n, {}) for n in self.teachers},
            "history": self.history,
        }
        if self.resumes:
            results["resumes"] = self.resumes
        if self.has_meta:
            results["meta"] = meta_summary(self.meta_history)
            if results["meta"]["zero_grad_share"] == 1.0:
                steps = len(self.meta_history)
                console.plain(self.fabric, f"[warning] the meta modules' gradient was exactly zero at all {steps} "
                                          "meta steps: the meta objective does not reach them, so they never learned")
        if self.teachers:
            teacher_test = self.evaluate("test", self.teachers)
            for name, values in teacher_test.items():
                results["teachers"][name]["test"] = values
        if self.fabric.is_global_zero:
            write_json(results, self.run_dir / "results.json")
            console.results_table(self.fabric, results)
            console.info(self.fabric, f"run folder: {self.run_dir}")
        self.finalize_loggers()
        self.hook.collab_distill_fit_end(engine=self, results=results)
        if self.fabric.is_global_zero:
            sections = self.hook.collab_distill_report_sections(engine=self, results=results)
            write_sections(self.run_dir, [section for group in sections if group for section in group])
        return results

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """What ``last.ckpt`` holds (see :func:`collab_distill.run_folder.checkpoint_state`)."""
        return checkpoint_state(self)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/last.ckpt`` atomically (once, from rank 0)."""
        assert self.fabric is not None and self.run_dir is not None
        self._check_finite()  # never write a NaN state over a good checkpoint
        self.flush_meta_history()
        # a meta module's BatchNorm statistics move with each rank's local batches between meta
        # steps: save (and evaluate) their cross-rank mean, so every rank holds the same module
        self._sync_module_buffers()
        path = self.run_dir / "checkpoints" / "last.ckpt"
        state = self.checkpoint_state()
        if self.fabric.is_global_zero:
            atomic_save(state, path)
            for logger in self.loggers:  # what was logged up to this checkpoint survives a kill
                logger.save()
        self.fabric.barrier()
        return path


    # ------------------------------------------------------------------ validate / test

    def evaluate_checkpoint(
        self, split: str, checkpoint: Optional[str], which: str = "last", output_dir: Optional[str] = None
    ) -> dict[str, Any]:
        """``collab-distill validate|test`` (see :func:`collab_distill.evaluation.evaluate_checkpoint`)."""
        return evaluate_checkpoint(self, split, checkpoint, which, output_dir)



#: lookahead parameters of plugin modules: ``"<prefix><module name>/<parameter name>"``
_PLUGIN_PREFIX = "@plugin:"
