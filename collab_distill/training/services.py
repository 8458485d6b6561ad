"""The run's lifecycle services, as built-in plugins on the public hooks (as detectron2's
trainer keeps checkpointing and evaluation in hooks, and pytest ships its own features as
plugins): best-on-validation tracking, checkpointing, and writing results and report sections.

The engine registers one of each per run (``--trace_plugins`` shows them like any plugin); the
loop itself only trains, evaluates and calls hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, cast

from collab_distill import console
from collab_distill.answers import AnswerSource, plugin_state
from collab_distill.checkpoint import write_json
from collab_distill.hookspecs import hookimpl
from collab_distill.report import write_sections
from collab_distill.training.bilevel import sync_buffers
from collab_distill.training.state import (
    CohortState,
    LoopState,
    check_plugin_state,
    load_run_state,
    save_run_state,
    task_info,
)
from collab_distill.wrapping import unwrap

if TYPE_CHECKING:
    from collab_distill.config import TrainerConfig
    from collab_distill.engine_view import EngineView

__all__ = ["BestOnValidation", "Checkpointing", "ResultsWriter", "ReportWriter", "services"]


class BestOnValidation:
    """Keeps each student's weights of its best validation epoch (``task.selection_metric``) in
    ``LoopState.best``; runs before other plugins' ``epoch_end`` so they see the same weights."""

    def __init__(self, loop: LoopState, metric: str) -> None:
        self.loop, self.metric = loop, metric

    @hookimpl(tryfirst=True)
    def collab_distill_epoch_end(self, engine: EngineView, epoch: int, metrics: Mapping[str, Any]) -> None:
        for name, model in engine.students.items():
            value = metrics.get(f"{name}/val_{self.metric}")
            if value is None:
                continue
            current = self.loop.best.get(name)
            if current is None or value > current["value"]:
                state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
                self.loop.best[name] = {"value": value, "epoch": epoch, "state": state}


class CheckpointHost(Protocol):
    """What checkpointing uses of the engine it serves."""

    fabric: Any
    run: Any
    state: CohortState
    loop: LoopState
    bilevel: Any
    hook: Any
    spec: Any

    @property
    def info(self) -> Any: ...

    @property
    def model_summary(self) -> dict[str, Any]: ...

    def check_finite(self) -> None: ...

    def flush_meta_history(self) -> None: ...


class Checkpointing:
    """Writes ``checkpoints/last.ckpt`` every ``trainer.checkpoint_every_n_steps`` steps, every
    ``checkpoint_every_n_epochs`` epochs and after the last one, and when ``max_steps`` stops
    the run (after other plugins' hooks, so their state of this step is in it); restores one on
    ``--resume``. Both through ``fabric.save``/``fabric.load``."""

    def __init__(self, trainer: TrainerConfig, save: Callable[[], Path]) -> None:
        self.trainer, self._save_now = trainer, save
        self._saved_at: Optional[int] = None

    def _save(self, step: int) -> None:
        if self._saved_at != step:
            self._save_now()
            self._saved_at = step

    def save(self, host: CheckpointHost) -> Path:
        """Write the checkpoint now: never a NaN state over a good one (checked first)."""
        assert host.fabric is not None and host.run is not None
        host.check_finite()
        host.flush_meta_history()
        # meta and plugin modules' BatchNorm statistics move with each rank's batches: save their mean
        sync_buffers(host.fabric, host.state.synced_modules())
        plugins = plugin_state(cast(AnswerSource, host))
        extra = {"meta_batches": host.bilevel.meta_batches, "model_summary": host.model_summary,
                 "config": host.spec.config_text, "task_info": task_info(host.info)}
        path = Path(host.run.path) / "checkpoints" / "last.ckpt"
        save_run_state(host.fabric, path, host.state, host.loop, extra, plugins)
        if host.fabric.is_global_zero:
            host.run.commit()  # a resumed run's record, now that it has a checkpoint of its own
            for logger in host.run.loggers:  # what was logged up to this checkpoint survives a kill
                logger.save()
        return path

    def restore(self, host: CheckpointHost, path: Path) -> None:
        """Put a checkpoint's state back into the prepared engine."""
        load_run_state(host.fabric, path, host.state, host.loop, {"meta_batches": host.bilevel.meta_batches},
                       lambda plugins: host.hook.collab_distill_load_state(engine=host, state=plugins))
        console.info(host.fabric, f"resumed from {path} at epoch {host.loop.epoch}, step {host.loop.global_step}")

    @hookimpl(trylast=True)
    def collab_distill_fit_start(self, engine: EngineView) -> None:
        """The plugins' state as a checkpoint would take it, checked before the first step: a state
        that cannot be saved stops the run now, not after an epoch of training."""
        check_plugin_state(plugin_state(cast(AnswerSource, engine)), "Nothing was trained yet.")

    @hookimpl(trylast=True)
    def collab_distill_train_step_end(self, engine: EngineView, step: int, losses: Mapping[str, Any]) -> None:
        every = self.trainer.checkpoint_every_n_steps
        if every and step % every == 0:
            self._save(step)

    @hookimpl(trylast=True)
    def collab_distill_epoch_end(self, engine: EngineView, epoch: int, metrics: Mapping[str, Any]) -> None:
        if epoch % self.trainer.checkpoint_every_n_epochs == 0 or epoch == self.trainer.max_epochs:
            self._save(engine.global_step)

    @hookimpl(tryfirst=True)
    def collab_distill_fit_stopped(self, engine: EngineView, results: Mapping[str, Any]) -> None:
        self._save(engine.global_step)


class ResultsWriter:
    """Writes ``results.json`` (rank 0) when the fit ends or stops, prints the results table,
    and stores every plugin's report sections (``report_sections.json``)."""

    @hookimpl(tryfirst=True)
    def collab_distill_fit_end(self, engine: EngineView, results: Mapping[str, Any]) -> None:
        assert engine.fabric is not None and engine.run_dir is not None
        if engine.fabric.is_global_zero:
            write_json(results, engine.run_dir / "results.json")
            console.results_table(engine.fabric, results)
            console.info(engine.fabric, f"run folder: {engine.run_dir}")

    @hookimpl
    def collab_distill_fit_stopped(self, engine: EngineView, results: Mapping[str, Any]) -> None:
        assert engine.fabric is not None and engine.run_dir is not None
        if engine.fabric.is_global_zero:
            write_json(results, engine.run_dir / "results.json")



class ReportWriter:
    """Asks every plugin for its report sections once the other ``fit_end`` hooks are done (what
    they wrote is there to draw from) and stores them in ``report_sections.json`` (rank 0)."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    @hookimpl(trylast=True)
    def collab_distill_fit_end(self, engine: EngineView, results: Mapping[str, Any]) -> None:
        assert engine.fabric is not None and engine.run_dir is not None
        if engine.fabric.is_global_zero:
            answers = self.hook.collab_distill_report_sections(engine=engine, results=results)
            write_sections(engine.run_dir, [section for group in answers if group for section in group])


def services(loop: LoopState, trainer: TrainerConfig, metric: str, save: Callable[[], Path], hook: Any) -> dict[str, Any]:
    """One instance of each service for a run, by plugin name."""
    return {"best_on_validation": BestOnValidation(loop, metric), "checkpointing": Checkpointing(trainer, save),
            "results": ResultsWriter(), "report": ReportWriter(hook)}
