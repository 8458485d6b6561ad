"""Where a classification split's samples come from: the pixels of an official split (held in
memory or read from files on access) and :class:`SplitDataset`, the data set of one split over
them with its transforms, seeded augmentation, views and (noisy) label override.

Kept apart from the data sets and their base class so that the label noise, the base class and
every data set can use them without importing one another. The split contract is described in
:mod:`collab_distill.tasks.classification.data`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from collab_distill.data import IndexedDataset, SeededSample, augment_seeded
from collab_distill.task import ConfigError

__all__ = ["Source", "TensorSource", "FileSource", "LoadedData", "SplitDataset"]


# ----------------------------------------------------------------------------------------------
# sources: where the pixels of one official split come from (picklable, cheap to index)
# ----------------------------------------------------------------------------------------------


class Source(abc.ABC):
    """The images and labels of one official split. ``load(i)`` returns ``[C, H, W]`` pixels
    (uint8, or float in ``[0, 1]``) before any augmentation or normalisation."""

    targets: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.targets)

    @abc.abstractmethod
    def load(self, i: int) -> Tensor: ...


class TensorSource(Source):
    """Images held in memory as one ``[N, C, H, W]`` tensor."""

    def __init__(self, images: Tensor, targets: Sequence[int] | np.ndarray) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)

    def load(self, i: int) -> Tensor:
        return self.images[i]


class FileSource(Source):
    """Images read from disk on access (RGB, resized to ``size`` when they differ from it)."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int], size: tuple[int, int]) -> None:
        # numpy arrays rather than lists: no per-item reference counts, so forked loader workers
        # do not slowly copy the whole list (the well-known DataLoader "memory leak").
        self.paths = np.asarray(list(paths), dtype=np.str_)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.size = size

    def load(self, i: int) -> Tensor:
        from PIL import Image

        path = str(self.paths[i])
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (self.size[1], self.size[0]):
                    img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)  # type: ignore[attr-defined]  # set by setattr; Pillow's types lack it
                return v2.functional.pil_to_tensor(img)
        except OSError as err:
            raise ConfigError(f"cannot read image {path!r} ({err}). Remove or replace the file.") from err


# ----------------------------------------------------------------------------------------------
# the data set of one split
# ----------------------------------------------------------------------------------------------


class SplitDataset(IndexedDataset):
    """One split: a view of a source through ``indices``, with its transforms.

    ``augment_transform`` (training only) is applied under ``augment_seeded`` with the key's seed
    (view ``v`` uses ``seed + v``); with a plain ``int`` key it draws from the global RNG.

    ``targets_override`` (split order) replaces the source's labels for this split only, so the
    noisy labels of ``train`` never reach ``meta``/``val``, which share the source. ``flipped``
    (bool, split order) marks the samples whose label it changed; ``None`` without an override.
    """

    def __init__(
        self,
        source: Source,
        indices: np.ndarray,
        transform: Callable[[Tensor], Tensor],
        *,
        augment_transform: Callable[[Tensor], Tensor] | None = None,
        views: int = 1,
        name: str = "",
        targets_override: np.ndarray | None = None,
    ) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.augment_transform = augment_transform
        self.views = views
        self.name = name
        self.targets_override: np.ndarray | None = None
        self.flipped: np.ndarray | None = None
        if targets_override is not None:
            self.targets_override = np.asarray(targets_override, dtype=np.int64)
            if self.targets_override.shape != self.indices.shape:
                raise ValueError(
                    f"targets_override has shape {self.targets_override.shape}; the {name or 'data'} split "
                    f"has {len(self.indices)} samples"
                )
            self.flipped = self.targets_override != self.clean_targets

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def clean_targets(self) -> np.ndarray:
        """The source's labels of this split's samples, in split order."""
        return self.source.targets[self.indices]

    @property
    def targets(self) -> np.ndarray:
        """Labels of this split's samples as training sees them (noisy where overridden), in split order."""
        return self.clean_targets if self.targets_override is None else self.targets_override.copy()

    def _augmented(self, img: Tensor, seed: int | None) -> Tensor:
        transform = self.augment_transform
        assert transform is not None
        if seed is None:
            return transform(img)
        return augment_seeded(seed % (2**63), lambda: transform(img))

    def __getitem__(self, key: int | SeededSample) -> dict[str, Any]:
        i, seed = self.split_key(key)
        n = len(self.indices)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for the {self.name or 'data'} split of {n} samples")
        i %= n
        j = int(self.indices[i])
        img = self.source.load(j)
        if self.augment_transform is None:
            x = self.transform(img)
            if self.views > 1:
                x = x.unsqueeze(0).repeat(self.views, *([1] * x.dim()))
        elif self.views == 1:
            x = self._augmented(img, seed)
        else:
            x = torch.stack(
                [self._augmented(img, None if seed is None else seed + v) for v in range(self.views)]
            )
        target = self.source.targets[j] if self.targets_override is None else self.targets_override[i]
        return {"inputs": x, "targets": int(target), "index": i}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {len(self)} samples, views={self.views})"



# ----------------------------------------------------------------------------------------------
# what a data set reads
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedData:
    """What a data set's ``_load`` returns: its official train and test sources, the class names,
    and the channels and size of an image."""

    train: Source
    test: Source
    class_names: list[str]
    in_channels: int
    image_size: tuple[int, int]

