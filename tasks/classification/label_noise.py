"""Synthetic label noise of a classification ``train`` split: the symmetric and the
instance-dependent (Xia et al. 2020) generators, and the lazy pixel reader the instance-dependent
one uses on file-backed training sets. The option that picks one, :class:`LabelNoise`, is checked
with the other options in :mod:`~collab_distill.tasks.classification.base`.

Separate from the data sets: the generators are plain numpy functions that other tasks use as
well (detection's annotation noise).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from collab_distill.tasks.classification.sources import Source, TensorSource

__all__ = ["symmetric_noise", "instance_dependent_noise", "SplitPixels"]

# ----------------------------------------------------------------------------------------------
# label noise of the train split
# ----------------------------------------------------------------------------------------------


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


class SplitPixels:
    """The flattened pixels of a split's images on the 0..255 scale, read only when indexed:
    :func:`instance_dependent_noise` reads one class at a time, so a file-backed training set
    is read once from disk (resized as the data set does) without being held in memory whole."""

    def __init__(self, source: Source, indices: np.ndarray, dim: int) -> None:
        self.source = source
        self.indices = indices
        self.shape = (len(indices), dim)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        picked = self.indices[rows]
        if isinstance(self.source, TensorSource):
            images = self.source.images[torch.from_numpy(picked)]
        else:
            images = torch.stack([self.source.load(int(j)) for j in picked])
        x = images.reshape(len(picked), -1).float()
        if images.dtype != torch.uint8:
            x = x * 255.0  # float sources hold [0, 1]
        return x.numpy()
