"""Image classification data sets: loading, validation, seeded splits and seeded augmentation.

Every data set here is configured in YAML by ``class_path``/``init_args`` and offers four
splits:

``train``
    The official training set minus the held-out splits below. Its ``__getitem__`` takes the
    ``(index, augmentation_seed)`` keys that :class:`~collab_distill.data.SeededSampler`
    yields (or a plain ``int``) and applies the training augmentation under
    :func:`~collab_distill.data.augment_seeded`, so one key always gives the same pixels.
``meta``
    A seeded random ``meta_fraction`` of the official training set, held out from ``train``
    (used to learn how losses are mixed). Evaluation transforms only.
``val``
    Another, disjoint, seeded random ``val_fraction`` of the official training set, used for
    model selection. With ``val_fraction=0`` there is no separate validation split and
    ``dataset("val")`` returns the ``meta`` split.
``test``
    The official test set (for Tiny-ImageNet: its labelled official validation set). It is
    only reported, never used for selection.

Samples are ``{"inputs": Tensor, "targets": int, "index": int}`` where ``index`` is the
position within the split (the number the sampler gave). ``inputs`` is ``[C, H, W]``, or
``[V, C, H, W]`` for ``views=V > 1`` independently augmented views of one training image.

The splits depend only on the ``seed`` given to :meth:`ClassificationData.setup` (never on the
global RNG state), so every process of a run, and a resumed run, sees the same splits.

``label_noise`` (a :class:`LabelNoise`) corrupts the labels of the ``train`` split only, seeded
the same way, for robustness experiments such as MC-Distil's Instance CIFAR-100: ``meta``,
``val`` and ``test`` keep their clean labels. The train split's ``flipped`` and
``clean_targets`` tell which labels were changed.
"""

from __future__ import annotations

import abc
import numbers
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from collab_distill.data import IndexedDataset, SeededSample, augment_seeded, folder_problem, images_problem
from collab_distill.task import ConfigError, TaskInfo

__all__ = [
    "ClassificationData",
    "SplitDataset",
    "LabelNoise",
    "symmetric_noise",
    "instance_dependent_noise",
    "Digits",
    "CIFAR10",
    "CIFAR100",
    "TinyImageNet",
    "ImageFolderData",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

SPLITS = ("train", "meta", "val", "test")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)  # CIFAR-100
CIFAR_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------
# sources: where the pixels of one official split come from (picklable, cheap to index)
# ----------------------------------------------------------------------------------------------


class _Source(abc.ABC):
    """The images and labels of one official split. ``load(i)`` returns ``[C, H, W]`` pixels
    (uint8, or float in ``[0, 1]``) before any augmentation or normalisation."""

    targets: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.targets)

    @abc.abstractmethod
    def load(self, i: int) -> Tensor: ...


class _TensorSource(_Source):
    """Images held in memory as one ``[N, C, H, W]`` tensor."""

    def __init__(self, images: Tensor, targets: Sequence[int] | np.ndarray) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)

    def load(self, i: int) -> Tensor:
        return self.images[i]


class _FileSource(_Source):
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
# label noise of the train split
# ----------------------------------------------------------------------------------------------

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


def symmetric_noise(
    labels: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flip each label with probability ``rate`` to a class drawn uniformly among the other
    ``num_classes - 1`` (so the realised flip rate is ``rate`` in expectation).

    Returns ``(noisy_labels, flipped)``, int64 and bool arrays shaped like ``labels``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    flipped = rng.random(labels.shape) < rate
    # an offset in 1..K-1 modulo K is uniform over the other classes and never the label itself
    offset = rng.integers(1, num_classes, size=labels.shape)
    noisy = np.where(flipped, (labels + offset) % num_classes, labels)
    return noisy, flipped


class _Rows(Protocol):
    """``[N, D]`` array-like indexed by an integer array of rows (a numpy array or a lazy loader)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, rows: np.ndarray) -> np.ndarray: ...


def _truncated_normal(
    mean: float, std: float, size: int, rng: np.random.Generator, low: float = 0.0, high: float = 1.0
) -> np.ndarray:
    """Normal draws conditioned on ``[low, high]`` by rejection (at least half are accepted
    for a mean inside the interval), so only numpy's seeded generator is involved."""
    out = rng.normal(mean, std, size)
    bad = (out < low) | (out > high)
    while bad.any():
        out[bad] = rng.normal(mean, std, int(bad.sum()))
        bad = (out < low) | (out > high)
    return out


def instance_dependent_noise(
    images_flat: np.ndarray | _Rows,
    labels: np.ndarray,
    num_classes: int,
    rate: float,
    rng: np.random.Generator,
    std: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance-dependent label noise (Xia et al., NeurIPS 2020, "Part-dependent label noise",
    the instance-dependent generator that MC-Distil's Instance CIFAR-100 uses).

    Each sample gets a flip rate ``q_i ~ N(rate, std^2)`` truncated to ``[0, 1]``; each class
    ``c`` a projection ``W_c ~ N(0, 1)`` of shape ``[D, K]``. With ``p = x_i W_{y_i}``,
    ``p[y_i] = -inf``, the new label is drawn from ``q_i softmax(p)`` with ``1 - q_i`` left on
    ``y_i``. This draws the same distribution in two steps: flip with probability ``q_i``
    (independent of the image), then pick the wrong class from ``softmax(p)`` (which depends on
    it). The realised rate is the mean of the truncated normal: ``rate`` up to truncation, which
    matters only within about ``2 std`` of 0 or 1 (``rate=0`` still flips about 8%).

    Args:
        images_flat: ``[N, D]`` pixels on the 0..255 scale, as Xia et al.'s code feeds raw
            uint8 pixels; the scale sets how sharply the image picks the wrong class. Indexed
            one class at a time, so it may be a lazy loader of a large set.
        labels: ``[N]`` clean labels in ``0..num_classes-1``.
        num_classes: ``K``, at least 2.
        rate: Mean flip rate, in ``[0, 1)``.
        rng: The seeded generator; the draws depend only on it and on ``N``, ``D``, ``K``.
        std: Standard deviation of the per-sample flip rate (0.1 in the paper).

    Returns ``(noisy_labels, flipped)``, int64 and bool arrays of shape ``[N]``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n, d = int(labels.shape[0]), int(images_flat.shape[1])
    q = _truncated_normal(rate, std, n, rng)
    flipped = rng.random(n) < q
    pick = 1.0 - rng.random(n)  # in (0, 1]: the inverse-CDF draw below never lands on a zero-probability class
    noisy = labels.copy()
    for c in range(num_classes):
        w = rng.standard_normal((d, num_classes), dtype=np.float32)  # drawn for every class: seeded draws stay aligned
        rows = np.flatnonzero(flipped & (labels == c))
        if len(rows) == 0:
            continue
        logits = np.asarray(images_flat[rows], dtype=np.float64).reshape(len(rows), d) @ w
        logits[:, c] = -np.inf
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(probs, axis=1)
        noisy[rows] = (cdf < pick[rows, None] * cdf[:, -1:]).sum(axis=1)
    return noisy, flipped


class _SplitPixels:
    """The flattened pixels of a split's images on the 0..255 scale, read only when indexed:
    :func:`instance_dependent_noise` reads one class at a time, so a file-backed training set
    is read once from disk (resized as the data set does) without being held in memory whole."""

    def __init__(self, source: _Source, indices: np.ndarray, dim: int) -> None:
        self.source = source
        self.indices = indices
        self.shape = (len(indices), dim)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        picked = self.indices[rows]
        if isinstance(self.source, _TensorSource):
            images = self.source.images[torch.from_numpy(picked)]
        else:
            images = torch.stack([self.source.load(int(j)) for j in picked])
        x = images.reshape(len(picked), -1).float()
        if images.dtype != torch.uint8:
            x = x * 255.0  # float sources hold [0, 1]
        return x.numpy()


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
        source: _Source,
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
# base class
# ----------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    train: _Source
    test: _Source
    class_names: list[str]
    in_channels: int
    image_size: tuple[int, int]


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
        self._loaded: _Loaded | None = None
        self._datasets: dict[str, SplitDataset] = {}

    # -- what subclasses provide ---------------------------------------------------------------

    @abc.abstractmethod
    def _load(self) -> _Loaded:
        """Read (or index) the official train and test sets; raise ConfigError on bad input."""

    @abc.abstractmethod
    def _augmentation(self, image_size: tuple[int, int]) -> list[Callable]:
        """The random training transforms, applied to raw pixels before normalisation."""

    def _normalization(self, train: _Source, train_indices: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std used to normalise inputs (fixed constants by default)."""
        return tuple(self.mean), tuple(self.std)

    def _too_few_classes(self, loaded: _Loaded) -> str:
        """The message for data with fewer than 2 classes (a subclass names where they come from)."""
        n = len(loaded.class_names)
        return (
            f"{type(self).__name__}: the data has {n} class(es) {list(loaded.class_names)[:5]}; classification needs at "
            "least 2 classes (with one, every prediction is right and training reports 100% accuracy). "
            "Use data with more classes."
        )

    def _check_files(self, loaded: _Loaded, train_indices: np.ndarray) -> None:
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

    def _check_labels(self, src: _Source, which: str, num_classes: int) -> None:
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

    def _noisy_labels(self, loaded: _Loaded, train_indices: np.ndarray, run_seed: int) -> np.ndarray:
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
            pixels = _SplitPixels(loaded.train, train_indices, dim)
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


def _check_root(cls_name: str, root: str, expected: str) -> str:
    root = os.path.expanduser(str(root))
    problem = folder_problem(root)
    if problem:
        raise ConfigError(f"{cls_name}.root: {root!r} {problem}. Set root to the folder that contains {expected}.")
    return root


# ----------------------------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------------------------


class Digits(ClassificationData):
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale images, 10 classes.

    Needs no files. A stratified ``test_fraction`` of the images, drawn with ``test_seed``
    (fixed across runs by default, so it plays the part of an official test set), is the
    ``test`` split; the rest is the training set split into ``train``/``meta``/``val`` by the run
    seed. Inputs are float32 ``[1, 8, 8]``, normalised with the ``train`` split's mean and std;
    the augmentation is a random translation by up to one pixel.

    Args:
        test_fraction: Fraction of all images used as the test split, in ``(0, 1)``.
        test_seed: Seed of the test split; ``None`` uses the run seed.
        meta_fraction: See :class:`ClassificationData`.
        val_fraction: See :class:`ClassificationData`.
        views: See :class:`ClassificationData`.
        augment: See :class:`ClassificationData`.
        batch_size: See :class:`ClassificationData`.
        eval_batch_size: See :class:`ClassificationData`.
        num_workers: See :class:`ClassificationData`.
        subset: See :class:`ClassificationData`.
        label_noise: See :class:`ClassificationData`.
    """

    def __init__(
        self,
        test_fraction: float = 0.2,
        test_seed: int | None = 0,
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
        super().__init__(
            meta_fraction, val_fraction, views, augment, batch_size, eval_batch_size, num_workers, subset, label_noise
        )
        self.test_fraction = test_fraction
        self.test_seed = test_seed

    def setup(self, seed: int) -> TaskInfo:
        self._seed = int(seed)
        return super().setup(seed)

    def _load(self) -> _Loaded:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"Digits.test_fraction is {self.test_fraction}; it must be in (0, 1), e.g. 0.2.")
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
        targets = digits.target.astype(np.int64)
        test_seed = self._seed if self.test_seed is None else self.test_seed
        train_idx, test_idx = train_test_split(
            np.arange(len(targets)), test_size=self.test_fraction, random_state=test_seed, stratify=targets
        )
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
        return _Loaded(
            train=_TensorSource(images[train_idx].contiguous(), targets[train_idx]),
            test=_TensorSource(images[test_idx].contiguous(), targets[test_idx]),
            class_names=[str(d) for d in digits.target_names],
            in_channels=1,
            image_size=(8, 8),
        )

    def _normalization(self, train: _Source, train_indices: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
        assert isinstance(train, _TensorSource)
        x = train.images[torch.from_numpy(train_indices)]
        return (float(x.mean()),), (float(x.std()),)

    def _augmentation(self, image_size: tuple[int, int]) -> list[Callable]:
        return [v2.RandomCrop(image_size, padding=1)]


# ----------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------


# torchvision verifies the md5 of every CIFAR pickle (``_check_integrity`` for the data batches,
# ``_load_meta`` for the meta file) against the official archive. That rejects copies that were
# re-pickled or converted (and the small synthetic files of the tests). ``check_integrity(path,
# None)`` only checks that the file exists, so these subclasses blank the checksums, which turns
# both checks into existence checks without copying torchvision's loading code. They are used
# only with ``verify_checksums: false``.
class _UncheckedCIFAR10(datasets.CIFAR10):
    train_list = [[f, None] for f, _ in datasets.CIFAR10.train_list]
    test_list = [[f, None] for f, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _UncheckedCIFAR100(datasets.CIFAR100):
    train_list = [[f, None] for f, _ in datasets.CIFAR100.train_list]
    test_list = [[f, None] for f, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


class _CIFARBase(ClassificationData):
    _tv_cls: type[Any] = datasets.CIFAR10
    _unchecked_cls: type[Any] = _UncheckedCIFAR10
    _folder: str = ""
    _files: str = ""
    _archive: str = ""

    def __init__(
        self,
        root: str,
        verify_checksums: bool = True,
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
        super().__init__(
            meta_fraction, val_fraction, views, augment, batch_size, eval_batch_size, num_workers, subset, label_noise
        )
        self.root = root
        self.verify_checksums = verify_checksums

    def _load(self) -> _Loaded:
        name = type(self).__name__
        expected = f"{self._folder}/{self._files} (the extracted {self._archive})"
        root = _check_root(name, self.root, expected)
        folder = os.path.join(root, self._folder)
        if not os.path.isdir(folder):
            raise ConfigError(
                f"{name}.root: {root!r} has no {self._folder}/ folder. Expected layout: root/{expected}. "
                "Set root to the folder that contains it."
            )
        tv_cls = self._tv_cls
        cls = tv_cls if self.verify_checksums else self._unchecked_cls
        try:
            train = cls(root, train=True, download=False)
            test = cls(root, train=False, download=False)
        except RuntimeError as err:
            if "not found or corrupted" not in str(err):
                raise
            missing = [
                f for f, _ in tv_cls.train_list + tv_cls.test_list + [[tv_cls.meta["filename"], None]]
                if not os.path.isfile(os.path.join(folder, f))
            ]
            if missing:
                msg = f"is missing {', '.join(missing)}"
                fix = "Extract the official archive there."
            else:
                msg = "has files whose md5 checksums differ from the official archive (corrupted or re-packed)"
                fix = "Re-extract the official archive, or set verify_checksums: false if the files are a deliberate conversion."
            raise ConfigError(f"{name}.root: {folder!r} {msg}. Expected layout: root/{expected}. {fix}") from err
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
            raise ConfigError(
                f"{name}.root: cannot read the pickles in {folder!r} ({type(err).__name__}: {err}). "
                f"Expected the python-pickle layout root/{expected}."
            ) from err

        def to_source(ds: Any) -> _TensorSource:
            images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            return _TensorSource(images, ds.targets)

        return _Loaded(
            train=to_source(train),
            test=to_source(test),
            class_names=list(train.classes),
            in_channels=3,
            image_size=(32, 32),
        )

    def _augmentation(self, image_size: tuple[int, int]) -> list[Callable]:
        return [v2.RandomCrop(image_size, padding=4), v2.RandomHorizontalFlip()]


class CIFAR100(_CIFARBase):
    """CIFAR-100 (50,000 training / 10,000 test 32x32 images, 100 classes) from the python
    pickles: ``root/cifar-100-python/{train,test,meta}``. Held in memory. Augmentation: random
    crop 32 with padding 4 and horizontal flip; the usual CIFAR-100 mean/std.

    Args:
        root: Folder that contains ``cifar-100-python/``.
        verify_checksums: Check the files' md5 against the official archive (as torchvision
            does); turn off for re-pickled or converted copies.
        meta_fraction: See :class:`ClassificationData`.
        val_fraction: See :class:`ClassificationData`.
        views: See :class:`ClassificationData`.
        augment: See :class:`ClassificationData`.
        batch_size: See :class:`ClassificationData`.
        eval_batch_size: See :class:`ClassificationData`.
        num_workers: See :class:`ClassificationData`.
        subset: See :class:`ClassificationData`.
        label_noise: See :class:`ClassificationData`.
    """

    _tv_cls = datasets.CIFAR100
    _unchecked_cls = _UncheckedCIFAR100
    _folder = "cifar-100-python"
    _archive = "cifar-100-python.tar.gz"
    _files = "{train,test,meta}"
    mean = CIFAR_MEAN
    std = CIFAR_STD


class CIFAR10(_CIFARBase):
    """CIFAR-10 (50,000 training / 10,000 test 32x32 images, 10 classes) from the python
    pickles: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``. Held in
    memory. Augmentation: random crop 32 with padding 4 and horizontal flip; the usual CIFAR-10
    mean/std.

    Args:
        root: Folder that contains ``cifar-10-batches-py/``.
        verify_checksums: Check the files' md5 against the official archive (as torchvision
            does); turn off for re-pickled or converted copies.
        meta_fraction: See :class:`ClassificationData`.
        val_fraction: See :class:`ClassificationData`.
        views: See :class:`ClassificationData`.
        augment: See :class:`ClassificationData`.
        batch_size: See :class:`ClassificationData`.
        eval_batch_size: See :class:`ClassificationData`.
        num_workers: See :class:`ClassificationData`.
        subset: See :class:`ClassificationData`.
        label_noise: See :class:`ClassificationData`.
    """

    _tv_cls = datasets.CIFAR10
    _unchecked_cls = _UncheckedCIFAR10
    _folder = "cifar-10-batches-py"
    _archive = "cifar-10-python.tar.gz"
    _files = "{data_batch_1..5,test_batch,batches.meta}"
    mean = CIFAR10_MEAN
    std = CIFAR10_STD


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet
# ----------------------------------------------------------------------------------------------


def _images_in(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(
            e.path for e in it if e.is_file() and e.name.lower().endswith(_IMAGE_EXTENSIONS)
        )


class TinyImageNet(ClassificationData):
    """Tiny-ImageNet-200 (100,000 training / 10,000 labelled validation 64x64 RGB images, 200
    classes), read lazily from ``root/tiny-imagenet-200/`` (or ``root`` itself being that
    folder)::

        wnids.txt                       one class id per line
        words.txt                       optional: "wnid<TAB>names" (for class_names)
        train/<wnid>/images/*.JPEG
        val/images/*.JPEG
        val/val_annotations.txt         "file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1"

    The official validation set is the ``test`` split (the official test set has no labels).
    Augmentation: random crop 64 with padding 8 and horizontal flip; ImageNet mean/std.

    Args:
        root: ``tiny-imagenet-200`` or the folder that contains it.
        meta_fraction: See :class:`ClassificationData`.
        val_fraction: See :class:`ClassificationData`.
        views: See :class:`ClassificationData`.
        augment: See :class:`ClassificationData`.
        batch_size: See :class:`ClassificationData`.
        eval_batch_size: See :class:`ClassificationData`.
        num_workers: See :class:`ClassificationData`.
        subset: See :class:`ClassificationData`.
        label_noise: See :class:`ClassificationData`.
    """

    _layout = (
        "tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
        "val/val_annotations.txt}"
    )

    def __init__(
        self,
        root: str,
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
        super().__init__(
            meta_fraction, val_fraction, views, augment, batch_size, eval_batch_size, num_workers, subset, label_noise
        )
        self.root = root

    def _fail(self, what: str) -> ConfigError:
        return ConfigError(f"TinyImageNet.root: {what}. Expected layout: root/{self._layout}.")

    def _load(self) -> _Loaded:
        root = _check_root("TinyImageNet", self.root, "tiny-imagenet-200/")
        base = os.path.join(root, "tiny-imagenet-200")
        if not os.path.isdir(base):
            base = root
        if not os.path.isfile(os.path.join(base, "wnids.txt")):
            raise self._fail(f"neither {root!r} nor {root!r}/tiny-imagenet-200 contains wnids.txt")
        with open(os.path.join(base, "wnids.txt")) as f:
            wnids = [line.strip() for line in f if line.strip()]
        if not wnids:
            raise self._fail(f"{base}/wnids.txt lists no classes")
        if len(set(wnids)) != len(wnids):
            raise self._fail(f"{base}/wnids.txt lists a class twice")
        index = {w: i for i, w in enumerate(wnids)}

        paths: list[str] = []
        targets: list[int] = []
        for w in wnids:
            folder = os.path.join(base, "train", w, "images")
            if not os.path.isdir(folder):
                raise self._fail(f"missing training folder {folder!r} for class {w}")
            files = _images_in(folder)
            if not files:
                raise self._fail(f"training folder {folder!r} (class {w}) has no images")
            paths += files
            targets += [index[w]] * len(files)

        val_dir = os.path.join(base, "val", "images")
        ann = os.path.join(base, "val", "val_annotations.txt")
        if not os.path.isdir(val_dir) or not os.path.isfile(ann):
            raise self._fail(f"missing {val_dir!r} or {ann!r} (the labelled official validation set, used as test)")
        present = set(os.listdir(val_dir))
        test_paths: list[str] = []
        test_targets: list[int] = []
        with open(ann) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                cols = line.rstrip("\n").split("\t")
                if len(cols) < 2:
                    raise self._fail(f"{ann}:{lineno} is not 'file<TAB>wnid...'")
                fname, w = cols[0], cols[1]
                if w not in index:
                    raise self._fail(f"{ann}:{lineno} names class {w!r}, which is not in wnids.txt")
                if fname not in present:
                    raise self._fail(f"{ann}:{lineno} names {fname!r}, which is not in {val_dir!r}")
                test_paths.append(os.path.join(val_dir, fname))
                test_targets.append(index[w])

        names = dict(zip(wnids, wnids))
        words = os.path.join(base, "words.txt")
        if os.path.isfile(words):
            with open(words) as f:
                for line in f:
                    cols = line.rstrip("\n").split("\t")
                    if len(cols) >= 2 and cols[0] in names:
                        names[cols[0]] = cols[1].split(",")[0].strip() or cols[0]
        size = (64, 64)
        return _Loaded(
            train=_FileSource(paths, targets, size),
            test=_FileSource(test_paths, test_targets, size),
            class_names=[names[w] for w in wnids],
            in_channels=3,
            image_size=size,
        )

    def _augmentation(self, image_size: tuple[int, int]) -> list[Callable]:
        return [v2.RandomCrop(image_size, padding=8), v2.RandomHorizontalFlip()]


# ----------------------------------------------------------------------------------------------
# a generic image folder tree
# ----------------------------------------------------------------------------------------------


class ImageFolderData(ClassificationData):
    """Any image classification data laid out as class folders (torchvision ImageFolder)::

        root/<train_dir>/<class>/*.{jpg,png,...}
        root/<test_dir>/<class>/*.{jpg,png,...}

    Both must have the same class folders. Images are read lazily, converted to RGB and resized
    to ``image_size`` x ``image_size``. Augmentation: random crop with padding
    ``image_size // 8`` and horizontal flip; ImageNet mean/std.

    Args:
        root: Folder that contains ``train_dir`` and ``test_dir``.
        image_size: Side length the images are resized to.
        train_dir: Name of the training folder under ``root``.
        test_dir: Name of the test folder under ``root``.
        meta_fraction: See :class:`ClassificationData`.
        val_fraction: See :class:`ClassificationData`.
        views: See :class:`ClassificationData`.
        augment: See :class:`ClassificationData`.
        batch_size: See :class:`ClassificationData`.
        eval_batch_size: See :class:`ClassificationData`.
        num_workers: See :class:`ClassificationData`.
        subset: See :class:`ClassificationData`.
        label_noise: See :class:`ClassificationData`.
        check_images: At set-up, open every image the splits use (the used part of ``train_dir``
            with ``subset``, and all of ``test_dir``) and verify it with PIL (headers and, for
            PNG, checksums; no full decode, so e.g. a truncated JPEG may pass), so that a corrupt
            file stops the run with its name before training instead of in the middle of an
            epoch. It reads every file once, which takes a while for millions of images:
            ``false`` skips it for huge folders known to be sound.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        train_dir: str = "train",
        test_dir: str = "test",
        meta_fraction: float = 0.1,
        val_fraction: float = 0.1,
        views: int = 1,
        augment: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        subset: int | None = None,
        label_noise: LabelNoise | None = None,
        check_images: bool = True,
    ) -> None:
        super().__init__(
            meta_fraction, val_fraction, views, augment, batch_size, eval_batch_size, num_workers, subset, label_noise
        )
        self.root = root
        self.check_images = check_images
        # stored under another name: ``image_size`` is the (H, W) property every data set has
        self.image_size_arg = image_size
        self.train_dir = train_dir
        self.test_dir = test_dir

    def _scan(self, root: str, field: str, sub: str, allow_empty: bool) -> tuple[list[str], list[str], list[int]]:
        folder = os.path.join(root, sub)
        layout = f"root/{self.train_dir}/<class>/*.jpg and root/{self.test_dir}/<class>/*.jpg"
        problem = folder_problem(folder)
        if problem:
            raise ConfigError(
                f"ImageFolderData.{field}: {folder!r} {problem}. Expected layout: {layout}. "
                f"Set {field} (or root) to match the folders on disk."
            )
        with os.scandir(folder) as it:
            classes = sorted(e.name for e in it if e.is_dir())
        if not classes:
            raise ConfigError(
                f"ImageFolderData.{field}: {folder!r} has no class folders. Expected layout: {layout}."
            )
        paths: list[str] = []
        targets: list[int] = []
        for k, c in enumerate(classes):
            files = _images_in(os.path.join(folder, c))
            if not files and not allow_empty:
                raise ConfigError(
                    f"ImageFolderData.{field}: class folder {os.path.join(folder, c)!r} has no images "
                    f"({', '.join(_IMAGE_EXTENSIONS)}). Add images or remove the folder."
                )
            paths += files
            targets += [k] * len(files)
        return classes, paths, targets

    def _load(self) -> _Loaded:
        if not isinstance(self.image_size_arg, int) or self.image_size_arg < 1:
            raise ConfigError(f"ImageFolderData.image_size is {self.image_size_arg}; it must be an integer >= 1.")
        root = _check_root("ImageFolderData", self.root, f"{self.train_dir}/<class>/ and {self.test_dir}/<class>/")
        classes, paths, targets = self._scan(root, "train_dir", self.train_dir, allow_empty=False)
        test_classes, test_paths, test_targets = self._scan(root, "test_dir", self.test_dir, allow_empty=True)
        if classes != test_classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            raise ConfigError(
                f"ImageFolderData.test_dir: the class folders of {self.test_dir!r} differ from those of "
                f"{self.train_dir!r} (only in train: {only_train[:5]}, only in test: {only_test[:5]}). "
                "Give both the same class folders (an empty folder is allowed in test)."
            )
        if not test_paths:
            raise ConfigError(f"ImageFolderData.test_dir: {os.path.join(root, self.test_dir)!r} has no images.")
        size = (self.image_size_arg, self.image_size_arg)
        return _Loaded(
            train=_FileSource(paths, targets, size),
            test=_FileSource(test_paths, test_targets, size),
            class_names=classes,
            in_channels=3,
            image_size=size,
        )

    def _too_few_classes(self, loaded: _Loaded) -> str:
        folder = os.path.join(os.path.expanduser(str(self.root)), self.train_dir)
        n = len(loaded.class_names)
        return (
            f"ImageFolderData.train_dir: {folder!r} has {n} class folder{'s' if n != 1 else ''} "
            f"({list(loaded.class_names)}); classification needs at least 2 classes (with one, every prediction is "
            f"right and training reports 100% accuracy). Add a folder per class: root/{self.train_dir}/<class>/*.jpg."
        )

    def _check_files(self, loaded: _Loaded, train_indices: np.ndarray) -> None:
        if not self.check_images:
            return
        assert isinstance(loaded.train, _FileSource) and isinstance(loaded.test, _FileSource)
        paths = [str(p) for p in loaded.train.paths[np.sort(train_indices)]] + [str(p) for p in loaded.test.paths]
        problem = images_problem("ImageFolderData", paths)
        if problem is not None:
            raise ConfigError(problem)

    def _augmentation(self, image_size: tuple[int, int]) -> list[Callable]:
        return [v2.RandomCrop(image_size, padding=max(1, image_size[0] // 8)), v2.RandomHorizontalFlip()]
