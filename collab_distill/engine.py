"""The cohort training loop on Lightning Fabric: the set-up phases, :meth:`Engine.fit` and
:meth:`Engine.training_step`. What each student learns from comes from plugin hooks, what the run
holds from state objects (:mod:`collab_distill.training.state`); checkpoints, best-on-val and
results are built-in plugins (:mod:`collab_distill.training.services`). No method is named here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, cast

from lightning_fabric import Fabric
from torch import Tensor, nn

from collab_distill import console
from collab_distill.config import Cohort, TrainerConfig, check_optimizer
from collab_distill.data import Cycle, make_loader
from collab_distill.evaluation import evaluate, evaluate_into, read_for_evaluation, restore_for_evaluation
from collab_distill.loss import check_loss_weight_providers, cohort_loss
from collab_distill.meta import BilevelConfig
from collab_distill.nested import train_teachers
from collab_distill.optim import Constant, OptimizerCallable, Schedule, sgd
from collab_distill.plugin_manager import ROLES, NamedHookRelay, make_plugin_manager
from collab_distill.records import Knowledge, LossWeights
from collab_distill.run_folder import RunFolder, open_for_fit
from collab_distill.stages import Stage, check_stages, stage_list
from collab_distill.task import ConfigError, Task
from collab_distill.training import build as parts
from collab_distill.training.bilevel import BilevelStep, flush_meta_steps, sync_buffers
from collab_distill.training.forward import LazyRecords, MemberForward
from collab_distill.training.guards import NonFiniteGuard, NonFiniteLossError, check_trained_leaves
from collab_distill.training.results import assemble_results
from collab_distill.training.services import Checkpointing, services
from collab_distill.training.spec import RunSpec
from collab_distill.training.state import CohortState, LoopState, SetupResults, StepFlags
from collab_distill.training.view import StateView

__all__ = ["Engine", "NonFiniteLossError"]


class Engine(StateView):
    """Trains a cohort (students, frozen teachers, meta-learned modules) on a task. Arguments:
    ``task`` (data, the models' forward, metrics), ``cohort`` (students and teachers), ``trainer``
    (loop, hardware, run folder), ``optimizer`` and ``schedule`` (the students'), ``meta`` (when
    and how the bilevel step runs, if a plugin has meta modules), ``plugins`` (configured methods;
    always-on plugins come from entry points, less ``disable_plugins``), ``seed`` (initialisation,
    splits, data order, augmentation), ``trace_plugins`` (print every hook call), ``config_text``
    (saved beside checkpoints), ``fabric`` (share a parent's), ``run_dir`` (write there instead of
    a new ``root_dir/name/version_N``), ``stages`` (teacher-assistant chains,
    :mod:`collab_distill.stages`), ``role`` (``"fit"``, ``"teacher_training"`` or ``"stage"``).
    """

    def __init__(
        self, task: Task, cohort: Cohort, trainer: Optional[TrainerConfig] = None, optimizer: OptimizerCallable = sgd,
        schedule: Optional[Schedule] = None, meta: Optional[BilevelConfig] = None, plugins: Optional[list[Any]] = None,
        disable_plugins: Optional[list[str]] = None, seed: int = 0, trace_plugins: bool = False,
        config_text: Optional[str] = None, fabric: Optional[Fabric] = None, run_dir: Optional[str] = None,
        stages: Optional[list[Stage]] = None, role: str = "fit",
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"Engine: role {role!r} is not one of {', '.join(map(repr, ROLES))}")
        if not 0 <= seed < 2**32:  # numpy's (and Fabric's seed_everything's) range
            raise ConfigError(f"seed={seed} must be between 0 and 4294967295 (2**32 - 1)")
        #: everything the engine was built from (nested runs derive theirs from it)
        self.spec = RunSpec(task, cohort, trainer or TrainerConfig(), optimizer, schedule or Constant(),
                            meta or BilevelConfig(), list(plugins or []), list(disable_plugins or []), seed,
                            trace_plugins, config_text, run_dir, stage_list(stages), role)
        #: pluggy's plugin manager; call hooks through ``hook`` (a plugin's exception names it)
        self.pm = make_plugin_manager(self.spec.plugins, self.spec.disable_plugins, trace=trace_plugins)
        self.hook = NamedHookRelay(self.pm)
        self.fabric = fabric
        self.built = SetupResults()
        self.state = CohortState()
        self.loop = LoopState()
        self.run: Optional[RunFolder] = None
        self.fitting = False  # True inside fit(); validate/test of a checkpoint run with it False
        self.forward = MemberForward(task, None, self)
        self.bilevel = BilevelStep(view=self, task=task, cohort=self.state, config=self.spec.meta, hook=self.hook,
                                   forward=self.forward, loss=self.cohort_loss)
        self.guard = NonFiniteGuard(cohort.students, self.spec.trainer.log_every_n_steps)
        self.loaders: dict[str, Any] = {}
        self.flags = StepFlags()
        selection = getattr(task, "selection_metric", "top1")
        for name, service in services(self.loop, self.spec.trainer, selection, self.save_checkpoint, self.hook).items():
            self.pm.register(service, name=name)

    def build(self) -> None:
        """Build and check everything (Fabric, members, plugins' answers); writes no file, trains nothing."""
        if self.built.done:
            return
        if self.spec.stages:
            check_stages(self.spec.stages, self.cohort)
        self.fabric = self.fabric or parts.make_fabric(self.trainer)
        check_optimizer(self.spec.optimizer, "optimizer", self.fabric.device, key="optimizer")
        self.fabric.seed_everything(self.seed, verbose=False)
        self.built.info = self.task.setup(self.seed)
        teachers, students, self.built.model_summary = parts.build_members(self.task, self.built.info, self.cohort, self.seed)
        self.state.teachers.update(teachers)
        self.state.students.update(students)
        parts.check_warmup(self.trainer, self.cohort.students, self.fabric)
        self.hook.collab_distill_configure(engine=self)
        self.built.loss_terms = parts.collect_loss_terms(self)
        self.forward.features, self.built.feature_shapes = parts.capture_features(self, teachers, students)
        attached = self.hook.collab_distill_student_modules(engine=self)
        self.state.plugin_modules.update(parts.collect_plugin_modules(attached, students))
        self.built.meta_specs = parts.collect_meta_specs(self)
        for name, spec in self.built.meta_specs.items():
            check_optimizer(spec.optimizer, f"meta module {name!r}", self.fabric.device)
        check_loss_weight_providers(self)
        self.built.done = True

    def ready_training(self) -> None:
        """Set up (if not yet), place and wrap every trainable module for the strategy, and build
        optimizers, schedulers and loaders: everything a training step needs, without a run folder."""
        self.build()
        assert self.fabric is not None
        # forward hooks (requested features) do not fire inside a compiled graph: such members stay eager
        hooked = set(self.forward.features.members()) if self.forward.features is not None else set()
        self.flags.meta_trainable = parts.place_for_training(self.fabric, self.state, self.built.meta_specs, self.trainer,
                                                       self.spec.optimizer, self.spec.schedule, hooked)
        self.loaders = {s: make_loader(self.task, s, self.seed, self.fabric) for s in ("train", "meta", "val", "test")}
        self.bilevel.meta_batches = Cycle(*self.loaders["meta"])

    def open_run(self, resume: Optional[str] = None, allow_changes: bool = False) -> None:
        """Everything ``fit`` does before its first step: set up, open (or, with ``resume``, reuse)
        the run folder, pre-train teachers, prepare training, restore the checkpoint.

        ``allow_changes``: resume although the config differs from the run's in more than
        :data:`~collab_distill.run_folder.RESUMABLE_CHANGES` (recorded in ``resumes.json``)."""
        self.fitting = True
        self.build()
        self.run, saved = open_for_fit(self.trainer, self.spec.config_text, self.fabric, self.model_summary,
                                       (self.students, self.teachers), resume, allow_changes, self.spec.run_dir)
        train_teachers(self.spec, self.fabric, self.run.path, self.teachers, type(self))
        self.ready_training()
        if saved is not None:
            self.restore(saved["_path"])

    def student_module(self, student: str, name: str) -> Any:
        """A module a plugin attached to ``student``, callable in the current phase."""
        return self.bilevel.student_module(student, name)

    def teacher_records(self, batch: Any, context: Any = None) -> LazyRecords:
        """The frozen teachers' records of ``batch``, computed (no grad, under the run's autocast,
        with requested features) when first read."""
        return self.forward.lazy_teachers(self.fabric, self.teachers, batch, context)

    def cohort_loss(self, batch: Any, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge],
                    phase: str = "train", detailed: bool = True, signals: Optional[Mapping[str, Knowledge]] = None,
                    weights_out: Optional[dict[str, LossWeights]] = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The cohort's loss on one batch (see :func:`collab_distill.loss.cohort_loss`)."""
        return cohort_loss(self, batch, records, teacher_records, phase, detailed, signals, weights_out)

    def training_step(self, batch: Any) -> dict[str, Tensor | float]:
        """One optimisation step of every student (and a meta step when one is due)."""
        assert self.fabric is not None
        context = self.task.shared_context(batch, self.teachers, self.students)
        teacher_records = self.teacher_records(batch, context)
        if self.flags.teachers_used:
            # the teachers before the students, as a hand-written loop: computing them lazily after
            # the students' forward costs up to ~15% per step in allocator page faults
            teacher_records.resolve()
        meta_log = self.meta_step(batch, teacher_records, context) if self.meta_step_due() else {}
        records = {name: self.forward(name, model, batch, view=i, context=context, phase="train")
                   for i, (name, model) in enumerate(self.students.items())}
        detailed = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        loss, logs = self.cohort_loss(batch, records, teacher_records, phase="train", detailed=detailed)
        self.flags.teachers_used = teacher_records.resolved
        if not self.flags.leaves_checked:
            self.flags.leaves_checked = True
            owners = {cast(str, self.pm.get_name(p)): p for p in self.pm.get_plugins()}
            check_trained_leaves(loss, self.optimizers.values(), self.meta_modules.values(), owners)
        if self.trainer.detect_nonfinite:  # flags stay on the device; read on logging steps and before checkpoints
            self.guard.record(self.global_step, logs, loss)
            if detailed:
                self.check_finite()
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

    def check_finite(self) -> None:
        """Raise if any loss since the last check was NaN/inf (one host sync)."""
        last = self.run_dir / "checkpoints" / "last.ckpt" if self.run_dir is not None else None
        self.guard.check(self.epoch, lambda: str(last) if last is not None and last.is_file() else None)

    def meta_step_due(self) -> bool:
        """Whether this step runs the bilevel meta step (every rank decides alike)."""
        if not self.has_meta or self.in_warmup or not self.flags.meta_trainable:
            return False
        return self.bilevel.due(self.loop.epoch, self.loop.batch_in_epoch, self.loop.global_step)

    def meta_step(self, batch: Any, teacher_records: Mapping[str, Knowledge], context: Any) -> dict[str, Tensor]:
        """The bilevel step (:class:`~collab_distill.training.bilevel.BilevelStep`)."""
        step = self.global_step + 1  # numbered as train_step_end and the logged metrics number this step
        logs, values = self.bilevel.step(self.fabric, step, batch, teacher_records, context)
        self.flags.pending_meta.append((step, values))  # read on the host at the next logging step
        return logs

    def flush_meta_history(self) -> None:
        """Move the meta steps since the last flush to ``meta_history`` and the loggers (one host
        transfer; on logging steps, at epoch end and before a checkpoint)."""
        flush_meta_steps(self.flags.pending_meta, self.loop.meta_history, self.log_dict)


    def evaluate(self, split: str, members: Optional[Mapping[str, nn.Module]] = None) -> dict[str, dict[str, float]]:
        """Metrics of every student (or of ``members``) on ``split``; calls ``evaluation_end``."""
        members = dict(self.students) if members is None else dict(members)
        metrics = evaluate(self.task, self.fabric, self.loaders[split][0], members,
                           self.trainer.limit_eval_batches)
        self.hook.collab_distill_evaluation_end(engine=self, split=split, metrics=metrics)
        return metrics

    def batches(self, split: str) -> Any:
        """The loader of ``split`` (this rank's share)."""
        return self.loaders[split][0]

    def splits(self) -> list[str]:
        return list(self.loaders)  # all four once training is ready; the evaluated one in validate/test

    def hook_implementers(self, hook: str) -> list[Any]:
        """The plugin objects that implement ``hook`` (e.g. ``"collab_distill_soft_targets"``)."""
        return [impl.plugin for impl in getattr(self.pm.hook, hook).get_hookimpls()]

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        """Log to the run's loggers (rank 0 writes)."""
        assert self.fabric is not None
        if self.fabric.is_global_zero and self.run is not None:
            for logger in self.run.loggers:
                logger.log_metrics(dict(metrics), step)

    def fit(self, resume: Optional[str] = None, allow_changes: bool = False) -> dict[str, Any]:
        """Train the cohort; returns (and writes) the run's results.

        ``resume``: a run's checkpoint, its folder, or ``last`` (the newest unfinished run of this
        config); ``allow_changes``: see :meth:`prepare`."""
        try:
            if self.spec.stages:
                from collab_distill.stages import fit_stages

                self.fitting = True
                self.build()
                assert self.fabric is not None
                return fit_stages(self.spec, self.fabric, self.model_summary, self.teachers, type(self), resume, allow_changes)
            return self._fit(resume, allow_changes)
        finally:
            if self.run is not None:
                self.run.close(sys.exc_info()[1])

    def _fit(self, resume: Optional[str], allow_changes: bool) -> dict[str, Any]:
        self.open_run(resume, allow_changes)
        self.hook.collab_distill_fit_start(engine=self)
        fabric, loop, every = self.fabric, self.loop, self.trainer.log_every_n_steps
        assert fabric is not None
        loader, sampler = self.loaders["train"]
        steps_per_epoch = min(len(loader), self.trainer.limit_train_batches or len(loader))
        stop = False
        while loop.epoch < self.trainer.max_epochs and not stop:
            sampler.select_epoch(loop.epoch, loop.batch_in_epoch)
            for m in self.students.values():
                m.train()
            started = time.perf_counter()
            title = f"epoch {loop.epoch + 1}/{self.trainer.max_epochs}"
            with console.progress(fabric, title, steps_per_epoch - loop.batch_in_epoch, self.trainer.progress_bar) as bar:
                for batch in loader:
                    if loop.batch_in_epoch >= steps_per_epoch:
                        break
                    logs = self.training_step(self.task.move_batch(batch, fabric))
                    loop.global_step += 1
                    loop.batch_in_epoch += 1
                    if loop.global_step % every == 0:
                        self.log_dict({f"train/{k}": float(v) for k, v in logs.items()}, step=loop.global_step)
                    bar.advance(float(logs["loss"]) if bar.enabled and loop.global_step % every == 0 else None)
                    self.hook.collab_distill_train_step_end(engine=self, step=loop.global_step, losses=logs)
                    if self.trainer.max_steps is not None and loop.global_step >= self.trainer.max_steps:
                        stop = True
                        break
            if stop and loop.batch_in_epoch < steps_per_epoch:
                break
            self._end_epoch(time.perf_counter() - started)
        return self._finish()

    def _end_epoch(self, seconds: float) -> None:
        self.check_finite()
        self.flush_meta_history()
        sync_buffers(self.fabric, self.state.synced_modules())
        for scheduler in self.state.schedulers.values():
            scheduler.step()
        loop = self.loop
        row: dict[str, Any] = {"epoch": loop.epoch + 1, "seconds": round(seconds, 3)}
        if (loop.epoch + 1) % self.trainer.val_every_n_epochs == 0 or loop.epoch + 1 == self.trainer.max_epochs:
            for name, values in self.evaluate("val").items():
                row.update({f"{name}/val_{key}": value for key, value in values.items()})
            self.log_dict({f"val/{k}": v for k, v in row.items() if "/" in k}, step=loop.global_step)
            console.epoch_table(self.fabric, row, list(self.students), self.task_selection_metric)
        loop.history.append(row)
        loop.epoch += 1
        loop.batch_in_epoch = 0
        self.hook.collab_distill_epoch_end(engine=self, epoch=loop.epoch, metrics=row)

    def _finish(self) -> dict[str, Any]:
        """Test every student with its last and best-on-val weights; the services write the results."""
        assert self.fabric is not None and self.run is not None
        loop = self.loop
        if self.trainer.max_steps is not None and loop.epoch < self.trainer.max_epochs:
            results: dict[str, Any] = {"status": "stopped", "global_step": loop.global_step, "epoch": loop.epoch}
            self.hook.collab_distill_fit_stopped(engine=self, results=results)
        else:
            results = assemble_results(
                fabric=self.fabric, cohort=self.state, loop=loop, evaluate=self.evaluate, seed=self.seed,
                metric=self.task_selection_metric, summaries=self.model_summary, resumes=self.run.resumes,
                has_meta=self.has_meta)
        for logger in self.run.loggers:
            logger.finalize("success")
        if results["status"] == "finished":
            self.hook.collab_distill_fit_end(engine=self, results=results)
        return results


    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/last.ckpt`` through Fabric (the ``checkpointing`` service)."""
        return cast(Checkpointing, self.pm.get_plugin("checkpointing")).save(self)

    def restore(self, path: Path) -> None:
        """Put a checkpoint's state back into the prepared engine (through ``fabric.load``)."""
        cast(Checkpointing, self.pm.get_plugin("checkpointing")).restore(self, path)

    def evaluate_checkpoint(self, split: str, checkpoint: Optional[str], which: str = "last",
                            output_dir: Optional[str] = None) -> dict[str, Any]:
        """``collab-distill validate|test`` (see :func:`collab_distill.evaluation.restore_for_evaluation`)."""
        saved = read_for_evaluation(split, checkpoint)
        self.build()
        assert self.fabric is not None and checkpoint is not None
        folder = restore_for_evaluation(saved, checkpoint, which, output_dir, split=split, fabric=self.fabric,
                                        info=self.info, state=self.state, meta_specs=self.built.meta_specs)
        self.run = RunFolder(folder)
        self.loaders = {split: make_loader(self.task, split, self.seed, self.fabric)}
        return evaluate_into(self.fabric, folder, split, checkpoint, which, self.evaluate)
