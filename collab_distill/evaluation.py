"""Evaluation of cohort members on a split, and ``collab-distill validate|test`` of a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from collab_distill import console
from collab_distill.checkpoint import load_checkpoint, state_dict_mismatch, write_json
from collab_distill.data import make_loader
from collab_distill.task import ConfigError

if TYPE_CHECKING:
    from collab_distill.engine import Engine

__all__ = ["evaluate", "evaluate_checkpoint"]


@torch.no_grad()
def evaluate(engine: Engine, split: str, members: Optional[Mapping[str, nn.Module]] = None) -> dict[str, dict[str, float]]:
    """Metrics of every student (or of ``members``) on ``split``; calls ``evaluation_end``."""
    fabric = engine.fabric
    assert fabric is not None
    members = dict(members) if members is not None else dict(engine.students)
    loader, _ = engine.loaders[split]
    evaluators = {name: engine.task.evaluator(fabric) for name in members}
    modes = {name: m.training for name, m in members.items()}
    for m in members.values():
        m.eval()
    for i, batch in enumerate(loader):
        if engine.trainer.limit_eval_batches is not None and i >= engine.trainer.limit_eval_batches:
            break
        batch = engine.task.move_batch(batch, fabric)
        for name, model in members.items():
            with fabric.autocast():
                outputs = engine.task.predict(model, batch)
            evaluators[name].update(outputs, batch)
    for name, m in members.items():
        m.train(modes[name])
    metrics = {name: ev.compute() for name, ev in evaluators.items()}
    engine.hook.collab_distill_evaluation_end(engine=engine, split=split, metrics=metrics)
    return metrics


def evaluate_checkpoint(
    engine: Engine, split: str, checkpoint: Optional[str], which: str = "last", output_dir: Optional[str] = None
) -> dict[str, Any]:
    """Metrics of every student from a checkpoint (last or best-on-val weights).

    The checkpoint's teachers and meta modules (a C-Net) are restored too, so plugins can apply
    them to ``split`` in ``evaluation_end``. ``metrics.json`` (and whatever plugins write) goes to
    ``output_dir``, by default a new ``evaluations/<split>-<weights>[-N]`` folder beside the
    checkpoint's run; nothing there is overwritten.

    ``checkpoint`` is required (``None`` is refused: scoring the untrained weights of the config
    looks like a result). A checkpoint of another run (other data, cohort or architecture) is a
    :class:`ConfigError` that says what does not match."""
    if checkpoint is None:
        command = "validate" if split == "val" else "test"
        raise ConfigError(
            f"collab-distill {command}: --ckpt_path is required (without it the config's untrained students would be "
            f"scored); pass --ckpt_path runs/NAME/version_N/checkpoints/last.ckpt"
        )
    state = load_checkpoint(checkpoint, field="--ckpt_path")
    engine.setup()
    fabric = engine.fabric
    assert fabric is not None and engine.info is not None
    config = Path(checkpoint).parent.parent / "config.yaml"
    fix = (f"Evaluate it with the config of the run that wrote it: --config {config}" if config.is_file()
           else "Evaluate it with the config it was trained with")
    where = f"--ckpt_path {checkpoint}"
    saved_info = state.get("task_info")
    if saved_info is not None:
        saved = (saved_info["num_classes"], saved_info["in_channels"])
        built = (engine.info.num_classes, engine.info.in_channels)
        if saved != built:
            raise ConfigError(
                f"{where}: the checkpoint was trained on data with {saved[0]} classes and {saved[1]} input channel(s); "
                f"the configured data has {built[0]} classes and {built[1]} input channel(s). {fix}."
            )
    for name, model in engine.students.items():
        if name not in state["students"]:
            raise ConfigError(f"{where}: no student {name!r} in it (has {sorted(state['students'])}). {fix}.")
        weights = state["students"][name]
        if which == "best" and name in state.get("best", {}):
            weights = state["best"][name]["state"]
        _load_member(model, weights, f"{where}: student {name!r}", fix)
    # the run's teachers too: a C-Net that reads their per-image losses needs the trained ones
    for name, model in engine.teachers.items():
        if name in state.get("teachers", {}):
            _load_member(model, state["teachers"][name], f"{where}: teacher {name!r}", fix)
    engine.students = {n: fabric.to_device(m) for n, m in engine.students.items()}
    engine.teachers = {n: fabric.to_device(m.eval().requires_grad_(False)) for n, m in engine.teachers.items()}
    saved_meta = state.get("meta_modules", {})
    for name, spec in engine.meta_specs.items():
        if name in saved_meta:  # an untrained meta module is never applied as if it were the run's
            _load_member(spec.module, saved_meta[name], f"{where}: meta module {name!r}", fix)
            engine.meta_modules[name] = fabric.to_device(spec.module)
    engine.run_dir = _evaluation_dir(fabric, split, checkpoint, which, output_dir)
    engine.loaders = {split: make_loader(engine.task, split, engine.seed, fabric)}
    metrics = evaluate(engine, split)
    console.metrics_table(fabric, split, metrics)
    if fabric.is_global_zero:
        write_json({"split": split, "checkpoint": checkpoint, "weights": which, "metrics": metrics},
                   engine.run_dir / "metrics.json")
        console.info(fabric, f"evaluation folder: {engine.run_dir}")
    return metrics


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
