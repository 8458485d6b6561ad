"""The run folder: where a run writes, what a checkpoint holds, and how a run resumes.

``root_dir/name/version_N/`` holds ``config.yaml``, ``versions.json``, ``models.json``,
``checkpoints/last.ckpt`` (everything needed to continue bit for bit), ``logs/`` and
``results.json``. A new run never reuses a folder; ``--resume`` continues in the checkpoint's.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

from collab_distill import console
from collab_distill.checkpoint import (
    CHECKPOINT_FORMAT,
    latest_run_dir,
    load_checkpoint,
    new_run_dir,
    rng_state,
    set_rng_state,
    versions,
    write_json,
)
from collab_distill.task import ConfigError
from collab_distill.wrapping import unwrap

if TYPE_CHECKING:
    from lightning_fabric.loggers import Logger

    from collab_distill.config import TrainerConfig
    from collab_distill.engine import Engine

__all__ = ["resolve_resume", "open_run_dir", "make_loggers", "checkpoint_state", "restore"]


def run_name(trainer: TrainerConfig) -> str:
    return trainer.name or "run"


def resolve_resume(engine: Engine, resume: Optional[str]) -> Optional[dict[str, Any]]:
    """The checkpoint ``--resume`` names (a path or ``last``), loaded and checked against the cohort."""
    if resume is None:
        return None
    if resume == "last":
        found = latest_run_dir(engine.trainer.root_dir, run_name(engine.trainer))
        if found is None:
            raise ConfigError(
                f"--resume last: no run with checkpoints/last.ckpt under {engine.trainer.root_dir}/{run_name(engine.trainer)}; "
                "give the checkpoint path instead"
            )
        path = found / "checkpoints" / "last.ckpt"
    else:
        path = Path(resume)
    state = load_checkpoint(path, field="--resume")
    missing = set(engine.students) - set(state["students"])
    if missing:
        raise ConfigError(f"--resume {path}: the checkpoint has no student(s) {sorted(missing)}; "
                          f"it has {sorted(state['students'])}")
    state["_path"] = path
    return state


def open_run_dir(engine: Engine, state: Optional[Mapping[str, Any]], folder: Optional[Path] = None) -> Path:
    """Create (or, resuming, reuse) the run folder on rank 0, write its config, versions and model
    summary, and tell every rank where it is."""
    fabric = engine.fabric
    assert fabric is not None
    if folder is not None:
        run_dir = Path(folder)
        run_dir.mkdir(parents=True, exist_ok=True)
    elif state is not None:
        run_dir = Path(state["_path"]).resolve().parent.parent
    else:
        created = new_run_dir(engine.trainer.root_dir, run_name(engine.trainer)) if fabric.is_global_zero else None
        # rank 0's path on every rank (None only on the other ranks' side of the broadcast)
        run_dir = Path(cast(Path, fabric.broadcast(created, src=0)))
    if fabric.is_global_zero:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if engine.config_text is not None and not (run_dir / "config.yaml").exists():
            (run_dir / "config.yaml").write_text(engine.config_text)
        write_json(versions(), run_dir / "versions.json")
        write_json(engine.model_summary, run_dir / "models.json")
    fabric.barrier()
    console.model_table(fabric, engine.model_summary)
    return run_dir


def make_loggers(kinds: list[Any], run_dir: Path, resume_step: Optional[int] = None) -> list[Logger]:
    """The run's loggers: ``csv`` and ``tensorboard`` write under ``run_dir/logs``; any other
    entry is a ready ``lightning_fabric.loggers.Logger`` (W&B, MLflow, ... by ``class_path``).

    ``resume_step``: the run resumes from a checkpoint written at this step; the CSV log keeps
    every row the run logged up to it (and drops later ones, which the resumed run logs again)."""
    from lightning_fabric.loggers import CSVLogger, Logger, TensorBoardLogger

    loggers: list[Logger] = []
    for kind in kinds:
        if kind == "csv":
            csv_logger = CSVLogger(root_dir=str(run_dir), name="logs", version="csv", flush_logs_every_n_steps=50)
            if resume_step is not None:
                _carry_over(csv_logger, resume_step)
            loggers.append(csv_logger)
        elif kind == "tensorboard":
            loggers.append(TensorBoardLogger(root_dir=str(run_dir), name="logs", version="tensorboard"))
        elif isinstance(kind, Logger):
            loggers.append(kind)
        else:
            raise ConfigError(f"trainer.loggers: {kind!r} is neither csv, tensorboard nor a lightning_fabric Logger (class_path)")
    return loggers


def _carry_over(logger: Any, resume_step: int) -> None:
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts: read the rows
    first, log those up to ``resume_step`` again through the logger and write them at once."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        step = int(float(row.pop("step")))
        if step <= resume_step:
            logger.log_metrics({k: float(v) for k, v in row.items() if v not in ("", None)}, step)
    logger.save()


def checkpoint_state(engine: Engine) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly where this one is."""
    info = engine.info
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "students": {n: unwrap(m).state_dict() for n, m in engine.students.items()},
        "teachers": {n: m.state_dict() for n, m in engine.teachers.items()},
        "optimizers": {n: o.state_dict() for n, o in engine.optimizers.items()},
        "schedulers": {n: s.state_dict() for n, s in engine.schedulers.items()},
        "meta_modules": {n: m.state_dict() for n, m in engine.meta_modules.items()},
        "plugin_modules": {s: {k: unwrap(m).state_dict() for k, m in mods.items()} for s, mods in engine.plugin_modules.items()},
        "meta_optimizers": {n: o.state_dict() for n, o in engine.meta_optimizers.items()},
        "meta_batches": engine.meta_batches.state_dict(),
        "loop": {"epoch": engine.epoch, "batch_in_epoch": engine.batch_in_epoch, "global_step": engine.global_step},
        "best": engine.best,
        "history": engine.history,
        "meta_history": engine.meta_history,
        "rng": rng_state(),
        "model_summary": engine.model_summary,
        "task_info": None if info is None else {
            "num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": list(info.image_size),
        },
        "config": engine.config_text,
        "versions": versions(),
        "plugins": {},
    }
    engine.hook.collab_distill_save_state(engine=engine, state=state["plugins"])
    return state


def restore(engine: Engine, state: Mapping[str, Any]) -> None:
    """Put a checkpoint's state back into a prepared engine (models, optimizers, loop, RNG, plugins)."""
    for name, model in engine.students.items():
        unwrap(model).load_state_dict(state["students"][name])
        engine.optimizers[name].load_state_dict(state["optimizers"][name])
        engine.schedulers[name].load_state_dict(state["schedulers"][name])
    for name, model in engine.teachers.items():
        if name in state["teachers"]:
            model.load_state_dict(state["teachers"][name])
    saved_modules = state.get("plugin_modules", {})
    for student, modules in engine.plugin_modules.items():
        for key, module in modules.items():
            if key not in saved_modules.get(student, {}):
                raise ConfigError(
                    f"--resume: the checkpoint has no plugin module {key!r} of student {student!r} "
                    f"(it has {sorted(saved_modules.get(student, {}))}); was it written with the same plugins?"
                )
            unwrap(module).load_state_dict(saved_modules[student][key])
    for name, module in engine.meta_modules.items():
        if name not in state["meta_modules"]:
            raise ConfigError(f"--resume: the checkpoint has no meta module {name!r}; was it written with the same plugins?")
        module.load_state_dict(state["meta_modules"][name])
        engine.meta_optimizers[name].load_state_dict(state["meta_optimizers"][name])
    engine.meta_batches.load_state_dict(state["meta_batches"])
    loop = state["loop"]
    engine.epoch, engine.batch_in_epoch, engine.global_step = loop["epoch"], loop["batch_in_epoch"], loop["global_step"]
    engine.best = dict(state["best"])
    engine.history = list(state["history"])
    engine.meta_history = list(state.get("meta_history", []))
    set_rng_state(state["rng"])
    engine.hook.collab_distill_load_state(engine=engine, state=state.get("plugins", {}))
    console.info(engine.fabric, f"resumed from {state['_path']} at epoch {engine.epoch}, step {engine.global_step}")
