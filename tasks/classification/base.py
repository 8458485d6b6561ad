"""The base class of the classification data sets: argument checks, the seeded
``train``/``meta``/``val`` splits of the official training set, the :class:`LabelNoise` option of
``train``, and the interface the task adapter uses (``setup``, ``dataset``, ``info``, ...).

The data sets themselves (:mod:`~collab_distill.tasks.classification.in_memory`,
:mod:`~collab_distill.tasks.classification.folders`) only say how to read their files; the split
contract is described in :mod:`collab_distill.tasks.classification.data`.
"""

from __future__ import annotations

import abc
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from collab_distill.data import folder_problem
from collab_distill.task import ConfigError, TaskInfo
from collab_distill.tasks.classification.label_noise import SplitPixels, instance_dependent_noise, symmetric_noise
from collab_distill.tasks.classification.sources import LoadedData, Source, SplitDataset

__all__ = ["ClassificationData", "LabelNoise", "NOISE_KINDS", "SPLITS", "IMAGENET_MEAN", "IMAGENET_STD", "check_root"]

SPLITS = ("train", "meta", "val", "test")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NOISE_KINDS = ("symmetric", "instance")


@dataclass(frozen=True)
class LabelNoise:
    """Synthetic label noise applied to the ``train`` split (``meta``/``val``/``test`` stay clean).

    In YAML: ``label_noise: {kind: instance, rate: 0.4}``.

    Args:
        kind: ``symmetric``: each label flips with probability ``rate`` to a uniformly drawn
            other class (:func:`symmetric_noise`). ``instance``: the instance-dependent noise of
            Xia et al. 2020 (:func:`instance_dependent_noise`), as in MC-Distil's Instance
            CIFAR-100.
        rate: Expected fraction of flipped labels, in ``[0, 1)``.
        seed: Seed of the noise; ``None`` uses the run seed.
    """

    kind: Literal["symmetric", "instance"]
    rate: float
    seed: int | None = None


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


class ClassificationData(abc.ABC):
    """Base class of the classification data sets.

    Args:
        meta_fraction: Fraction of the official training set held out as the ``meta`` split
            (seeded random). In ``(0, 1)``.
        val_fraction: Fraction of the official training set held out as the ``val`` split
            (seeded random, disjoint from ``meta``). In ``[0, 1)``; ``0`` means there is no
            separate validation split and ``val`` is the ``meta`` split.
            ``meta_fraction + val_fraction`` must be below 1.
        views: Independently augmented views of each training image (``inputs`` is
            ``[views, C, H, W]`` when above 1).
        augment: Apply the training augmentation to the ``train`` split.
        batch_size: Training batch size (per process).
        eval_batch_size: Batch size for ``meta``/``val``/``test``; ``None`` uses ``batch_size``.
        num_workers: DataLoader worker processes.
        subset: Use only the first ``subset`` images of the official training set after the
            seeded shuffle (for quick runs and benchmarks); the fractions apply to them.
            ``None`` uses everything. The test split is never reduced.
        label_noise: Corrupt the ``train`` split's labels (seeded; see :class:`LabelNoise`),
            e.g. ``{kind: instance, rate: 0.4}``. ``meta``, ``val`` and ``test`` stay clean.
            ``None``: no noise. ``instance`` reads every training image once at setup.
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __init__(
        self,
        meta_fraction: float = 0.1,
        val_fraction: float = 0.1,
        views: int = 1,
        augment: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        subset: int | None = None,
        label_noise: LabelNoise | None = None,
    ) -> None:
        self.meta_fraction = meta_fraction
        self.val_fraction = val_fraction
        self.views = views
        self.augment = augment
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.subset = subset
        self.label_noise = label_noise
        self._info: TaskInfo | None = None
        self._loaded: LoadedData | None = None
        self._datasets: dict[str, SplitDataset] = {}

    # -- what subclasses provide ---------------------------------------------------------------

    @abc.abstractmethod
    def _load(self) -> LoadedData:
        """Read (or index) the official train and test sets; raise ConfigError on bad input."""

    @abc.abstractmethod
    def _augmentation(self, image_size: tuple[int, int]) -> list[Callable]:
        """The random training transforms, applied to raw pixels before normalisation."""

    def _normalization(self, train: Source, train_indices: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std used to normalise inputs (fixed constants by default)."""
        return tuple(self.mean), tuple(self.std)

    def _too_few_classes(self, loaded: LoadedData) -> str:
        """The message for data with fewer than 2 classes (a subclass names where they come from)."""
        n = len(loaded.class_names)
        return (
            f"{type(self).__name__}: the data has {n} class(es) {list(loaded.class_names)[:5]}; classification needs at "
            "least 2 classes (with one, every prediction is right and training reports 100% accuracy). "
            "Use data with more classes."
        )

    def _check_files(self, loaded: LoadedData, train_indices: np.ndarray) -> None:
        """Check, at set-up, the files the splits will read (``train_indices``: the official
        training images in use), so that a bad file stops the run before training; nothing to
        check by default (data held in memory was read by :meth:`_load`)."""
        return None

    # -- validation ----------------------------------------------------------------------------

    def _check_args(self) -> None:
        name = type(self).__name__
        if not 0.0 < self.meta_fraction < 1.0:
            raise ConfigError(
                f"{name}.meta_fraction is {self.meta_fraction}; it must be in (0, 1), e.g. 0.1."
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(
                f"{name}.val_fraction is {self.val_fraction}; it must be in [0, 1), e.g. 0.1 "
                "(0 means the meta split doubles as the validation split)."
            )
        if self.meta_fraction + self.val_fraction >= 1.0:
            raise ConfigError(
                f"{name}.meta_fraction + val_fraction is {self.meta_fraction + self.val_fraction:g}; "
                "it must be below 1 so that some training images remain. Lower one of them."
            )
        if not isinstance(self.views, int) or self.views < 1:
            raise ConfigError(f"{name}.views is {self.views}; it must be an integer >= 1.")
        if self.batch_size < 1:
            raise ConfigError(f"{name}.batch_size is {self.batch_size}; it must be >= 1.")
        if self.eval_batch_size < 1:
            raise ConfigError(f"{name}.eval_batch_size is {self.eval_batch_size}; it must be >= 1 (or null).")
        if self.num_workers < 0:
            raise ConfigError(f"{name}.num_workers is {self.num_workers}; it must be >= 0.")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"{name}.subset is {self.subset}; it must be >= 1 or null (use all images).")
        self._check_label_noise()

    def _check_label_noise(self) -> None:
        noise, field = self.label_noise, f"{type(self).__name__}.label_noise"
        if noise is None:
            return
        if not isinstance(noise, LabelNoise):
            raise ConfigError(
                f"{field} is {noise!r}; give a LabelNoise, e.g. {{kind: instance, rate: 0.4}} in YAML, or null."
            )
        if noise.kind not in NOISE_KINDS:
            raise ConfigError(
                f"{field}.kind is {noise.kind!r}; choose 'symmetric' (uniform flips to another class) or "
                "'instance' (Xia et al. 2020 instance-dependent noise)."
            )
        if isinstance(noise.rate, bool) or not isinstance(noise.rate, numbers.Real) or not 0.0 <= noise.rate < 1.0:
            raise ConfigError(
                f"{field}.rate is {noise.rate!r}; it must be a number in [0, 1), the expected fraction of "
                "flipped training labels, e.g. 0.4."
            )
        if noise.seed is not None and (isinstance(noise.seed, bool) or not isinstance(noise.seed, numbers.Integral)):
            raise ConfigError(f"{field}.seed is {noise.seed!r}; it must be an integer, or null to use the run seed.")

    def _check_labels(self, src: Source, which: str, num_classes: int) -> None:
        t = src.targets
        if len(t) and (t.min() < 0 or t.max() >= num_classes):
            bad = int(t.min()) if t.min() < 0 else int(t.max())
            raise ConfigError(
                f"{type(self).__name__}: the {which} set has label {bad} outside 0..{num_classes - 1} "
                f"({num_classes} classes). Check the data files."
            )

    # -- the interface -------------------------------------------------------------------------

    def setup(self, seed: int) -> TaskInfo:
        """Load and validate the data and make the seeded ``train``/``meta``/``val`` splits."""
        self._info, self._loaded, self._datasets = None, None, {}
        self._check_args()
        name = type(self).__name__
        loaded = self._load()
        num_classes = len(loaded.class_names)
        self._check_labels(loaded.train, "training", num_classes)
        self._check_labels(loaded.test, "test", num_classes)
        if self.label_noise is not None and num_classes < 2:
            raise ConfigError(
                f"{name}.label_noise: the data has {num_classes} class(es); a label can only be flipped with "
                "at least 2. Remove label_noise (set it to null) or use data with more classes."
            )
        if num_classes < 2:
            raise ConfigError(self._too_few_classes(loaded))

        n_total = len(loaded.train)
        if self.subset is not None and self.subset > n_total:
            raise ConfigError(
                f"{name}.subset is {self.subset} but the training set has only {n_total} images. "
                f"Use subset <= {n_total} or null."
            )
        g = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(n_total, generator=g).numpy()
        if self.subset is not None:
            order = order[: self.subset]
        n = len(order)
        n_meta = _round(n * self.meta_fraction)
        n_val = _round(n * self.val_fraction)
        parts = {
            "meta": order[:n_meta],
            "val": order[n_meta : n_meta + n_val],
            "train": order[n_meta + n_val :],
        }
        fields = {"meta": "meta_fraction", "val": "val_fraction", "train": "meta_fraction/val_fraction"}
        for split, idx in parts.items():
            if len(idx) == 0 and not (split == "val" and self.val_fraction == 0):
                hint = f" or subset (now {self.subset})" if self.subset is not None else ""
                raise ConfigError(
                    f"{name}: the {split} split is empty ({n} training images, meta_fraction="
                    f"{self.meta_fraction}, val_fraction={self.val_fraction}). Adjust {fields[split]}{hint}."
                )
        if len(loaded.test) == 0:
            raise ConfigError(f"{name}: the test split is empty. Check the test data.")
        self._check_files(loaded, order)

        mean, std = self._normalization(loaded.train, parts["train"])
        finish = self._finish(mean, std)
        augment_transform = None
        if self.augment:
            augment_transform = v2.Compose([*self._augmentation(loaded.image_size), *finish.transforms])
        noisy = None if self.label_noise is None else self._noisy_labels(loaded, parts["train"], int(seed))
        self._datasets = {
            "train": SplitDataset(
                loaded.train,
                parts["train"],
                finish,
                augment_transform=augment_transform,
                views=self.views,
                name="train",
                targets_override=noisy,
            ),
            "meta": SplitDataset(loaded.train, parts["meta"], finish, name="meta"),
            "test": SplitDataset(loaded.test, np.arange(len(loaded.test)), finish, name="test"),
        }
        self._datasets["val"] = (
            SplitDataset(loaded.train, parts["val"], finish, name="val") if n_val > 0 else self._datasets["meta"]
        )
        self._loaded = loaded
        self._mean, self._std = mean, std
        self._info = TaskInfo(
            num_classes=num_classes,
            in_channels=loaded.in_channels,
            image_size=loaded.image_size,
            extra={
                "class_names": list(loaded.class_names),
                "split_sizes": self.split_sizes(),
                "mean": mean,
                "std": std,
                "views": self.views,
                **({} if noisy is None else {"label_noise": self._noise_summary(int(seed))}),
            },
        )
        return self._info

    def _noise_seed(self, run_seed: int) -> int:
        assert self.label_noise is not None
        return run_seed if self.label_noise.seed is None else int(self.label_noise.seed)

    def _noisy_labels(self, loaded: LoadedData, train_indices: np.ndarray, run_seed: int) -> np.ndarray:
        """The train split's noisy labels (split order), from a generator seeded only by the noise seed."""
        noise = self.label_noise
        assert noise is not None
        rng = np.random.default_rng(self._noise_seed(run_seed))
        labels = loaded.train.targets[train_indices]
        num_classes = len(loaded.class_names)
        if noise.kind == "symmetric":
            noisy, _ = symmetric_noise(labels, num_classes, float(noise.rate), rng)
        else:
            dim = loaded.in_channels * loaded.image_size[0] * loaded.image_size[1]
            pixels = SplitPixels(loaded.train, train_indices, dim)
            noisy, _ = instance_dependent_noise(pixels, labels, num_classes, float(noise.rate), rng)
        return noisy

    def _noise_summary(self, run_seed: int) -> dict[str, Any]:
        noise, train = self.label_noise, self._datasets["train"]
        assert noise is not None and train.flipped is not None
        flipped, n = int(train.flipped.sum()), len(train)
        return {
            "kind": noise.kind,
            "rate": float(noise.rate),
            "seed": self._noise_seed(run_seed),
            "flipped": flipped,
            "train_size": n,
            "realised_rate": flipped / n,
        }

    def label_noise_rows(self) -> list[tuple[int, int, int, bool]]:
        """``(split_index, clean_label, noisy_label, flipped)`` for every ``train`` sample, for
        analysis tools (e.g. per-sample loss weights against flips); empty without label noise."""
        train = self.dataset("train")
        assert isinstance(train, SplitDataset)
        if train.flipped is None:
            return []
        return [
            (i, int(clean), int(noisy), bool(flip))
            for i, (clean, noisy, flip) in enumerate(zip(train.clean_targets, train.targets, train.flipped))
        ]

    @staticmethod
    def _finish(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
        """Evaluation transform: to float in [0, 1], then normalise."""
        return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def dataset(self, split: str) -> Dataset:
        """The data set of ``split`` (``train``, ``meta``, ``val`` or ``test``).

        With ``val_fraction=0`` ``dataset("val")`` is the ``meta`` split.
        """
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
        self._need_setup()
        return self._datasets[split]

    def split_sizes(self) -> dict[str, int]:
        """Number of samples per split (``val`` equals ``meta`` when ``val_fraction=0``)."""
        self._need_setup(allow_partial=True)
        return {s: len(self._datasets[s]) for s in SPLITS}

    def _need_setup(self, allow_partial: bool = False) -> None:
        if not self._datasets or (not allow_partial and self._info is None):
            raise RuntimeError(f"{type(self).__name__}: call setup(seed) first")

    @property
    def info(self) -> TaskInfo:
        self._need_setup()
        assert self._info is not None
        return self._info

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def in_channels(self) -> int:
        return self.info.in_channels

    @property
    def image_size(self) -> tuple[int, int]:
        return self.info.image_size

    @property
    def class_names(self) -> list[str]:
        self._need_setup()
        assert self._loaded is not None
        return list(self._loaded.class_names)

    def describe(self) -> str:
        if self._info is None:
            return type(self).__name__
        sizes = ", ".join(f"{k}={v}" for k, v in self.split_sizes().items())
        return f"{type(self).__name__}({self.num_classes} classes, {sizes})"


def check_root(cls_name: str, root: str, expected: str) -> str:
    root = os.path.expanduser(str(root))
    problem = folder_problem(root)
    if problem:
        raise ConfigError(f"{cls_name}.root: {root!r} {problem}. Set root to the folder that contains {expected}.")
    return root
