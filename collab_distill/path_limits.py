"""The file system's limits on a run's paths, checked with the config: a run name or root folder
too long for the file system would otherwise fail with ``OSError: File name too long`` from deep
inside the run folder's code, or after the first files were written."""

from __future__ import annotations

import os
from pathlib import PurePath

from collab_distill.task import ConfigError

__all__ = ["check_run_path"]

#: what a run writes below ``root_dir/name``: ``version_N/teachers/NAME/checkpoints/last.ckpt.tmp``
#: and the like, with room for a member's name
RUN_FILES_RESERVE = 128


def _limit(folder: str, name: str, fallback: int) -> int:
    """``os.pathconf(folder, name)``, or ``fallback`` where the system does not say."""
    try:
        return int(os.pathconf(folder, name))
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no such limit
        return fallback


def _nearest_existing(path: str) -> str:
    """``path`` or its nearest ancestor that exists (os.path.exists is False for a name too long)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(f"{text[:28]}...{text[-28:]}")


def check_run_path(root_dir: str, name: str | None) -> None:
    """``root_dir`` is given, and ``root_dir/name`` with the files of a run below it fits the
    file system: every component within ``NAME_MAX``, the whole path within ``PATH_MAX``."""
    if not root_dir.strip():
        raise ConfigError(f"trainer.root_dir={root_dir!r} is empty; give the folder the runs go to "
                          "(--trainer.root_dir runs, the default, or . for the current folder)")
    root = os.path.abspath(os.path.expanduser(root_dir))
    existing = _nearest_existing(root)
    name_max = _limit(existing, "PC_NAME_MAX", 255)
    for field, value in (("trainer.root_dir", root_dir), ("trainer.name", name or "")):
        for part in PurePath(value).parts:
            if len(part) > name_max:
                raise ConfigError(
                    f"{field}: the folder name {_shown(part)} has {len(part)} characters, but this file system holds "
                    f"at most {name_max} per name; give a shorter --{field}")
    path_max = _limit(existing, "PC_PATH_MAX", 4096)
    full = os.path.join(root, name or "")
    if len(full) + RUN_FILES_RESERVE > path_max:
        raise ConfigError(
            f"trainer.root_dir and trainer.name make the path {_shown(full)} of {len(full)} characters; with the "
            f"run's files below it (~{RUN_FILES_RESERVE} more) that exceeds this system's {path_max} per path: "
            f"give a shorter --trainer.root_dir ({len(root)} characters as an absolute path) or --trainer.name")
