"""COCO-format detection data: the ``DETECTRON2_DATASETS`` layout, seeded meta/val splits.

``train`` annotations are split (seeded) into train / meta / val; ``test`` is a separate
annotation file (COCO's val2017, whose labels are public). Every file and image is checked when
the task is set up, before any model is built, so a bad path fails in a second, not an epoch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from collab_distill.data import IndexedDataset, SeededSample, augment_seeded, folder_problem, images_problem
from collab_distill.task import ConfigError
from collab_distill.tasks.detection.noise import AnnotationNoise, Corruption, corrupt_boxes, crop_features

__all__ = ["CocoDetection", "CocoSplit", "CocoIndex"]


@dataclass
class CocoIndex:
    """One annotation file, read once: images, their boxes, and the category ids."""

    path: Path
    image_root: Path
    images: list[dict[str, Any]]
    #: image id -> [(xywh, category id, the annotation's position in the file)], crowd boxes left out
    boxes: dict[int, list[tuple[list[float], int, int]]]
    categories: list[dict[str, Any]]
    document: dict[str, Any]

    @classmethod
    def load(cls, path: Path, image_root: Path, field: str) -> CocoIndex:
        if not path.is_file():
            raise ConfigError(f"{field}: annotation file {str(path)!r} does not exist; give the path of a COCO-format "
                              f"instances JSON (e.g. ROOT/annotations/instances_train2017.json)")
        try:
            document = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{field}: {str(path)!r} is not valid JSON ({err})") from err
        missing_keys = [k for k in ("images", "annotations", "categories") if k not in document]
        if missing_keys:
            raise ConfigError(f"{field}: {str(path)!r} is not a COCO instances file: no {missing_keys} key(s)")
        if not document["images"]:
            raise ConfigError(f"{field}: {str(path)!r} lists no images; the split would be empty")
        problem = folder_problem(image_root)
        if problem:
            raise ConfigError(f"{field}: image folder {str(image_root)!r} {problem}")
        missing = [im["file_name"] for im in document["images"] if not (image_root / im["file_name"]).is_file()]
        if missing:
            raise ConfigError(
                f"{field}: {len(missing)} of {len(document['images'])} images listed in {str(path)!r} are not in "
                f"{str(image_root)!r} (first: {missing[:3]}); fix the image folder or the annotation file"
            )
        known = {c["id"] for c in document["categories"]}
        sizes = {im["id"]: (im.get("width"), im.get("height")) for im in document["images"]}
        boxes: dict[int, list[tuple[list[float], int, int]]] = {im["id"]: [] for im in document["images"]}
        for position, a in enumerate(document["annotations"]):
            name = a.get("id", f"#{position}") if isinstance(a, dict) else f"#{position}"
            _check_annotation(a, sizes, f"{field}: annotation {name} in {str(path)!r}")
            if a["category_id"] not in known:
                raise ConfigError(f"{field}: annotation {a.get('id')} in {str(path)!r} has category_id {a['category_id']}, "
                                  f"which is not among the file's categories {sorted(known)}")
            if a["image_id"] not in boxes:
                raise ConfigError(f"{field}: annotation {a.get('id')} in {str(path)!r} refers to image_id {a['image_id']}, "
                                  "which is not in its images list")
            x, y, w, h = a["bbox"]
            if a.get("iscrowd", 0) or w <= 1 or h <= 1:
                continue
            boxes[a["image_id"]].append(([float(x), float(y), float(w), float(h)], a["category_id"], position))
        return cls(path, image_root, list(document["images"]), boxes, list(document["categories"]), document)


def _check_annotation(a: Any, sizes: dict[Any, tuple[Any, Any]], where: str) -> None:
    """One clear error for an annotation a detector could not use: keys missing, a bbox that is
    not four finite numbers ``[x, y, width, height]``, a negative size, or a box entirely outside
    its image (when the image lists its width and height)."""
    fix = "fix or remove it in the annotation file"
    if not isinstance(a, dict):
        raise ConfigError(f"{where} is {type(a).__name__}, not an object with image_id, category_id and bbox; {fix}")
    missing = [k for k in ("image_id", "category_id", "bbox") if k not in a]
    if missing:
        raise ConfigError(f"{where} has no {missing} key(s); COCO annotations need image_id, category_id and "
                          f"bbox [x, y, width, height]; {fix}")
    box = a["bbox"]
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise ConfigError(f"{where} has bbox {box!r}; it must be four finite numbers [x, y, width, height]; {fix}")
    x, y, w, h = box
    if w < 0 or h < 0:
        raise ConfigError(f"{where} has bbox {box!r} with a negative width or height (COCO boxes are "
                          f"[x, y, width, height], not corners); {fix}")
    width, height = sizes.get(a["image_id"], (None, None))
    if isinstance(width, (int, float)) and isinstance(height, (int, float)):
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            raise ConfigError(f"{where} has bbox {box!r}, entirely outside its {width}x{height} image; {fix}")


class CocoSplit(IndexedDataset):
    """Images of one split with their boxes (xyxy, pixels) and contiguous labels ``1..K``
    (torchvision's convention; 0 is background). Training samples are flipped horizontally
    with probability ``flip`` under their sample seed."""

    def __init__(self, index: CocoIndex, image_ids: list[int], label_of: dict[int, int], flip: float = 0.0,
                 name: str = "", corruption: Optional[Corruption] = None) -> None:
        self.index = index
        self.by_id = {im["id"]: im for im in index.images}
        self.image_ids = image_ids
        self.label_of = label_of
        self.flip = flip
        self.name = name
        #: what annotation noise did to this split (``None``: its boxes are the file's)
        self.corruption = corruption
        #: per image of the split (in split order): whether any of its boxes was corrupted
        self.corrupted: Optional[np.ndarray] = None
        if corruption is not None:
            self.corrupted = np.array([corruption.image_corrupted(i) for i in image_ids], dtype=bool)

    @property
    def flipped(self) -> Optional[np.ndarray]:
        """:attr:`corrupted` under the name the classification splits use for their label noise."""
        return self.corrupted

    def entries(self, image_id: int) -> list[tuple[list[float], int]]:
        """The boxes of one image as training sees them: ``[(xywh, category id)]``."""
        boxes = self.index.boxes[image_id]
        if self.corruption is None:
            return [(xywh, category) for xywh, category, _ in boxes]
        kept = (self.corruption.boxes.get(annotation_id, (xywh, category)) for xywh, category, annotation_id in boxes)
        return [box for box in kept if box is not None]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | SeededSample) -> dict[str, Any]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        i, seed = self.split_key(key)
        image_id = self.image_ids[i]
        info = self.by_id[image_id]
        with Image.open(self.index.image_root / info["file_name"]) as im:
            image = pil_to_tensor(im.convert("RGB")).float().div_(255)
        entries = self.entries(image_id)
        boxes = torch.tensor([[x, y, x + w, y + h] for (x, y, w, h), _ in entries], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label_of[c] for _, c in entries], dtype=torch.int64)
        if seed is not None and self.flip > 0 and augment_seeded(seed % (2**63), lambda: torch.rand(()).item()) < self.flip:
            width = image.shape[-1]
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return {"image": image, "boxes": boxes, "labels": labels, "image_id": image_id, "index": i,
                "seed": -1 if seed is None else seed, "split": self.name}


class CocoDetection:
    """A COCO-format data set.

    Args:
        root: a folder in detectron2's ``DETECTRON2_DATASETS/coco`` layout
            (``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``);
            the four paths below default to it.
        train_annotations, train_images: the training annotations and image folder.
        test_annotations, test_images: the test split (COCO: val2017).
        meta_fraction, val_fraction: seeded fractions of the training images held out as the
            meta split (for bilevel methods) and the val split (model selection).
        batch_size, eval_batch_size, num_workers: loader settings.
        flip: probability of a horizontal flip of a training image.
        keep_empty: keep training images without boxes (COCO has ~1%).
        subset: use only the first N training images (quick runs).
        annotation_noise: corrupt the ``train`` split's boxes (class flips, dropped and
            jittered boxes; seeded; see :class:`~collab_distill.tasks.detection.noise.AnnotationNoise`);
            meta, val and test keep the file's boxes. ``None``: no noise.
        check_images: At set-up, open every image the splits use, so that a file PIL cannot
            read is named before training starts rather than stopping the run when it is loaded.
    """

    def __init__(
        self,
        root: str = "data/coco",
        train_annotations: Optional[str] = None,
        train_images: Optional[str] = None,
        test_annotations: Optional[str] = None,
        test_images: Optional[str] = None,
        meta_fraction: float = 0.1,
        val_fraction: float = 0.1,
        batch_size: int = 4,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        flip: float = 0.5,
        keep_empty: bool = False,
        subset: Optional[int] = None,
        annotation_noise: Optional[AnnotationNoise] = None,
        check_images: bool = True,
    ) -> None:
        for field, value in (("meta_fraction", meta_fraction), ("val_fraction", val_fraction), ("flip", flip)):
            if not 0 <= value < 1:
                raise ConfigError(f"CocoDetection.{field}={value} must be in [0, 1)")
        if meta_fraction + val_fraction >= 1:
            raise ConfigError("CocoDetection: meta_fraction + val_fraction must leave training images")
        if batch_size < 1 or num_workers < 0 or (subset is not None and subset < 1):
            raise ConfigError("CocoDetection: batch_size >= 1, num_workers >= 0 and subset >= 1 are required")
        base = Path(root)
        self.train_annotations = (Path(train_annotations) if train_annotations
                                  else base / "annotations" / "instances_train2017.json")
        self.train_images = Path(train_images) if train_images else base / "train2017"
        self.test_annotations = Path(test_annotations) if test_annotations else base / "annotations" / "instances_val2017.json"
        self.test_images = Path(test_images) if test_images else base / "val2017"
        self.meta_fraction, self.val_fraction = meta_fraction, val_fraction
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.flip, self.keep_empty, self.subset = flip, keep_empty, subset
        if annotation_noise is not None and not isinstance(annotation_noise, AnnotationNoise):
            raise ConfigError(f"{type(self).__name__}.annotation_noise is {annotation_noise!r}; give an AnnotationNoise, "
                              "e.g. {class_flip: 0.3, kind: symmetric} in YAML, or null")
        if annotation_noise is not None:
            annotation_noise.check(f"{type(self).__name__}.annotation_noise")
        self.annotation_noise = annotation_noise
        self.check_images = check_images
        self.splits: dict[str, CocoSplit] = {}
        self.categories: list[dict[str, Any]] = []

    def setup(self, seed: int) -> None:
        train = CocoIndex.load(self.train_annotations, self.train_images, "task.data.train_annotations")
        test = CocoIndex.load(self.test_annotations, self.test_images, "task.data.test_annotations")
        ids = sorted(c["id"] for c in train.categories)
        if not ids:
            raise ConfigError(f"task.data.train_annotations: {str(self.train_annotations)!r} declares no categories")
        test_ids = sorted(c["id"] for c in test.categories)
        if test_ids != ids:
            raise ConfigError(f"task.data: the test annotations' category ids {test_ids} differ from the training ones {ids}; "
                              "both files must declare the same categories")
        self.categories = sorted(train.categories, key=lambda c: c["id"])
        label_of = {cid: i + 1 for i, cid in enumerate(ids)}
        image_ids = [im["id"] for im in train.images if self.keep_empty or train.boxes[im["id"]]]
        if self.subset is not None:
            image_ids = image_ids[: self.subset]
        generator = torch.Generator().manual_seed(seed + 1_234)
        order = [image_ids[i] for i in torch.randperm(len(image_ids), generator=generator).tolist()]
        n_meta, n_val = round(len(order) * self.meta_fraction), round(len(order) * self.val_fraction)
        parts = {"meta": order[:n_meta], "val": order[n_meta:n_meta + n_val], "train": order[n_meta + n_val:]}
        for split, chosen in parts.items():
            needed = (split == "train" or (split == "meta" and self.meta_fraction > 0)
                      or (split == "val" and self.val_fraction > 0))
            if not chosen and needed:
                raise ConfigError(f"task.data: the {split} split is empty ({len(image_ids)} usable training images with boxes); "
                                  "use more images or smaller meta_fraction/val_fraction")
        if not parts["val"]:
            parts["val"] = parts["meta"] or parts["train"][: max(1, len(parts["train"]) // 10)]
        if not parts["meta"]:
            parts["meta"] = parts["val"]
        self._check_files([(train, [i for ids_ in parts.values() for i in ids_]), (test, [im["id"] for im in test.images])])
        corruption = self._corrupt(train, sorted(parts["train"]), ids, seed)
        self.splits = {
            "train": CocoSplit(train, sorted(parts["train"]), label_of, flip=self.flip, name="train", corruption=corruption),
            "meta": CocoSplit(train, sorted(parts["meta"]), label_of, flip=self.flip, name="meta"),
            "val": CocoSplit(train, sorted(parts["val"]), label_of, name="val"),
            "test": CocoSplit(test, [im["id"] for im in test.images], label_of, name="test"),
        }

    def _check_files(self, used: list[tuple[CocoIndex, list[int]]]) -> None:
        """Every image the splits use opens in PIL (``check_images``)."""
        if not self.check_images:
            return
        by_id = [{im["id"]: im for im in index.images} for index, _ in used]
        paths = [str(index.image_root / names[i]["file_name"]) for (index, ids), names in zip(used, by_id)
                 for i in sorted(set(ids))]
        problem = images_problem(type(self).__name__, paths)
        if problem is not None:
            raise ConfigError(problem)

    def _corrupt(self, index: CocoIndex, image_ids: list[int], category_ids: list[int], seed: int) -> Optional[Corruption]:
        """The annotation noise of the training images (``None`` without noise)."""
        noise = self.annotation_noise
        if noise is None or not noise.active:
            return None
        from PIL import Image

        sizes = {im["id"]: (int(im.get("height", 0)), int(im.get("width", 0))) for im in index.images}
        by_id = {im["id"]: im for im in index.images}
        for image_id in image_ids:
            if not all(sizes[image_id]):  # COCO files carry the sizes; read them where one does not
                with Image.open(index.image_root / by_id[image_id]["file_name"]) as im:
                    sizes[image_id] = (im.height, im.width)

        def crops(image_id: int, boxes: list[Any]) -> np.ndarray:
            with Image.open(index.image_root / by_id[image_id]["file_name"]) as im:
                return crop_features(im.convert("RGB"), boxes)

        boxes = {i: [(a, xywh, c) for xywh, c, a in index.boxes[i]] for i in image_ids}
        return corrupt_boxes(noise, boxes, sizes, category_ids, noise.seed if noise.seed is not None else seed, crops)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def loader_options(self, split: str) -> dict[str, Any]:
        """``DataLoader`` settings of a split (training splits use ``batch_size``)."""
        batch = self.batch_size if split in ("train", "meta") else (self.eval_batch_size or self.batch_size)
        return {"batch_size": batch, "num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}

    def category_id(self, label: Tensor) -> Tensor:
        """Contiguous labels ``1..K`` back to the data set's category ids."""
        ids = torch.tensor([c["id"] for c in self.categories], device=label.device)
        return ids[label - 1]

    def ground_truth(self, split: str) -> dict[str, Any]:
        """A COCO document with exactly this split's images and annotations (for pycocotools)."""
        part = self.splits[split]
        keep = set(part.image_ids)
        doc = part.index.document
        annotations = []
        for a in doc["annotations"]:
            if a["image_id"] in keep:
                w, h = a["bbox"][2], a["bbox"][3]
                annotations.append({"area": w * h, "iscrowd": 0, **a})
        return {"images": [im for im in doc["images"] if im["id"] in keep], "annotations": annotations,
                "categories": doc["categories"]}
