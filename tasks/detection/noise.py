"""Seeded annotation noise for COCO-format detection data: the training split only.

Detection annotations go wrong in three ways, and :class:`AnnotationNoise` makes each one, with
its own rate, on the ``train`` split (``meta``, ``val`` and ``test`` keep their clean boxes):

* **class flips**: a box keeps its place but gets another class. ``symmetric``: the new class is
  drawn uniformly among the others. ``instance``: which wrong class depends on the object, as in
  Xia et al.'s instance-dependent noise: each box's pixels (its crop, resized to 8x8) are
  projected by a random matrix of its true class and the wrong class is drawn from the softmax
  of that projection (the same generator as the classification data's ``label_noise``), so
  similar-looking objects of a class are mislabelled alike;
* **dropped boxes** (missing annotations): the object is in the image but not in the labels;
* **jittered boxes** (sloppy boxes): each side moves by up to ``jitter_scale`` of the box's width
  or height, within the image.

What happened to every box is kept (:class:`Corruption`), and each image of the split is flagged
when any of its boxes was changed, so a run can ask whether a method's per-image weights find
the corrupted images. The draws depend only on the seed and the annotation file.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np

from collab_distill.task import ConfigError

__all__ = ["AnnotationNoise", "Corruption", "corrupt_boxes", "BOX_FEATURE_SIZE"]

#: side of the square crop (per channel) that decides an instance-dependent flip
BOX_FEATURE_SIZE = 8

#: one box as ``(key, [x, y, w, h], category id)``; the key (the annotation's position in its
#: file) names the box in :attr:`Corruption.boxes`
Box = tuple[int, list[float], int]


@dataclass(frozen=True)
class AnnotationNoise:
    """Corrupt the ``train`` split's boxes (seeded); meta, val and test stay clean.

    In YAML: ``annotation_noise: {class_flip: 0.3, kind: instance}``.

    Args:
        class_flip: expected fraction of boxes whose class changes, in ``[0, 1)``.
        kind: ``symmetric`` (the new class uniformly among the others) or ``instance`` (which
            wrong class depends on the object's pixels; reads every training image once).
        drop: fraction of boxes removed from the annotations, in ``[0, 1)``.
        jitter: fraction of boxes whose sides move, in ``[0, 1)``.
        jitter_scale: how far a side may move, as a fraction of the box's width or height.
        seed: the noise's seed; ``None`` uses the run's seed.
    """

    class_flip: float = 0.0
    kind: Literal["symmetric", "instance"] = "symmetric"
    drop: float = 0.0
    jitter: float = 0.0
    jitter_scale: float = 0.2
    seed: Optional[int] = None

    def check(self, field_name: str) -> None:
        """One :class:`ConfigError` naming the field when a setting is out of range."""
        for name in ("class_flip", "drop", "jitter"):
            value: float = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{field_name}.{name}={value!r} must be a fraction in [0, 1)")
        if self.kind not in ("symmetric", "instance"):
            raise ConfigError(f"{field_name}.kind={self.kind!r}: choose 'symmetric' (uniform over the other classes) "
                              "or 'instance' (the wrong class depends on the object)")
        if not 0.0 < self.jitter_scale <= 1.0:
            raise ConfigError(f"{field_name}.jitter_scale={self.jitter_scale!r} must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"{field_name}.seed={self.seed!r} must be a non-negative integer or null (the run's seed)")

    @property
    def active(self) -> bool:
        return self.class_flip > 0 or self.drop > 0 or self.jitter > 0


@dataclass
class Corruption:
    """What the noise did to one split: per box key the box as training sees it (``(xywh,
    category id)``, ``None`` when dropped), and per image the counts of each kind of change."""

    boxes: dict[int, Optional[tuple[list[float], int]]] = field(default_factory=dict)
    per_image: dict[int, dict[str, int]] = field(default_factory=dict)

    def image_corrupted(self, image_id: int) -> bool:
        counts = self.per_image.get(image_id, {})
        return any(counts.get(k, 0) for k in ("class_flips", "dropped", "jittered"))


def corrupt_boxes(
    noise: AnnotationNoise,
    boxes: Mapping[int, list[Box]],
    image_sizes: Mapping[int, tuple[int, int]],
    category_ids: list[int],
    seed: int,
    crops: Optional[Callable[[int, list[Box]], np.ndarray]] = None,
) -> Corruption:
    """Corrupt the boxes of the images in ``boxes`` (image id -> its boxes, in file order).

    ``image_sizes`` gives each image's ``(height, width)`` (jittered boxes stay inside);
    ``crops(image_id, boxes)`` returns the boxes' pixels as ``[n, 3 * 8 * 8]`` on the 0..255
    scale, needed only for ``kind: instance``. Draws: one generator seeded by ``seed`` (the
    noise's own seed, or the run's) in the order of the sorted image ids, so the result depends
    only on the seed and the boxes.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD37]))
    ids = sorted(boxes)
    flat = [(image_id, box) for image_id in ids for box in boxes[image_id]]
    n = len(flat)
    out = Corruption(per_image={i: {"boxes": len(boxes[i]), "class_flips": 0, "dropped": 0, "jittered": 0} for i in ids})
    if n == 0:
        return out
    index_of = {c: k for k, c in enumerate(category_ids)}
    labels = np.array([index_of[box[2]] for _, box in flat], dtype=np.int64)
    classes = len(category_ids)
    # every draw is made for every box, whatever the rates, so one kind's rate never shifts another's draws
    flip_draw = rng.random(n) < noise.class_flip
    drop_draw = rng.random(n) < noise.drop
    jitter_draw = rng.random(n) < noise.jitter
    shifts = rng.uniform(-noise.jitter_scale, noise.jitter_scale, size=(n, 4))
    new_labels = labels.copy()
    if classes > 1 and noise.class_flip > 0:
        if noise.kind == "symmetric":
            offset = rng.integers(1, classes, size=n)
            new_labels = np.where(flip_draw, (labels + offset) % classes, labels)
        else:
            from collab_distill.tasks.classification.data import instance_dependent_noise

            if crops is None:
                raise ConfigError("annotation_noise.kind=instance needs the boxes' pixels")
            pixels = np.concatenate([crops(image_id, boxes[image_id]) for image_id in ids]).astype(np.float64)
            # the projection picks *which* wrong class; whether a box flips is flip_draw (the rate asked for)
            wrong, _ = instance_dependent_noise(pixels, labels, classes, 1.0 - 1e-9, rng, std=0.0)
            new_labels = np.where(flip_draw & (wrong != labels), wrong, labels)
    flipped = new_labels != labels
    for k, (image_id, (key, xywh, _)) in enumerate(flat):
        counts = out.per_image[image_id]
        if drop_draw[k]:
            out.boxes[key] = None
            counts["dropped"] += 1
            continue
        x, y, w, h = xywh
        if jitter_draw[k]:
            height, width = image_sizes[image_id]
            x0 = float(np.clip(x + shifts[k, 0] * w, 0, width - 2))
            y0 = float(np.clip(y + shifts[k, 1] * h, 0, height - 2))
            x1 = float(np.clip(x + w + shifts[k, 2] * w, x0 + 2, width))
            y1 = float(np.clip(y + h + shifts[k, 3] * h, y0 + 2, height))
            xywh = [x0, y0, x1 - x0, y1 - y0]
            counts["jittered"] += 1
        if flipped[k]:
            counts["class_flips"] += 1
        out.boxes[key] = (list(xywh), category_ids[int(new_labels[k])])
    return out


def crop_features(image: Any, boxes: list[Box]) -> np.ndarray:
    """``[n, 3 * 8 * 8]``: each box's pixels (a PIL RGB image), resized to 8x8, 0..255."""
    from PIL import Image

    rows = []
    for _, (x, y, w, h), _ in boxes:
        crop = image.crop((int(x), int(y), int(np.ceil(x + w)), int(np.ceil(y + h)))).resize(
            (BOX_FEATURE_SIZE, BOX_FEATURE_SIZE), Image.BILINEAR)  # type: ignore[attr-defined]  # set by setattr; Pillow's types lack it
        rows.append(np.asarray(crop, dtype=np.float64).transpose(2, 0, 1).reshape(-1))
    return np.stack(rows) if rows else np.zeros((0, 3 * BOX_FEATURE_SIZE**2))
