"""Export one student of a run: its weights, and TorchScript / a torch.export program when the
model has such a form.

A model decides how it is exported through optional attributes (none of them needed by a plain
``[B, C, H, W] -> logits`` network):

* ``export_state_dict(state) -> (object, suffix)``: the weights file in the format the model's own
  library loads (e.g. a detector library's checkpoint layout without this project's wrapper),
  written as ``<student>-<weights><suffix>``; by default the state dict itself, as ``.pt``.
* ``export_config(weights_file) -> (text, suffix) or None``: the model library's own config that
  rebuilds the architecture (e.g. detectron2's YAML), written beside the weights as
  ``<student>-<weights><suffix>``; by default none (the weights alone, with this project's config).
* ``export_formats``: which of ``"torchscript"`` and ``"exported_program"`` apply (default both),
  with ``export_note`` saying why the others do not.
* ``deploy_model``: the module that is traced (e.g. a multi-exit network without its exit heads).
"""

from __future__ import annotations

import glob
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from collab_distill.checkpoint import atomic_save, load_checkpoint, write_text
from collab_distill.config import check_writable_folder
from collab_distill.task import ConfigError

__all__ = ["export_student", "GRAPH_FORMATS"]

#: graph formats, each with the option that asks for it and what it is called in messages
GRAPH_FORMATS = {"torchscript": ("--torchscript", "TorchScript"), "exported_program": ("--exported_program", "torch.export")}


def _rebuild(state: dict, student: str) -> tuple[nn.Module, torch.Tensor]:
    """Rebuild the student's architecture from the config saved in the checkpoint."""
    from collab_distill.parsers import build_parsers
    from collab_distill.task import TaskInfo

    info = state["task_info"]
    parser = build_parsers().subcommands["fit"]  # the CLI's own `fit` parser, which wrote the config
    cfg = parser.parse_string(state["config"])
    factory = parser.instantiate(cfg).cohort.students[student]
    task_info = TaskInfo(num_classes=info["num_classes"], in_channels=info["in_channels"], image_size=tuple(info["image_size"]))
    model = factory.build(task_info)
    example = torch.zeros(1, task_info.in_channels, *task_info.image_size)
    return model, example


def _note(message: str) -> None:
    """A remark beside the written paths (stderr, so stdout stays one path per line)."""
    print(f"note: {message}", file=sys.stderr)


def _graph_formats(model: nn.Module, student: str, requested: dict[str, Optional[bool]], weights_file: Path) -> list[str]:
    """The graph formats to write: those asked for (``True``) or left to the model (``None``) that
    it supports. Asking for one it does not support is an error; leaving one out says why once."""
    supported = set(getattr(model, "export_formats", GRAPH_FORMATS))
    why = getattr(model, "export_note", "the model does not support it")
    refused = [fmt for fmt, wanted in requested.items() if wanted and fmt not in supported]
    if refused:
        flags = " / ".join(f"{GRAPH_FORMATS[f][0]} true" for f in refused)
        names = " or ".join(GRAPH_FORMATS[f][1] for f in refused)
        raise ConfigError(f"{flags}: student {student!r} cannot be exported as {names} ({why}); its deployable file "
                          f"is the state dict {weights_file.name} (leave the option out)")
    skipped = [fmt for fmt, wanted in requested.items() if wanted is None and fmt not in supported]
    if skipped:
        _note(f"{student}: no {' / '.join(GRAPH_FORMATS[f][1] for f in skipped)} file ({why}); "
              f"{weights_file.name} is the deployable file")
    return [fmt for fmt, wanted in requested.items() if wanted is not False and fmt in supported]


def _beside(stem: Path, suffix: str) -> Path:
    """``stem`` plus ``suffix`` (``with_suffix`` would cut a student name that has a dot)."""
    return stem.with_name(stem.name + suffix)


def _write_graph(fmt: str, model: nn.Module, example: torch.Tensor, stem: Path) -> Path:
    """Trace ``model`` on ``example`` into TorchScript, or export it with a dynamic batch size."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.14 marks TorchScript deprecated
            traced = torch.jit.trace(model, example)
        path = _beside(stem, ".torchscript.pt")
        traced.save(str(path))
        return path
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example.expand(2, *example.shape[1:]).contiguous(),), dynamic_shapes=({0: batch},))
    path = _beside(stem, ".pt2")
    torch.export.save(program, str(path))
    return path


def export_student(
    ckpt_path: str,
    student: str,
    output: Optional[str] = None,
    weights: str = "last",
    torchscript: Optional[bool] = None,
    exported_program: Optional[bool] = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the student's weights file (``<student>-<weights>.pt``, a plain state dict, unless the
    model names its own format) with the model library's config beside it where the model has
    one (a detectron2 ``.yaml``), and a TorchScript file (``.torchscript.pt``) and a
    ``torch.export`` program (``.pt2``, torch's successor to TorchScript). For those two, ``True``
    requires the file, ``False`` skips it, ``None`` writes it when the model supports it and it
    can be produced (otherwise a note on stderr says why). Files of an earlier export of the same
    student and weights are never replaced unless ``overwrite``. Returns the written paths."""
    state = load_checkpoint(ckpt_path, field="--ckpt_path")
    if student not in state["students"]:
        raise ConfigError(f"--student {student!r}: the checkpoint has students {sorted(state['students'])}")
    tensors = state["students"][student]
    if weights == "best":
        best = state["loop"].get("best", {}).get(student)
        if best is None:
            raise ConfigError(f"--weights best: no best-on-val weights recorded for {student!r} (was val ever run?)")
        tensors = best["state"]
    out = Path(output) if output else Path(ckpt_path).resolve().parent.parent / "exports"
    stem = out / f"{student}-{weights}"
    earlier = sorted(p for p in out.glob(f"{glob.escape(stem.name)}.*") if p.is_file()) if out.is_dir() else []
    if earlier and not overwrite:
        names = ", ".join(p.name for p in earlier)
        raise ConfigError(f"--output: {str(out)!r} already holds an export of {student!r} ({names}); "
                          "give another --output folder, or --overwrite true to replace them")
    check_writable_folder(str(out), "output")  # a file of that name, or a folder nobody may write to
    out.mkdir(parents=True, exist_ok=True)
    requested = {"torchscript": torchscript, "exported_program": exported_program}
    if not state.get("config") or not state.get("task_info"):
        if any(requested.values()):
            raise ConfigError("--torchscript / --exported_program: the checkpoint carries no config/task info to rebuild "
                              "the model from; only its state dict can be exported")
        atomic_save(tensors, _beside(stem, ".pt"))
        _note(f"{student}: the checkpoint carries no config to rebuild the model from, so its raw state dict was written")
        return [_beside(stem, ".pt")]
    model, example = _rebuild(state, student)
    model.load_state_dict(tensors)
    own_format = getattr(model, "export_state_dict", None)
    saved, suffix = own_format(tensors) if own_format is not None else (tensors, ".pt")
    plain = _beside(stem, suffix)
    formats = _graph_formats(model, student, requested, plain)
    atomic_save(saved, plain)
    written = [plain]
    own_config = getattr(model, "export_config", None)
    config = own_config(plain) if own_config is not None else None
    if config is not None:  # what the model's own library rebuilds the architecture from
        text, config_suffix = config
        write_text(text, _beside(stem, config_suffix))
        written.append(_beside(stem, config_suffix))
    # a multi-exit student deploys as its plain final-exit network (the exit heads are training-only)
    deployed = getattr(model, "deploy_model", model).eval()
    for fmt in formats:
        try:
            written.append(_write_graph(fmt, deployed, example, stem))
        except Exception as err:
            if requested[fmt]:
                raise
            reason = next(iter(str(err).splitlines()), "")
            _note(f"{student}: no {GRAPH_FORMATS[fmt][1]} file ({type(err).__name__}: {reason}); "
                  f"{plain.name} is the deployable file")
    return written
