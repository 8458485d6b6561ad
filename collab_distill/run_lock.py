"""The run folder's lock (one process trains in a folder at a time) and the clean-up of files a
killed writer left half-written, which only the lock's holder may remove."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: run folders are not locked
    fcntl = None  # type: ignore[assignment]

from collab_distill.task import ConfigError

__all__ = ["RunFolderBusy", "RunLock", "lock_holder", "remove_partial_files"]


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


def remove_partial_files(run_dir: Path) -> list[Path]:
    """Files a killed writer left half-written (the lock guarantees no writer is running)."""
    removed = [p for p in run_dir.rglob("*.tmp") if p.is_file() and _PARTIAL.fullmatch(p.name)]
    for path in removed:
        path.unlink()
    return removed


