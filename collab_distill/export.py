"""Export one student of a run: a plain state dict, and TorchScript when the model traces."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch

from collab_distill.checkpoint import atomic_save, load_checkpoint
from collab_distill.task import ConfigError

__all__ = ["export_student"]


def _rebuild(state: dict, student: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """Rebuild the student's architecture from the config saved in the checkpoint."""
    from collab_distill.parsers import build_parsers
    from collab_distill.task import TaskInfo

    text, info = state.get("config"), state.get("task_info")
    if not text or not info:
        raise ConfigError("the checkpoint carries no config/task info; only the state dict can be exported")
    parser = build_parsers().subcommands["fit"]  # the CLI's own `fit` parser, which wrote the config
    cfg = parser.parse_string(text)
    factory = parser.instantiate(cfg).cohort.students[student]
    task_info = TaskInfo(num_classes=info["num_classes"], in_channels=info["in_channels"], image_size=tuple(info["image_size"]))
    model = factory.build(task_info)
    example = torch.zeros(1, task_info.in_channels, *task_info.image_size)
    return model, example


def export_student(
    ckpt_path: str,
    student: str,
    output: Optional[str] = None,
    weights: str = "last",
    torchscript: bool = True,
    exported_program: bool = True,
) -> list[Path]:
    """Write ``<student>-<weights>.pt`` (a plain state dict), and optionally a TorchScript file
    (``.torchscript.pt``) and a ``torch.export`` program (``.pt2``, torch's successor to
    TorchScript). Returns the written paths."""
    state = load_checkpoint(ckpt_path, field="--ckpt_path")
    if student not in state["students"]:
        raise ConfigError(f"--student {student!r}: the checkpoint has students {sorted(state['students'])}")
    tensors = state["students"][student]
    if weights == "best":
        best = state.get("best", {}).get(student)
        if best is None:
            raise ConfigError(f"--weights best: no best-on-val weights recorded for {student!r} (was val ever run?)")
        tensors = best["state"]
    out = Path(output) if output else Path(ckpt_path).resolve().parent.parent / "exports"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    plain = out / f"{student}-{weights}.pt"
    atomic_save(tensors, plain)
    written.append(plain)
    if torchscript or exported_program:
        model, example = _rebuild(state, student)
        model.load_state_dict(tensors)
        # a multi-exit student deploys as its plain final-exit network (the exit heads are training-only)
        model = getattr(model, "deploy_model", model).eval()
    if torchscript:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.14 marks TorchScript deprecated
            traced = torch.jit.trace(model, example)
        path = out / f"{student}-{weights}.torchscript.pt"
        traced.save(str(path))
        written.append(path)
    if exported_program:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (example.expand(2, *example.shape[1:]).contiguous(),), dynamic_shapes=({0: batch},))
        path = out / f"{student}-{weights}.pt2"
        torch.export.save(program, str(path))
        written.append(path)
    return written
