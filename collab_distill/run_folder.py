"""The run folder: where a run writes, what a checkpoint holds, and how a run resumes.

``root_dir/name/version_N/`` holds ``config.yaml``, ``versions.json``, ``models.json``,
``checkpoints/last.ckpt`` (everything needed to continue bit for bit), ``logs/`` and
``results.json``. A new run never reuses a folder; ``--resume`` continues in the checkpoint's.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

import yaml

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: run folders are not locked
    fcntl = None  # type: ignore[assignment]

from collab_distill import console
from collab_distill.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    new_run_dir,
    rng_state,
    set_rng_state,
    state_dict_mismatch,
    versions,
    write_json,
)
from collab_distill.config import check_writable_folder
from collab_distill.task import ConfigError
from collab_distill.wrapping import unwrap

if TYPE_CHECKING:
    from lightning_fabric.loggers import Logger

    from collab_distill.config import TrainerConfig
    from collab_distill.engine import Engine

__all__ = [
    "ResumePoint", "RunLock", "RunFolderBusy", "lock_holder", "check_run_target", "RESUMABLE_CHANGES", "config_changes",
    "resolve_resume", "open_run_dir", "make_loggers", "checkpoint_state", "restore",
]


def run_name(trainer: TrainerConfig) -> str:
    return trainer.name or "run"


#: Config keys a resume may change without ``--resume_changes allow``: where the run stops, how it
#: logs and checkpoints, and the hardware it runs on (``trainer.max_epochs`` only upwards). Any
#: other difference (seed, method, models, data, optimizer, ...) would make the run's config and
#: its results disagree.
RESUMABLE_CHANGES = (
    "trainer.max_epochs", "trainer.max_steps", "trainer.loggers", "trainer.log_every_n_steps",
    "trainer.progress_bar", "trainer.checkpoint_every_n_epochs", "trainer.checkpoint_every_n_steps",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.root_dir", "trainer.name", "trace_plugins",
)

_ABSENT = "(absent)"


@dataclass
class ResumePoint:
    """Where ``--resume`` continues: the run folder, its checkpoint's state (``None``: the run wrote
    no checkpoint yet, e.g. it was killed while training its teachers), and how this invocation's
    config differs from the run's (``{key: (run's value, this value)}``)."""

    run_dir: Optional[Path]  # None: a checkpoint file outside a run folder continues in a new folder
    state: Optional[dict[str, Any]]
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(node, list) and any(isinstance(item, (dict, list)) for item in node):
        out = {}
        for i, item in enumerate(node):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: node}


def config_changes(run_text: str, new_text: str) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (run's value, new value)}`` for every leaf two config dumps disagree on."""
    old = _flatten(yaml.safe_load(run_text) or {})
    new = _flatten(yaml.safe_load(new_text) or {})
    return {
        key: (old.get(key, _ABSENT), new.get(key, _ABSENT))
        for key in sorted(set(old) | set(new))
        if old.get(key, _ABSENT) != new.get(key, _ABSENT)
    }


def _allowed(key: str, old: Any, new: Any) -> bool:
    if not any(key == k or key.startswith((k + ".", k + "[")) for k in RESUMABLE_CHANGES):
        return False
    if key == "trainer.max_epochs":  # an extension, never a cut below what was planned
        return isinstance(old, int) and isinstance(new, int) and new >= old
    return True


def disallowed_changes(changes: Mapping[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    return {k: v for k, v in changes.items() if not _allowed(k, *v)}


def _describe(changes: Mapping[str, tuple[Any, Any]], limit: int = 8) -> str:
    parts = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changes.items())[:limit]]
    more = f"; and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(parts) + more


def _run_config(run_dir: Path) -> Optional[str]:
    path = run_dir / "config.yaml"
    return path.read_text() if path.is_file() else None


def _finished_epochs(run_dir: Path) -> Optional[int]:
    """The epochs of a finished run (``results.json`` status ``finished``), else ``None``."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return int(results.get("epochs", 0)) if results.get("status") == "finished" else None


def _version_folders(base: Path) -> list[Path]:
    """``base/version_N`` folders, newest (highest N) first."""
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _latest_matching_run(engine: Engine, allow: bool) -> Path:
    """``--resume last``: the newest run folder of this experiment whose config equals this one
    (up to :data:`RESUMABLE_CHANGES`); never a run of another seed or config, never a finished run
    that this config would not extend, never a run another process is training."""
    base = Path(engine.trainer.root_dir) / run_name(engine.trainer)
    runs = [r for r in _version_folders(base) if (r / "checkpoints" / "last.ckpt").is_file() or (r / "config.yaml").is_file()]
    if not runs:
        raise ConfigError(
            f"--resume last: no run with checkpoints/last.ckpt under {base}; give the checkpoint path instead, "
            "or start a new run without --resume"
        )
    others: list[str] = []
    for run in runs:
        text = _run_config(run)
        if engine.config_text is not None and text is not None:
            wrong = disallowed_changes(config_changes(text, engine.config_text))
            if wrong:
                others.append(f"{run.name} ({_describe(wrong, 3)})")
                continue
        holder = lock_holder(run)
        if holder is not None:
            raise RunFolderBusy(
                f"--resume last: the newest run with this config, {run}, is being trained by another process "
                f"({holder}); wait for it to finish (or stop it), or start a new run without --resume"
            )
        epochs = _finished_epochs(run)
        if epochs is not None and epochs >= engine.trainer.max_epochs:
            unfinished = [r.name for r in runs if r != run and _finished_epochs(r) is None]
            raise ConfigError(
                f"--resume last: the newest run with this config, {run}, has finished all {epochs} epochs; "
                "there is nothing to resume. Start a new run without --resume, raise --trainer.max_epochs to "
                "extend it" + (f", or resume an unfinished run by its folder ({', '.join(unfinished[:3])})" if unfinished else "")
            )
        return run
    hint = " (--resume_changes allow accepts the differences when the run is named by its folder)" if not allow else ""
    raise ConfigError(
        f"--resume last: no run under {base} has this config; " + "; ".join(others[:3])
        + f". Give the config the run was started with, or name the run with --resume {runs[0]}{hint}"
    )


def _check_fits(engine: Engine, state: Mapping[str, Any], path: Path) -> None:
    """Every student and teacher of the checkpoint has the built model's keys and shapes."""
    missing = set(engine.students) - set(state["students"])
    if missing:
        raise ConfigError(f"--resume {path}: the checkpoint has no student(s) {sorted(missing)}; "
                          f"it has {sorted(state['students'])}")
    pools = [("student", engine.students, state["students"]), ("teacher", engine.teachers, state.get("teachers", {}))]
    for kind, members, saved in pools:
        for name, model in members.items():
            if name not in saved:
                continue
            mismatch = state_dict_mismatch(unwrap(model).state_dict(), saved[name], limit=3)
            if mismatch is not None:
                raise ConfigError(
                    f"--resume {path}: {kind} {name!r} of the checkpoint does not fit the configured model "
                    f"({mismatch}); resume with the config the run was started with (its config.yaml)"
                )


def resolve_resume(
    engine: Engine, resume: Optional[str], allow_changes: bool = False, nested: bool = False
) -> Optional[ResumePoint]:
    """What ``--resume`` names (a checkpoint, a run folder, or ``last``), checked against this
    config and cohort before anything is written. ``nested``: the engine is a run inside another
    run's folder (its teacher training, a stage), which its parent resumes."""
    if resume is None:
        return None
    run_dir: Optional[Path]
    if resume == "last":
        run_dir = _latest_matching_run(engine, allow_changes)
        path = run_dir / "checkpoints" / "last.ckpt"
    else:
        given = Path(resume)
        path = given / "checkpoints" / "last.ckpt" if given.is_dir() else given
        # a copied checkpoint (not in some run's checkpoints/) continues in a new run folder
        run_dir = given if given.is_dir() else (
            path.resolve().parent.parent if path.resolve().parent.name == "checkpoints" else None
        )
        if given.is_dir() and not path.is_file() and not (given / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: this folder is not a run folder (no checkpoints/last.ckpt, no config.yaml)")
    parent = run_dir.parent.parent if run_dir is not None else None
    inner = run_dir is not None and run_dir.parent.name in ("teachers", "stages")
    if not nested and run_dir is not None and parent is not None and inner and (parent / "models.json").is_file():
        raise ConfigError(
            f"--resume {resume}: this is the run of one {run_dir.parent.name[:-1]} inside the run {parent}; "
            f"resume that run (--resume {parent}), which continues its {run_dir.parent.name} where they stopped"
        )
    state: Optional[dict[str, Any]] = None
    if path.is_file() or resume != "last" and not Path(resume).is_dir():
        state = load_checkpoint(path, field="--resume")
        state["_path"] = path
    saved_text = state.get("config") if state is not None else _run_config(run_dir) if run_dir is not None else None
    changes: dict[str, tuple[Any, Any]] = {}
    if engine.config_text is not None and saved_text:
        changes = config_changes(saved_text, engine.config_text)
        wrong = disallowed_changes(changes)
        if wrong and not allow_changes:
            raise ConfigError(
                f"--resume {resume}: this config differs from the run's ({run_dir or path}) in "
                f"{_describe(wrong)}. Resume with the run's config (only {', '.join(RESUMABLE_CHANGES[:4])}, "
                "logging, checkpointing and devices may change), start a new run without --resume, or accept "
                "the differences with --resume_changes allow (they are recorded in the run's resumes.json)"
            )
    if state is not None:
        _check_fits(engine, state, path)
        epochs = int(state["loop"]["epoch"])
        if epochs > engine.trainer.max_epochs:
            raise ConfigError(
                f"--resume {resume}: the checkpoint is at epoch {epochs}, past trainer.max_epochs="
                f"{engine.trainer.max_epochs}; raise --trainer.max_epochs"
            )
    return ResumePoint(run_dir=run_dir, state=state, changes=changes)


def check_run_target(engine: Engine, point: Optional[ResumePoint]) -> None:
    """The folder the run will write in (the resumed run's, else ``trainer.root_dir``) takes new
    files: checked before any work, with nothing created."""
    if point is not None and point.run_dir is not None:
        check_writable_folder(str(point.run_dir), "resume")
    else:
        check_writable_folder(engine.trainer.root_dir, "trainer.root_dir")


class RunFolderBusy(ConfigError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder (``run_dir/.lock``) while a process trains in it.

    ``fcntl.flock``: the kernel drops the lock when its process ends, however it ends (SIGKILL
    included), so a killed run never leaves a stale lock behind; probing a lock changes no file.
    The file names the holder. On systems without ``fcntl`` (Windows) folders are not locked.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise RunFolderBusy(
                f"the run folder {self.path.parent} is being trained by another process ({holder or 'unknown'}); "
                "wait for it to finish (or stop it), or start a new run without --resume"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None and fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock_holder(run_dir: Path) -> Optional[str]:
    """Who holds ``run_dir``'s lock (``None``: nobody); reads, never creates, the lock file."""
    path = Path(run_dir) / ".lock"
    if fcntl is None or not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # closing drops a shared lock taken here
    return None


#: files ``atomic_save`` and ``write_json`` write before renaming them into place
_PARTIAL = re.compile(r".+\.(ckpt|pt|pth|json)(\.[A-Za-z0-9_]+)?\.tmp")


def _remove_partial_files(run_dir: Path) -> list[Path]:
    """Files a killed writer left half-written (the lock guarantees no writer is running)."""
    removed = [p for p in run_dir.rglob("*.tmp") if p.is_file() and _PARTIAL.fullmatch(p.name)]
    for path in removed:
        path.unlink()
    return removed


def _record_resume(run_dir: Path, point: ResumePoint, config_text: Optional[str]) -> list[dict[str, Any]]:
    """Append this resume to ``resumes.json``; a changed config becomes ``config.yaml`` and the
    previous one is kept as ``config.<n>.yaml``."""
    path = run_dir / "resumes.json"
    try:
        resumes: list[dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:
        resumes = []
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checkpoint": None if point.state is None else str(point.state["_path"]),
        "from_step": None if point.state is None else point.state["loop"]["global_step"],
        "from_epoch": None if point.state is None else point.state["loop"]["epoch"],
        "changes": {k: {"run": old, "now": new} for k, (old, new) in point.changes.items()},
        "versions": versions(),
    }
    if point.changes and config_text is not None and (run_dir / "config.yaml").is_file():
        kept = run_dir / f"config.{len(resumes)}.yaml"
        os.replace(run_dir / "config.yaml", kept)
        entry["previous_config"] = kept.name
        (run_dir / "config.yaml").write_text(config_text)
    resumes.append(entry)
    write_json(resumes, path)
    return resumes


def open_run_dir(engine: Engine, point: Optional[ResumePoint], folder: Optional[Path] = None, lock: bool = True) -> Path:
    """Create (or, resuming, reuse) the run folder on rank 0 and tell every rank where it is.

    A new run writes its config, versions and model summary; a resumed one keeps them (they
    describe how the run started) and appends to ``resumes.json``. With ``lock`` (a run of its own,
    not one nested in a locked run's folder) rank 0 first locks the folder as ``engine.run_lock``
    and removes what killed writers left; a folder in use is an error raised on every rank."""
    fabric = engine.fabric
    assert fabric is not None
    if folder is not None:
        run_dir = Path(folder)
        if fabric.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
    elif point is not None and point.run_dir is not None:
        run_dir = point.run_dir
    else:
        created = new_run_dir(engine.trainer.root_dir, run_name(engine.trainer)) if fabric.is_global_zero else None
        # rank 0's path on every rank (None only on the other ranks' side of the broadcast)
        run_dir = Path(cast(Path, fabric.broadcast(created, src=0)))
    problem: Optional[str] = None
    if fabric.is_global_zero:
        try:
            if lock:
                engine.run_lock = RunLock(run_dir)
                engine.run_lock.acquire()
                for path in _remove_partial_files(run_dir):
                    console.info(fabric, f"removed {path}: a file a killed run left half-written")
            resumed = (run_dir / "config.yaml").is_file() or (run_dir / "models.json").is_file()
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            if point is not None and point.run_dir is not None and lock:
                engine.resumes = _record_resume(run_dir, point, engine.config_text)
            if engine.config_text is not None and not (run_dir / "config.yaml").exists():
                (run_dir / "config.yaml").write_text(engine.config_text)
            if not resumed:
                write_json(versions(), run_dir / "versions.json")
                write_json(engine.model_summary, run_dir / "models.json")
        except ConfigError as err:
            problem = str(err)
    problem = fabric.broadcast(problem, src=0)
    if problem is not None:
        raise ConfigError(problem)
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
    with warnings.catch_warnings():
        # Lightning warns that it deletes the old file: its rows are being carried over right here
        warnings.filterwarnings("ignore", message="Experiment logs directory")
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
