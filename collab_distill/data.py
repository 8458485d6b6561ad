"""Resumable, seeded data order and per-sample seeded augmentation.

Reproducibility rests on two things here: the order of training samples is a pure function of
``(seed, epoch)`` and can start at any batch (so a resumed run sees exactly the batches the
interrupted one would have), and every sample carries its own augmentation seed (so augmented
pixels do not depend on the number of loader workers, on the process rank, or on a resume).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["SeededSampler", "SeededSample", "augment_seeded", "make_loader", "PlainIndices", "Cycle", "folder_problem",
           "unreadable_images", "images_problem"]

#: what :class:`SeededSampler` yields: ``(dataset index, augmentation seed)``
SeededSample = tuple[int, int]

_MIX = 0x9E3779B97F4A7C15


def folder_problem(path: str | os.PathLike[str]) -> str:
    """Why ``path`` is not a usable folder, for an error message ("" when it is one)."""
    if os.path.isdir(path):
        return ""
    return "is a file, not a folder" if os.path.exists(path) else "does not exist"


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + _MIX) % (2**63 - 1)


class SeededSampler(Sampler[SeededSample]):
    """Shuffled (or ordered) indices, sharded across ranks, resumable mid-epoch.

    Each rank gets ``ceil(n / world_size)`` samples (padding by wrapping around, as
    ``DistributedSampler`` does) so every rank runs the same number of steps.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.n = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def select_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and skip its first ``start_batch`` batches (for resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def per_rank(self) -> int:
        per = math.ceil(self.n / self.world_size)
        if self.drop_last:
            per = (per // self.batch_size) * self.batch_size
        return per

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = math.ceil(self.n / self.world_size) * self.world_size
        order += order[: total - len(order)]
        return order[self.rank : total : self.world_size][: self.per_rank()]

    def __iter__(self) -> Iterator[SeededSample]:
        order = self._order()[self.start_batch * self.batch_size :]
        for i in order:
            yield i, _sample_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.start_batch * self.batch_size)


def augment_seeded(seed: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (a random augmentation) with torch's RNG seeded by ``seed``, leaving the
    global RNG state as it was."""
    # only the CPU generator: torch.manual_seed would also (re)seed every accelerator, 4-5x slower
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return fn()


class IndexedDataset(Dataset):
    """Accept both plain indices and :data:`SeededSample` keys; evaluation splits use plain ones."""

    def __getitem__(self, key: int | SeededSample) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    @staticmethod
    def split_key(key: int | SeededSample) -> tuple[int, int | None]:
        if isinstance(key, tuple):
            return int(key[0]), int(key[1])
        return int(key), None


class PlainIndices(Sampler):
    """Evaluation order: plain indices (no augmentation seed), sharded like training."""

    def __init__(self, inner: SeededSampler) -> None:
        self.inner = inner

    def __iter__(self) -> Iterator[int]:
        return (i for i, _ in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def make_loader(task: Any, split: str, seed: int, fabric: Any) -> tuple[DataLoader, SeededSampler]:
    """The split's loader and its :class:`SeededSampler` (shuffled and seeded for ``train`` and
    ``meta``; plain indices otherwise), sharded over ``fabric``'s ranks."""
    dataset = task.dataset(split)
    options = dict(task.loader_options(split))
    batch_size = int(options.pop("batch_size"))
    drop_last = split == "train" and len(dataset) > batch_size * fabric.world_size
    sampler = SeededSampler(
        len(dataset), shuffle=split in ("train", "meta"), seed=seed + (0 if split == "train" else 17), rank=fabric.global_rank,
        world_size=fabric.world_size, batch_size=batch_size, drop_last=drop_last,
    )
    order: Sampler = sampler if split == "train" else PlainIndices(sampler)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=task.collate, drop_last=drop_last, **options)
    return loader, sampler


class Cycle:
    """An endless, resumable iterator over a loader with a :class:`SeededSampler` (the meta batches)."""

    def __init__(self, loader: DataLoader, sampler: SeededSampler) -> None:
        self.loader, self.sampler = loader, sampler
        self.epoch, self.position = 0, 0
        self._it: Optional[Iterator] = None

    def __next__(self) -> Any:
        if self._it is None:
            self.sampler.select_epoch(self.epoch, self.position)
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self.sampler.select_epoch(self.epoch, 0)
            self._it = iter(self.loader)
            batch = next(self._it)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position, self._it = state["epoch"], state["position"], None


def unreadable_images(paths: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, reason)`` of every file in ``paths`` that PIL cannot open and verify, in order.
    Threads: the work is mostly file reads, which release the GIL (network file systems gain most)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def problem(path: str) -> str | None:
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for bad files
            return f"{type(err).__name__}: {err}"
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(problem, paths))
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


def images_problem(owner: str, paths: Sequence[str]) -> Optional[str]:
    """The message for the files of ``paths`` that cannot be read (at most five named), for a
    data set ``owner`` whose ``check_images`` option skips the check; ``None`` when all can."""
    bad = unreadable_images(paths)
    if not bad:
        return None
    shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    files, them = ("image files", "them") if len(bad) > 1 else ("image file", "it")
    return (f"{owner}: {len(bad)} {files} cannot be read: {shown}{more}. Delete or replace {them} "
            "(check_images: false skips this check at set-up; a bad file then stops the run when it is read).")
