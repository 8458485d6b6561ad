"""The run folder: where a run writes and how a run resumes.

``root_dir/name/version_N/`` holds ``config.yaml``, ``versions.json``, ``models.json``,
``checkpoints/last.ckpt`` (everything needed to continue bit for bit), ``logs/`` and
``results.json``. A new run never reuses a folder; ``--resume`` continues in the checkpoint's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

import yaml

from collab_distill import console
from collab_distill.checkpoint import load_checkpoint, new_run_dir, state_dict_mismatch, versions, write_json
from collab_distill.config import check_writable_folder
from collab_distill.plugin_manager import PluginError
from collab_distill.run_lock import RunFolderBusy, RunLock, lock_holder, remove_partial_files
from collab_distill.run_logs import make_loggers
from collab_distill.task import ConfigError
from collab_distill.wrapping import unwrap

if TYPE_CHECKING:
    from collab_distill.config import TrainerConfig

__all__ = [
    "ResumePoint", "RunLock", "RunFolderBusy", "lock_holder", "check_run_target", "RESUMABLE_CHANGES", "config_changes",
    "resolve_resume", "open_run_dir", "open_for_fit", "RunFolder", "make_loggers", "Members",
]

#: ``(students, teachers)``: ``{name: module}`` each, as built for this config
Members = tuple[Mapping[str, Any], Mapping[str, Any]]


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


def _finished_message(resume: str, run: Path, epochs: int, unfinished: Sequence[str] = ()) -> str:
    """Why a run that finished all its epochs is not resumed, and what to do instead."""
    which = "the newest run with this config, " if resume == "last" else "the run "
    others = f", or resume an unfinished run by its folder ({', '.join(unfinished[:3])})" if unfinished else ""
    return (
        f"--resume {resume}: {which}{run}, has finished all {epochs} epochs; there is nothing to resume. "
        f"Start a new run without --resume, raise --trainer.max_epochs to extend it{others}"
    )


def _version_folders(base: Path) -> list[Path]:
    """``base/version_N`` folders, newest (highest N) first."""
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _latest_matching_run(trainer: TrainerConfig, config_text: Optional[str], allow: bool) -> Path:
    """``--resume last``: the newest run folder of this experiment whose config equals this one
    (up to :data:`RESUMABLE_CHANGES`); never a run of another seed or config, never a finished run
    that this config would not extend, never a run another process is training."""
    base = Path(trainer.root_dir) / run_name(trainer)
    runs = [r for r in _version_folders(base) if (r / "checkpoints" / "last.ckpt").is_file() or (r / "config.yaml").is_file()]
    if not runs:
        raise ConfigError(
            f"--resume last: no run with checkpoints/last.ckpt under {base}; give the checkpoint path instead, "
            "or start a new run without --resume"
        )
    others: list[str] = []
    for run in runs:
        text = _run_config(run)
        if config_text is not None and text is not None:
            wrong = disallowed_changes(config_changes(text, config_text))
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
        if epochs is not None and epochs >= trainer.max_epochs:
            unfinished = [r.name for r in runs if r != run and _finished_epochs(r) is None]
            raise ConfigError(_finished_message("last", run, epochs, unfinished))
        return run
    hint = " (--resume_changes allow accepts the differences when the run is named by its folder)" if not allow else ""
    raise ConfigError(
        f"--resume last: no run under {base} has this config; " + "; ".join(others[:3])
        + f". Give the config the run was started with, or name the run with --resume {runs[0]}{hint}"
    )


def _check_fits(members: Members, state: Mapping[str, Any], path: Path) -> None:
    """Every student and teacher of the checkpoint has the built model's keys and shapes."""
    students, teachers = members
    missing = set(students) - set(state["students"])
    if missing:
        raise ConfigError(f"--resume {path}: the checkpoint has no student(s) {sorted(missing)}; "
                          f"it has {sorted(state['students'])}")
    pools = [("student", students, state["students"]), ("teacher", teachers, state.get("teachers", {}))]
    for kind, group, saved in pools:
        for name, model in group.items():
            if name not in saved:
                continue
            mismatch = state_dict_mismatch(unwrap(model).state_dict(), saved[name], limit=3)
            if mismatch is not None:
                raise ConfigError(
                    f"--resume {path}: {kind} {name!r} of the checkpoint does not fit the configured model "
                    f"({mismatch}); resume with the config the run was started with (its config.yaml)"
                )


def resolve_resume(
    trainer: TrainerConfig, config_text: Optional[str], members: Members, resume: Optional[str],
    allow_changes: bool = False, nested: bool = False,
) -> Optional[ResumePoint]:
    """What ``--resume`` names (a checkpoint, a run folder, or ``last``), checked against this
    config (``trainer``, ``config_text``) and the built ``members`` (students, teachers) before
    anything is written. ``nested``: a run inside another run's folder (its teacher training, a
    stage), which its parent resumes."""
    if resume is None:
        return None
    run_dir: Optional[Path]
    if resume == "last":
        run_dir = _latest_matching_run(trainer, config_text, allow_changes)
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
    if run_dir is not None and not path.is_file() and (run_dir / "results.json").is_file():
        # only a run killed before its first checkpoint (while training its teachers) has none
        raise ConfigError(f"--resume {resume}: the run {run_dir} wrote its results but has no checkpoints/last.ckpt "
                          "to continue from; start a new run (without --resume)")
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
    if config_text is not None and saved_text:
        changes = config_changes(saved_text, config_text)
        wrong = disallowed_changes(changes)
        if wrong and not allow_changes:
            raise ConfigError(
                f"--resume {resume}: this config differs from the run's ({run_dir or path}) in "
                f"{_describe(wrong)}. Resume with the run's config (only {', '.join(RESUMABLE_CHANGES[:4])}, "
                "logging, checkpointing and devices may change), start a new run without --resume, or accept "
                "the differences with --resume_changes allow (they are recorded in the run's resumes.json)"
            )
    if not nested and resume != "last" and run_dir is not None:
        # as `--resume last`: a finished run this config does not extend would only be evaluated again
        # and its results.json rewritten
        finished = _finished_epochs(run_dir)
        if finished is not None and finished >= trainer.max_epochs:
            raise ConfigError(_finished_message(resume, run_dir, finished))
    if state is not None:
        _check_fits(members, state, path)
        epochs = int(state["loop"]["epoch"])
        if epochs > trainer.max_epochs:
            raise ConfigError(
                f"--resume {resume}: the checkpoint is at epoch {epochs}, past trainer.max_epochs="
                f"{trainer.max_epochs}; raise --trainer.max_epochs"
            )
    return ResumePoint(run_dir=run_dir, state=state, changes=changes)


def check_run_target(trainer: TrainerConfig, point: Optional[ResumePoint]) -> None:
    """The folder the run will write in (the resumed run's, else ``trainer.root_dir``) takes new
    files: checked before any work, with nothing created."""
    if point is not None and point.run_dir is not None:
        check_writable_folder(str(point.run_dir), "resume")
    else:
        check_writable_folder(trainer.root_dir, "trainer.root_dir")


def _resume_record(
    run_dir: Path, point: ResumePoint, config_text: Optional[str],
) -> tuple[list[dict[str, Any]], Callable[[], None]]:
    """This resume appended to the run's ``resumes.json`` entries, and the function that writes
    it: ``resumes.json``, and a changed config as ``config.yaml`` with the previous one kept as
    ``config.<n>.yaml``. Written when the resumed run saves its first checkpoint, so that a resume
    that fails before then changes nothing in the run folder."""
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
    swap_config = bool(point.changes) and config_text is not None and (run_dir / "config.yaml").is_file()
    if swap_config:
        entry["previous_config"] = f"config.{len(resumes)}.yaml"
    resumes.append(entry)

    def write() -> None:
        if swap_config:
            os.replace(run_dir / "config.yaml", run_dir / entry["previous_config"])
            (run_dir / "config.yaml").write_text(cast(str, config_text))
        write_json(resumes, path)

    return resumes, write


def _missing_folders(path: Path) -> list[Path]:
    """The folders ``path`` needs that do not exist yet, outermost first."""
    missing = []
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing.append(folder)
    return missing[::-1]


@dataclass
class RunFolder:
    """An open run folder: its path, rank 0's lock on it (``None`` for a run nested in a locked
    folder, and on other ranks), the run's ``resumes.json`` entries and its loggers.

    ``created``: the folders a new run created (rank 0; outermost first), which :meth:`discard`
    removes when the run stops on a config or plugin error before it saved anything.
    ``pending``: the resume record, written by :meth:`commit` with the resumed run's first checkpoint."""

    path: Path
    lock: Optional[RunLock] = None
    resumes: list[dict[str, Any]] = field(default_factory=list)
    loggers: list[Any] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)
    pending: Optional[Callable[[], None]] = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def close(self, error: Optional[BaseException] = None) -> None:
        """Release the lock; a new run that ``error`` stopped before it saved anything is removed
        (:meth:`discard`) when the error is a config error or a plugin's fault (an exception in
        its hook, a NaN its answer caused): nothing was trained. A run stopped by a non-finite loss
        of its own keeps its folder (its logs show the way there)."""
        self.release()
        if isinstance(error, (ConfigError, PluginError)) or getattr(error, "plugin", None) is not None:
            self.discard()

    def commit(self) -> None:
        """The run has a checkpoint of its own now: write what opening it deferred."""
        write, self.pending = self.pending, None
        if write is not None:
            write()

    def discard(self) -> bool:
        """Remove the folders this new run created if it saved nothing worth keeping (no
        checkpoint, trained teacher, stage or results), so that a run refused at its first step
        leaves no trace. Call after :meth:`release`; returns whether they were removed."""
        if not self.created or not self.path.is_dir():
            return False
        kept = ("checkpoints/*.ckpt", "teachers/*", "stages/*", "results.json")
        if any(next(self.path.glob(pattern), None) is not None for pattern in kept):
            return False
        shutil.rmtree(self.path)
        for folder in reversed(self.created[:-1]):  # its parents, innermost first, while empty
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []
        return True


def open_run_dir(
    fabric: Any, trainer: TrainerConfig, config_text: Optional[str], model_summary: Mapping[str, Any],
    point: Optional[ResumePoint], folder: Optional[Path] = None, lock: bool = True,
) -> RunFolder:
    """Create (or, resuming, reuse) the run folder on rank 0 and tell every rank where it is.

    A new run writes its config, versions and model summary; a resumed one keeps them (they
    describe how the run started) and appends to ``resumes.json``. With ``lock`` (a run of its own,
    not one nested in a locked run's folder) rank 0 first locks the folder and removes what killed
    writers left; a folder in use is an error raised on every rank."""
    created: list[Path] = []
    if folder is not None:
        run_dir = Path(folder)
        if fabric.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
    elif point is not None and point.run_dir is not None:
        run_dir = point.run_dir
    else:
        new_dir: Optional[Path] = None
        if fabric.is_global_zero:
            created = _missing_folders(Path(trainer.root_dir) / run_name(trainer))
            new_dir = new_run_dir(trainer.root_dir, run_name(trainer))
            created.append(new_dir)
        # rank 0's path on every rank (None only on the other ranks' side of the broadcast)
        run_dir = Path(cast(Path, fabric.broadcast(new_dir, src=0)))
    opened = RunFolder(run_dir, created=created)
    problem: Optional[str] = None
    if fabric.is_global_zero:
        try:
            if lock:
                opened.lock = RunLock(run_dir)
                opened.lock.acquire()
                for path in remove_partial_files(run_dir):
                    console.info(fabric, f"removed {path}: a file a killed run left half-written")
            resumed = (run_dir / "config.yaml").is_file() or (run_dir / "models.json").is_file()
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            if point is not None and point.run_dir is not None and lock:
                opened.resumes, opened.pending = _resume_record(run_dir, point, config_text)
            if config_text is not None and not (run_dir / "config.yaml").exists():
                (run_dir / "config.yaml").write_text(config_text)
            if not resumed:
                write_json(versions(), run_dir / "versions.json")
                write_json(dict(model_summary), run_dir / "models.json")
        except ConfigError as err:
            problem = str(err)
    problem = fabric.broadcast(problem, src=0)
    if problem is not None:
        raise ConfigError(problem)
    fabric.barrier()
    console.model_table(fabric, model_summary)
    return opened


def open_for_fit(
    trainer: TrainerConfig, config_text: Optional[str], fabric: Any, model_summary: Mapping[str, Any], members: Members,
    resume: Optional[str], allow_changes: bool, nested_in: Optional[str] = None,
) -> tuple[RunFolder, Optional[dict[str, Any]]]:
    """The run folder a fit writes in (new, or the resumed run's, checked before anything is
    written) with its loggers, and the checkpoint state to restore (``None``: start afresh).
    ``nested_in``: a run inside its parent's locked folder (in-run teacher training, a stage)."""
    point = resolve_resume(trainer, config_text, members, resume, allow_changes, nested=nested_in is not None)
    if nested_in is None:
        check_run_target(trainer, point)
    folder = open_run_dir(fabric, trainer, config_text, model_summary, point,
                          Path(nested_in) if nested_in is not None else None, lock=nested_in is None)
    saved = point.state if point is not None else None
    # no checkpoint yet (killed while training teachers): the run's own steps start again
    resume_step = saved["loop"]["global_step"] if saved is not None else (0 if point is not None else None)
    folder.loggers = make_loggers(list(trainer.loggers), folder.path, resume_step)
    return folder, saved
