"""Evaluation of cohort members on a split, and ``collab-distill validate|test`` of a checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from collab_distill import console
from collab_distill.checkpoint import load_checkpoint, state_dict_mismatch, write_json
from collab_distill.task import ConfigError

if TYPE_CHECKING:
    from collab_distill.meta import MetaModule
    from collab_distill.task import Task, TaskInfo
    from collab_distill.training.state import CohortState

__all__ = ["evaluate", "evaluate_into", "read_for_evaluation", "restore_for_evaluation", "write_metrics"]


@torch.no_grad()
def evaluate(task: Task, fabric: Any, loader: Any, members: Mapping[str, nn.Module],
             limit_batches: Optional[int] = None) -> dict[str, dict[str, float]]:
    """Metrics of ``members`` on the batches of ``loader`` (gathered over ranks by the task's
    evaluators); every member is evaluated in eval mode and left in the mode it had."""
    evaluators = {name: task.evaluator(fabric) for name in members}
    modes = {name: m.training for name, m in members.items()}
    for m in members.values():
        m.eval()
    for i, batch in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        batch = task.move_batch(batch, fabric)
        for name, model in members.items():
            with fabric.autocast():
                outputs = task.predict(model, batch)
            evaluators[name].update(outputs, batch)
    for name, m in members.items():
        m.train(modes[name])
    return {name: ev.compute() for name, ev in evaluators.items()}


def read_for_evaluation(split: str, checkpoint: Optional[str]) -> dict[str, Any]:
    """The checkpoint ``collab-distill validate|test`` scores, read and checked before any set-up.

    ``checkpoint`` is required (``None`` is refused: scoring the untrained weights of the config
    looks like a result)."""
    if checkpoint is None:
        command = "validate" if split == "val" else "test"
        raise ConfigError(
            f"collab-distill {command}: --ckpt_path is required (without it the config's untrained students would be "
            f"scored); pass --ckpt_path runs/NAME/version_N/checkpoints/last.ckpt"
        )
    return load_checkpoint(checkpoint, field="--ckpt_path")


def restore_for_evaluation(
    saved: Mapping[str, Any], checkpoint: str, which: str, output_dir: Optional[str], *, split: str, fabric: Any,
    info: Optional[TaskInfo], state: CohortState, meta_specs: Mapping[str, MetaModule],
) -> Path:
    """Load a checkpoint's students (last or best-on-val weights), teachers and meta modules (a
    C-Net, so plugins can apply it in ``evaluation_end``) into ``state``, on the device; returns
    the folder the evaluation writes to: ``output_dir``, by default a new
    ``evaluations/<split>-<weights>[-N]`` beside the checkpoint's run (nothing is overwritten).

    A checkpoint of another run (other data, cohort or architecture) is a :class:`ConfigError`
    that says what does not match."""
    assert info is not None
    config = Path(checkpoint).parent.parent / "config.yaml"
    fix = (f"Evaluate it with the config of the run that wrote it: --config {config}" if config.is_file()
           else "Evaluate it with the config it was trained with")
    where = f"--ckpt_path {checkpoint}"
    saved_info = saved.get("task_info")
    if saved_info is not None:
        kept = (saved_info["num_classes"], saved_info["in_channels"])
        built = (info.num_classes, info.in_channels)
        if kept != built:
            raise ConfigError(
                f"{where}: the checkpoint was trained on data with {kept[0]} classes and {kept[1]} input channel(s); "
                f"the configured data has {built[0]} classes and {built[1]} input channel(s). {fix}."
            )
    best = saved["loop"].get("best", {})
    for name, model in state.students.items():
        if name not in saved["students"]:
            raise ConfigError(f"{where}: no student {name!r} in it (has {sorted(saved['students'])}). {fix}.")
        weights = best[name]["state"] if which == "best" and name in best else saved["students"][name]
        _load_member(model, weights, f"{where}: student {name!r}", fix)
    # the run's teachers too: a C-Net that reads their per-image losses needs the trained ones
    for name, model in state.teachers.items():
        if name in saved.get("teachers", {}):
            _load_member(model, saved["teachers"][name], f"{where}: teacher {name!r}", fix)
    state.students.update({n: fabric.to_device(m) for n, m in state.students.items()})
    state.teachers.update({n: fabric.to_device(m.eval().requires_grad_(False)) for n, m in state.teachers.items()})
    saved_meta = saved.get("meta_modules", {})
    for name, spec in meta_specs.items():
        if name in saved_meta:  # an untrained meta module is never applied as if it were the run's
            _load_member(spec.module, saved_meta[name], f"{where}: meta module {name!r}", fix)
            state.meta_modules[name] = fabric.to_device(spec.module)
    return _evaluation_dir(fabric, split, checkpoint, which, output_dir)


def evaluate_into(fabric: Any, folder: Path, split: str, checkpoint: str, which: str,
                  evaluate: Callable[[str], dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """``evaluate(split)``, its metrics written into ``folder``; an evaluation that fails (a
    plugin's ``evaluation_end``, say) before anything was written there removes the empty folder
    (and an ``evaluations/`` folder it was the first of), so a failed ``validate`` leaves no trace."""
    try:
        metrics = evaluate(split)
    except BaseException:
        if fabric.is_global_zero:
            for empty in (folder, folder.parent) if folder.parent.name == "evaluations" else (folder,):
                try:
                    empty.rmdir()  # only ever an empty folder
                except OSError:
                    break
        raise
    write_metrics(fabric, folder, split, checkpoint, which, metrics)
    return metrics


def write_metrics(fabric: Any, folder: Path, split: str, checkpoint: str, which: str,
                  metrics: Mapping[str, Mapping[str, float]]) -> None:
    """Print the metrics and write ``metrics.json`` (rank 0)."""
    console.metrics_table(fabric, split, metrics)
    if fabric.is_global_zero:
        write_json({"split": split, "checkpoint": checkpoint, "weights": which, "metrics": metrics}, folder / "metrics.json")
        console.info(fabric, f"evaluation folder: {folder}")


def _load_member(model: nn.Module, weights: Mapping[str, Any], what: str, fix: str) -> None:
    """Load a member's weights from a run checkpoint; weights that do not fit the configured model
    are a :class:`ConfigError` that says which keys and shapes differ (not torch's page of them)."""
    mismatch = state_dict_mismatch(model.state_dict(), weights, limit=3)
    if mismatch is not None:
        raise ConfigError(f"{what} does not fit the configured model: {mismatch}. {fix}.")
    model.load_state_dict(weights)


def _evaluation_dir(fabric: Any, split: str, checkpoint: str, which: str, output_dir: Optional[str]) -> Path:
    if output_dir is not None:
        folder = Path(output_dir)
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(f"--output_dir {output_dir}: the folder exists and is not empty; give a new or empty folder")
    else:
        base = Path(checkpoint).resolve().parent.parent / "evaluations"
        folder, n = base / f"{split}-{which}", 1
        while folder.exists():
            folder, n = base / f"{split}-{which}-{n}", n + 1
    fabric.barrier()
    if fabric.is_global_zero:
        folder.mkdir(parents=True, exist_ok=True)
    return folder
