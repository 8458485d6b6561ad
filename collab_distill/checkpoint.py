"""Run folders, atomic checkpoint files, RNG state and recorded versions."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import random
import re
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collab_distill.task import ConfigError

__all__ = [
    "atomic_save",
    "load_checkpoint",
    "new_run_dir",
    "latest_run_dir",
    "versions",
    "rng_state",
    "set_rng_state",
    "load_weights",
    "state_dict_mismatch",
    "write_json",
]

CHECKPOINT_FORMAT = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file, then rename it into place.

    A crash mid-write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, field: str | None = None) -> dict[str, Any]:
    """Load a collab-distill checkpoint, with an error that says what is wrong.

    ``field`` names the option the path came from (e.g. ``--resume``) in error messages.
    """
    path = Path(path)
    where = f"{field}: checkpoint {str(path)!r}" if field else f"checkpoint {str(path)!r}"
    fix = "Give the checkpoints/last.ckpt of a collab-distill run" + (" (or `--resume last`)." if field == "--resume" else ".")
    if not path.is_file():
        raise ConfigError(f"{where} does not exist. {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigError(
            f"{where} cannot be read ({type(err).__name__}: {err}); it is not a torch file, or it is "
            f"truncated. {fix}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "students" not in state:
        raise ConfigError(
            f"{where} is not a collab-distill checkpoint (no 'format'/'students' keys); "
            "to load plain weights use cohort.student_checkpoints or a teacher's `checkpoint`"
        )
    return state


def load_weights(model: torch.nn.Module, path: str | Path, *, member: str, field: str) -> None:
    """Load a state dict into ``model`` from a plain state dict, an export or a run checkpoint.

    ``member`` picks the model out of a run checkpoint (students first, then teachers).
    ``field`` names the config key in error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{field}: file {str(path)!r} does not exist. Fix the path (relative paths start at the working directory)."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigError(
            f"{field}: {str(path)!r} cannot be read as a torch file ({type(err).__name__}: {err}). Give a file "
            "written by torch.save: a state dict, a `collab-distill export` or a run's last.ckpt."
        ) from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        pool = {**obj.get("teachers", {}), **obj.get("students", {})}
        if member not in pool:
            if len(pool) == 1:
                member = next(iter(pool))
            else:
                raise ConfigError(f"{field}: checkpoint {str(path)!r} has no member {member!r}; it has {sorted(pool)}")
        obj = pool[member]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{field}: {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    own = model.state_dict()
    wrong_keys = [
        k for k in own if k in obj and hasattr(obj[k], "shape") and tuple(obj[k].shape) != tuple(own[k].shape)
    ]
    classes = _class_count_mismatch(obj, own, wrong_keys)
    if classes is not None and all(k in obj for k in own) and all(k in own for k in obj):
        saved, built = classes
        raise ConfigError(
            f"{field}: {str(path)!r} was saved for {saved} classes but the model is built for {built} (the "
            f"classes of the data; a detector counts background as one more). Use a checkpoint trained on this "
            f"data, or data with as many classes as the checkpoint."
        )
    mismatch = state_dict_mismatch(own, obj)
    if mismatch is not None:
        raise ConfigError(
            f"{field}: {str(path)!r} does not fit the configured model: {mismatch}"
            + ". Configure the architecture (class_path/init_args) the file was saved from, or give a "
            "checkpoint of the configured architecture."
        )
    model.load_state_dict(obj)


def state_dict_mismatch(own: Mapping[str, Any], theirs: Mapping[str, Any], limit: int = 4) -> str | None:
    """How ``theirs`` (a file's state dict) differs from ``own`` (the built model's) in keys and
    shapes, in one line (``None``: it fits)."""
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = {k: (tuple(theirs[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in theirs and hasattr(theirs[k], "shape") and hasattr(v, "shape")}
    wrong = [f"{k}: file {a} vs model {b}" for k, (a, b) in shapes.items() if a != b]
    parts = []
    if wrong:
        more = f" (and {len(wrong) - limit} more)" if len(wrong) > limit else ""
        parts.append("shape mismatch " + "; ".join(wrong[:limit]) + more)
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    return ", ".join(parts) or None


def _class_count_mismatch(obj: Mapping[str, Any], own: Mapping[str, Any], wrong_keys: list[str]) -> tuple[int, int] | None:
    """``(saved, built)`` output sizes when only the output layers (the last weights and biases of
    the state dict: a classifier, or a detector's class and box predictors) differ, and only in
    their number of outputs, all by the same factor; otherwise ``None``."""
    if not wrong_keys or len(wrong_keys) > 4:
        return None
    tail = [k for k in own if hasattr(own[k], "shape") and own[k].dim() >= 1][-4:]
    if set(wrong_keys) - set(tail):
        return None
    sizes = set()
    for k in wrong_keys:
        a, b = tuple(obj[k].shape), tuple(own[k].shape)
        if len(a) != len(b) or a[1:] != b[1:]:
            return None
        sizes.add((a[0], b[0]))
    saved, built = min(sizes, key=lambda pair: pair[1])
    # e.g. a box predictor has 4 outputs per class: the same change of class count
    return (saved, built) if all(a * built == b * saved for a, b in sizes) else None


def _version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, Any]:
    """What produced a run: package versions, Python, platform, git commit of the code."""
    packages = ["collab-distill", "torch", "torchvision", "lightning-fabric", "pluggy", "jsonargparse", "numpy"]
    out: dict[str, Any] = {p: _version_of(p) for p in packages}
    out["python"] = platform.python_version()
    out["platform"] = platform.platform()
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    out["git_commit"] = _git_commit()
    return out


def new_run_dir(root: str | Path, name: str) -> Path:
    """A fresh ``root/name/version_N`` (never an existing folder: nothing is overwritten)."""
    base = Path(root) / name
    base.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in base.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    n = max(taken, default=-1) + 1
    while True:
        path = base / f"version_{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def latest_run_dir(root: str | Path, name: str) -> Path | None:
    """The newest ``version_N`` under ``root/name`` that has a ``checkpoints/last.ckpt``."""
    base = Path(root) / name
    if not base.is_dir():
        return None
    runs = sorted(
        (int(m.group(1)), p)
        for p in base.iterdir()
        if (m := re.fullmatch(r"version_(\d+)", p.name)) and (p / "checkpoints" / "last.ckpt").is_file()
    )
    return runs[-1][1] if runs else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
