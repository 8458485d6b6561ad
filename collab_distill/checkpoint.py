"""Run folders, atomic checkpoint files, RNG state and recorded versions."""

from __future__ import annotations

import errno
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
    "versions",
    "rng_state", "READABLE_FORMATS",
    "set_rng_state",
    "load_weights",
    "prefix_mapped",
    "state_dict_mismatch",
    "write_json",
    "write_text",
    "disk_full_message",
]

#: 2: ``best``, ``history`` and ``meta_history`` moved into ``loop`` (the loop state); 1 is read too
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process umask (read from
    ``/proc`` where it can be, since setting the umask to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file, then rename it into place.

    A crash mid-write leaves the previous file intact. The file gets the mode of any new file
    (0644 under umask 022), not ``mkstemp``'s private 0600: others on a shared cluster read runs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, _new_file_mode())
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path.tmp``, then rename it into place (a crash mid-write leaves the
    previous file intact)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(obj: Any, path: str | Path) -> None:
    write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


#: what torch's zip writer (``inline_container.cc``) raises when a write comes up short
_SHORT_WRITE = ("unexpected pos", "file write failed")


def _chain(err: BaseException | None) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _disk_full(chain: list[BaseException]) -> BaseException | None:
    """The innermost exception of ``chain`` that says a write found no space left: ENOSPC or
    EDQUOT, or torch's short-write RuntimeError (not an error that wraps one and repeats its
    message, as a PluginError does)."""
    for err in reversed(chain):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        if isinstance(err, RuntimeError) and any(text in str(err) for text in _SHORT_WRITE):
            return err
    return None


def _written_path(chain: list[BaseException]) -> Path | None:
    """The file being written: the ``path`` of the innermost collab-distill function that an
    exception of ``chain`` passed (``save_run_state``, ``atomic_save``, ``write_json``: the final
    name, not the temporary file), else an OSError's own file name."""
    for err in reversed(chain):
        found: Path | None = None
        tb = err.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            path = frame.f_locals.get("path")
            if str(frame.f_globals.get("__name__", "")).startswith("collab_distill") and isinstance(path, (str, Path)):
                found = Path(path)
            tb = tb.tb_next
        if found is not None:
            return found
    filenames = [getattr(err, "filename", None) for err in reversed(chain)]
    return next((Path(f) for f in filenames if isinstance(f, (str, Path))), None)


def disk_full_message(err: BaseException, resume: bool) -> str | None:
    """One line for a write that failed because the disk is full (``None``: ``err`` is something
    else): torch's own message ("unexpected pos" in ``inline_container.cc``) never says so.
    ``resume``: the failure stopped a fit, which ``--resume last`` continues. Every file is written
    to a temporary name and renamed into place, so the previous version of the file is intact."""
    chain = _chain(err)
    full = _disk_full(chain)
    if full is None:
        return None
    path = _written_path(chain)
    cause = f"{type(full).__name__}: {next(iter(str(full).splitlines()), '')}"
    fix = "free space and resume with --resume last" if resume else "free space and run the command again"
    kept = ""
    if path is not None and path.is_file():
        kept = "; the previous checkpoint was kept" if path.suffix == ".ckpt" else f"; the previous {path.name} was kept"
    return f"writing {path if path is not None else 'a file'} failed: the disk is full ({cause}); {fix}{kept}"


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
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS or "students" not in state:
        raise ConfigError(
            f"{where} is not a collab-distill checkpoint (no 'format'/'students' keys); "
            "to load plain weights use cohort.student_checkpoints or a teacher's `checkpoint`"
        )
    if state["format"] == 1:  # the loop state was spread over the top level
        state["loop"] = {**state["loop"], **{k: state.pop(k) for k in ("best", "history", "meta_history") if k in state}}
    return state


def load_weights(model: torch.nn.Module, path: str | Path, *, member: str, field: str) -> None:
    """Load a state dict into ``model`` from a plain state dict, an export, a run checkpoint or a
    file in detectron2's format (``{"model": state_dict, ...}``), all keys and shapes or nothing.

    A file saved from the model inside a wrapper, or from a wrapper around it (keys that equal the
    model's once one prefix common to all of them, e.g. ``model.``, is removed or added) loads too:
    the same weights reach collab-distill as a detectron2 ``.pth`` or as its own ``teacher.pt``.
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
        if _is_plain_pickle(path):
            raise ConfigError(
                f"{field}: {str(path)!r} is a plain pickle, not a torch file (a detectron2 model-zoo .pkl?). A "
                "detectron2 model reads it through its `model.init_args.weights` (detectron2's DetectionCheckpointer, "
                f"which also converts model-zoo names); `{field}` takes files written by torch.save."
            ) from None
        raise ConfigError(
            f"{field}: {str(path)!r} cannot be read as a torch file ({type(err).__name__}: {err}). Give a file "
            "written by torch.save: a state dict, a `collab-distill export` or a run's last.ckpt."
        ) from None
    detectron2_format = False
    if isinstance(obj, dict) and obj.get("format") in READABLE_FORMATS:
        pool = {**obj.get("teachers", {}), **obj.get("students", {})}
        if member not in pool:
            if len(pool) == 1:
                member = next(iter(pool))
            else:
                raise ConfigError(f"{field}: checkpoint {str(path)!r} has no member {member!r}; it has {sorted(pool)}")
        obj = pool[member]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), Mapping):  # detectron2's checkpoint format
        obj, detectron2_format = obj["model"], True
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{field}: {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    own = model.state_dict()
    obj = prefix_mapped({k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in obj.items()}, own)
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
            + (" (A detectron2 checkpoint of another layout, e.g. converted model-zoo names, loads through a "
               "detectron2 model's `model.init_args.weights`.)" if detectron2_format else "")
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


def _is_plain_pickle(path: Path) -> bool:
    """Whether ``path`` looks like a bare pickle (protocol 2+, e.g. a detectron2 model-zoo ``.pkl``)
    rather than torch's zip format."""
    with open(path, "rb") as f:
        head = f.read(2)
    return path.suffix == ".pkl" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def prefix_mapped(theirs: Mapping[str, Any], own: Mapping[str, Any] | set[str]) -> Mapping[str, Any]:
    """``theirs`` with one prefix common to all its keys removed, or one added, when that makes
    its keys exactly ``own``'s (a file saved from a wrapper's inner model or the other way round,
    e.g. collab-distill's ``model.`` around a detectron2 model); otherwise ``theirs`` unchanged."""
    if len(theirs) != len(own) or not own or set(theirs) == set(own):
        return theirs
    for longer, shorter, strip in ((theirs, own, True), (own, theirs, False)):
        first = next(iter(longer))
        for prefix in (first[: i + 1] for i, char in enumerate(first) if char == "."):
            if all(k.startswith(prefix) for k in longer) and {k[len(prefix):] for k in longer} == set(shorter):
                if strip:
                    return {k[len(prefix):]: v for k, v in theirs.items()}
                return {prefix + k: v for k, v in theirs.items()}
    return theirs


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
    """What produced a run: package versions (``None`` for an optional one that is not installed,
    e.g. detectron2), the commit detectron2 was built from when that is certain (it is not on
    PyPI, so its version alone says little), Python, platform, git commit of the code."""
    import hashlib
    from urllib.parse import unquote, urlparse

    def source_commit(dist_name: str) -> str | None:
        """The git commit an installed package was built from, only where it is certain: pip's
        record of a ``git+`` install; for an editable install of a local checkout, its HEAD when no
        tracked file differs from it; for a build from a local checkout, its HEAD when every
        installed Python file is that commit's file (a checkout changed since the build: None)."""
        try:
            dist = importlib.metadata.distribution(dist_name)
            origin = json.loads(dist.read_text("direct_url.json") or "{}")
        except (importlib.metadata.PackageNotFoundError, ValueError):
            return None
        url = origin.get("url", "")
        if "vcs_info" in origin or not url.startswith("file://"):
            return origin.get("vcs_info", {}).get("commit_id")
        source = Path(unquote(urlparse(url).path))

        def git(*args: str) -> str | None:
            run = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10, check=False)
            return run.stdout if run.returncode == 0 else None

        try:
            head = (git("rev-parse", "HEAD") or "").strip()
            if not head:
                return None
            if origin.get("dir_info", {}).get("editable"):
                return head if git("status", "--porcelain", "--untracked-files=no") == "" else None
            blobs = {entry.split("\t", 1)[1]: entry.split()[2] for entry in (git("ls-tree", "-r", "-z", "HEAD") or "").split("\0")
                     if "\t" in entry}
            installed = {str(f): f for f in dist.files or () if f.suffix == ".py"}
            folders = {path.rpartition("/")[0] for path in installed}
            # the commit's files in every installed folder; files a build copies from elsewhere in the
            # checkout (not tracked at their installed path) are not compared
            tracked = {path for path in blobs if path.endswith(".py") and path.rpartition("/")[0] in folders}
            if not tracked or not tracked <= set(installed):
                return None
            for path in tracked:
                data = Path(installed[path].locate()).read_bytes()
                if hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest() != blobs[path]:
                    return None
            return head
        except (OSError, subprocess.SubprocessError):
            return None

    packages = ["collab-distill", "torch", "torchvision", "lightning-fabric", "pluggy", "jsonargparse", "numpy", "detectron2"]
    out: dict[str, Any] = {p: _version_of(p) for p in packages}
    out["detectron2_commit"] = source_commit("detectron2") if out["detectron2"] else None
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
