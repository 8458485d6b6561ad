"""detectron2's dataset dicts for the engine: :class:`Detectron2Split`, one split's dicts through a
``DatasetMapper`` with seeded augmentation, and the catalog helpers
:class:`~collab_distill.tasks.detection.detectron2.Detectron2Coco` uses (annotation noise applied
to a dataset dict, removing a registered dataset).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from collab_distill.data import IndexedDataset, SeededSample
from collab_distill.task import ConfigError

__all__ = ["Detectron2Split", "with_boxes", "unregister_dataset"]


class Detectron2Split(IndexedDataset):
    """One split's detectron2 dataset dicts through a ``DatasetMapper``; a training sample's
    augmentation (scale choice, flip; numpy's RNG in detectron2) is seeded by its sample seed."""

    def __init__(self, records: list[dict[str, Any]], mapper: Any, name: str, flipped: Optional[np.ndarray] = None) -> None:
        self.records = records
        self.mapper = mapper
        self.name = name
        #: per image, whether annotation noise corrupted any of its boxes (``None``: no noise)
        self.flipped = flipped

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | SeededSample) -> dict[str, Any]:
        i, seed = self.split_key(key)
        record = self.records[i]
        if seed is None:
            out = self.mapper(record)
        else:
            state = np.random.get_state()
            np.random.seed(seed % (2**32))
            try:
                out = self.mapper(record)
            finally:
                np.random.set_state(state)
        out.update(index=i, seed=-1 if seed is None else seed, split=self.name)
        return out


def with_boxes(record: dict[str, Any], split: Any, contiguous: Mapping[int, int]) -> dict[str, Any]:
    """A copy of a detectron2 dataset dict whose annotations are those ``split`` trains on (after
    annotation noise). Each of detectron2's annotations is matched to the file's box it was read
    from (same box and class, in file order); crowd boxes and the ones the split leaves out stay."""
    from detectron2.structures import BoxMode

    image_id = record["image_id"]
    boxes = split.index.boxes[image_id]  # [(xywh, category id, position in the file)]
    annotations, pending = [], list(range(len(boxes)))
    for annotation in record["annotations"]:
        match = next((k for k in pending if not annotation.get("iscrowd", 0)
                      and [float(v) for v in annotation["bbox"]] == boxes[k][0]
                      and contiguous[boxes[k][1]] == annotation["category_id"]), None)
        if match is None:
            annotations.append(annotation)
            continue
        pending.remove(match)
        xywh, category, position = boxes[match]
        change = split.corruption.boxes.get(position, (xywh, category))
        if change is None:
            continue  # dropped
        annotations.append({**annotation, "bbox": list(change[0]), "bbox_mode": BoxMode.XYWH_ABS,
                            "category_id": contiguous[change[1]]})
    if pending:
        raise ConfigError(f"annotation_noise: {len(pending)} box(es) of image {image_id} are not among detectron2's "
                          "annotations of that image; cannot apply the noise to them")
    return {**record, "annotations": annotations}


def unregister_dataset(name: str) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
