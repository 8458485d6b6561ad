"""Staged runs: train the cohort's students in a sequence of runs, where the trained students of
earlier stages become frozen teachers of later ones.

This is how teacher-assistant chains are expressed (TAKD: teacher -> s -> xs -> xxs; DGKD: every
later student learns from the teacher and all trained assistants) without anything
method-specific in the engine: each stage is an ordinary engine fit with a sub-cohort and the
run's plugins, written to ``stages/<i>-<name>/`` inside the run
folder. A student hands down its best-on-validation weights (never chosen on test), as a teacher
trained inside a run does. Cohort teachers with ``train_epochs`` are trained once, before the
first stage, and shared by every stage that names them.

The run folder's ``results.json`` merges every student's results from its stage and lists the
stages; each stage folder has its own config, checkpoint, logs and results. ``--resume last`` (or
``--resume RUN_FOLDER``) skips finished stages and resumes the unfinished one from its checkpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from collab_distill import console
from collab_distill.checkpoint import atomic_save, write_json
from collab_distill.config import Cohort, Teacher
from collab_distill.nested import MakeEngine, nested_fit, train_teachers
from collab_distill.run_folder import RunFolder, check_run_target, open_run_dir, resolve_resume
from collab_distill.task import ConfigError
from collab_distill.wrapping import unwrap

if TYPE_CHECKING:
    from collab_distill.training.spec import RunSpec

__all__ = ["Stage", "stage_list", "check_stages", "fit_stages"]


@dataclass
class Stage:
    """One run of a staged fit.

    Args:
        name: the stage's folder name (``stages/<i>-<name>``).
        students: cohort students trained in this stage (each in exactly one stage).
        teachers: frozen teachers of this stage: cohort teachers, or students trained in an
            earlier stage (their best-on-val weights).
    """

    name: str
    students: list[str]
    teachers: list[str] = field(default_factory=list)


def stage_list(stages: Optional[list[Stage]]) -> Optional[list[Stage]]:
    """``stages`` as a list, ``None`` for an ordinary run; an empty list (one that lost its
    entries, or an override meant to drop them) is refused rather than silently read as ``null``."""
    if stages is not None and not list(stages):
        raise ConfigError("stages is an empty list: give at least one stage ({name, students, teachers}), or "
                          "stages: null (the default) for one ordinary run")
    return list(stages) if stages else None


def check_stages(stages: list[Stage], cohort: Cohort) -> None:
    """One clear error for a stage list that cannot run, before any training."""
    seen: dict[str, int] = {}
    names: set[str] = set()
    for i, stage in enumerate(stages):
        where = f"stages[{i}] ({stage.name!r})"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", stage.name):
            raise ConfigError(f"{where}.name must be letters, digits, '.', '-' or '_' (it names a folder)")
        if stage.name in names:
            raise ConfigError(f"{where}.name: two stages are named {stage.name!r}; names must be unique")
        names.add(stage.name)
        if not stage.students:
            raise ConfigError(f"{where}.students is empty: name the cohort students this stage trains")
        for student in stage.students:
            if student not in cohort.students:
                raise ConfigError(f"{where}.students names {student!r}, not a cohort student ({sorted(cohort.students)})")
            if student in seen:
                raise ConfigError(f"{where}.students: {student!r} is already trained in stages[{seen[student]}]")
            seen[student] = i
    for i, stage in enumerate(stages):
        for teacher in stage.teachers:
            if teacher in cohort.teachers or seen.get(teacher, i) < i:
                continue
            hint = (
                f"it is trained in stages[{seen[teacher]}], not before this stage" if teacher in seen
                else f"use a cohort teacher ({sorted(cohort.teachers)}) or a student of an earlier stage"
            )
            raise ConfigError(f"stages[{i}] ({stage.name!r}).teachers names {teacher!r}: {hint}")
    missing = [s for s in cohort.students if s not in seen]
    if missing:
        raise ConfigError(f"stages: student(s) {missing} are in no stage; add them to one stage's students")


def _stage_dir(run_dir: Path, index: int, stage: Stage) -> Path:
    return run_dir / "stages" / f"{index + 1}-{stage.name}"


def fit_stages(spec: RunSpec, fabric: Any, model_summary: Mapping[str, Any], teachers: Mapping[str, nn.Module],
               make_engine: MakeEngine, resume: Optional[str] = None, allow_changes: bool = False) -> dict[str, Any]:
    """Run ``spec.stages`` one after the other in a run folder of their own (locked while they
    run); returns (and writes) the merged results. The caller has set the run up (``fabric``,
    the members' ``model_summary``)."""
    stages = spec.stages
    assert stages
    check_stages(stages, spec.cohort)
    point = resolve_resume(spec.trainer, spec.config_text, ({}, {}), resume, allow_changes)
    if point is not None and point.state is not None:
        raise ConfigError(
            f"--resume {resume}: a staged run resumes from its run folder (the one holding stages/) or `last`, "
            "not from a checkpoint file"
        )
    check_run_target(spec.trainer, point)
    folder = open_run_dir(fabric, spec.trainer, spec.config_text, model_summary, point)
    folder.commit()  # each stage checkpoints in its own folder: the staged run records its resume now
    try:
        return _fit_stages(spec, fabric, folder, teachers, make_engine)
    finally:
        folder.release()


def _fit_stages(spec: RunSpec, fabric: Any, folder: RunFolder, teachers: Mapping[str, nn.Module],
                make_engine: MakeEngine) -> dict[str, Any]:
    stages, cohort, run_dir = spec.stages, spec.cohort, folder.path
    assert stages
    train_teachers(spec, fabric, run_dir, teachers, make_engine)
    handed_down: dict[str, Path] = {}
    stage_results: list[dict[str, Any]] = []
    students: dict[str, Any] = {}
    teachers_results: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    for index, stage in enumerate(stages):
        stage_folder = _stage_dir(run_dir, index, stage)
        weights = {s: stage_folder / "students" / f"{s}.pt" for s in stage.students}
        done = stage_folder / "results.json"
        results: Optional[dict[str, Any]] = None
        if done.is_file() and all(p.is_file() for p in weights.values()):
            results = json.loads(done.read_text())
            if results.get("status") != "finished":
                results = None
        if results is None:
            console.info(fabric, f"stage {index + 1}/{len(stages)} {stage.name!r}: "
                                 f"students {stage.students}, teachers {stage.teachers}")
            sub_teachers = {}
            for name in stage.teachers:
                if name in cohort.teachers:
                    own = cohort.teachers[name]
                    trained = run_dir / "teachers" / name / "teacher.pt"
                    checkpoint = own.checkpoint or (str(trained) if trained.is_file() else None)
                    sub_teachers[name] = Teacher(model=own.model, checkpoint=checkpoint,
                                                 train_epochs=0 if checkpoint else own.train_epochs)
                else:
                    sub_teachers[name] = Teacher(model=cohort.students[name], checkpoint=str(handed_down[name]))
            last = stage_folder / "checkpoints" / "last.ckpt"
            sub, results = nested_fit(
                spec, fabric, make_engine,
                Cohort(
                    students={s: cohort.students[s] for s in stage.students},
                    teachers=sub_teachers,
                    student_checkpoints={s: p for s, p in cohort.student_checkpoints.items() if s in stage.students},
                ),
                stage_folder, role="stage", plugins=spec.plugins, disable_plugins=spec.disable_plugins,
                resume=str(last) if last.is_file() else None, config_text=spec.config_text,
            )
            if fabric.is_global_zero:
                for s in stage.students:
                    state = sub.loop.best.get(s, {}).get("state") or unwrap(sub.students[s]).state_dict()
                    atomic_save(state, weights[s])
            fabric.barrier()
        handed_down.update(weights)
        students.update(results["students"])
        for name, info in results.get("teachers", {}).items():
            teachers_results.setdefault(name, info)
        seconds = sum(row.get("seconds", 0.0) for row in results.get("history", []))
        history += [{"stage": stage.name, **row} for row in results.get("history", [])]
        stage_results.append({
            "name": stage.name, "students": stage.students, "teachers": stage.teachers,
            "folder": str(stage_folder.relative_to(run_dir)), "train_seconds": round(seconds, 3),
        })
    merged = {
        "status": "finished",
        "seed": spec.seed,
        "epochs": spec.trainer.max_epochs,
        "selection_metric": getattr(spec.task, "selection_metric", "top1"),
        "students": {s: students[s] for s in cohort.students},
        "teachers": teachers_results,
        "stages": stage_results,
        "history": history,
        **({"resumes": folder.resumes} if folder.resumes else {}),
    }
    if fabric.is_global_zero:
        write_json(merged, run_dir / "results.json")
        console.results_table(fabric, merged)
        console.info(fabric, f"run folder: {run_dir}")
    return merged
