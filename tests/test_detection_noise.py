"""Annotation noise for COCO-format detection data: rates, per-image flags, clean meta/val/test
splits, the same corruption for the same seed, instance-dependent flips, both adapters."""

from __future__ import annotations

import numpy as np
import pytest

from collab_distill.task import ConfigError
from collab_distill.tasks.detection.data import CocoDetection
from collab_distill.tasks.detection.noise import AnnotationNoise, corrupt_boxes
from collab_distill.tasks.detection.shapes import write_shapes_coco


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_coco(tmp_path_factory.mktemp("shapes_noise"), train=80, val=8, size=64, seed=5)


def _data(root, **noise):
    data = CocoDetection(root=str(root), meta_fraction=0.2, val_fraction=0.2,
                         annotation_noise=AnnotationNoise(**noise) if noise else None)
    data.setup(0)
    return data


def _boxes(split):
    return {i: split.entries(i) for i in split.image_ids}


def test_class_flips_hit_the_rate_on_the_training_split_only_and_are_flagged_per_image(shapes):
    clean, noisy = _data(shapes), _data(shapes, class_flip=0.4)
    assert clean.splits["train"].corruption is None and clean.splits["train"].corrupted is None
    for split in ("meta", "val", "test"):  # held-out splits keep the file's boxes
        assert noisy.splits[split].corruption is None and _boxes(noisy.splits[split]) == _boxes(clean.splits[split])
    before, after = _boxes(clean.splits["train"]), _boxes(noisy.splits["train"])
    changed = {i: sum(a[1] != b[1] for a, b in zip(before[i], after[i])) for i in before}
    total = sum(len(v) for v in before.values())
    assert total > 100 and 0.28 < sum(changed.values()) / total < 0.52
    for i in before:  # the same boxes in the same places: only classes change
        assert [a[0] for a in before[i]] == [b[0] for b in after[i]]
    split = noisy.splits["train"]
    assert split.corruption is not None
    assert {i: split.corruption.per_image[i]["class_flips"] for i in before} == changed
    flags = split.corrupted
    assert flags is not None and flags.dtype == bool and len(flags) == len(split)
    assert flags.tolist() == [changed[i] > 0 for i in split.image_ids]
    assert split.flipped is flags  # the name the C-Net's noise report reads
    # what a training sample holds is the noisy annotation
    k = int(np.flatnonzero(flags)[0])
    sample = split[(k, 1)]
    labels = [split.label_of[c] for _, c in after[split.image_ids[k]]]
    assert sorted(sample["labels"].tolist()) == sorted(labels)


def test_same_seed_same_corruption_and_the_noise_seed_decouples_it_from_the_run(shapes):
    noise = {"class_flip": 0.3, "drop": 0.2, "jitter": 0.3}
    first, again = _data(shapes, **noise), _data(shapes, **noise)
    assert _boxes(first.splits["train"]) == _boxes(again.splits["train"])
    other = CocoDetection(root=str(shapes), meta_fraction=0.2, val_fraction=0.2,
                          annotation_noise=AnnotationNoise(**noise, seed=7))
    other.setup(0)
    assert _boxes(other.splits["train"]) != _boxes(first.splits["train"])


def test_dropped_and_jittered_boxes_stay_in_the_image_and_are_counted(shapes):
    clean, noisy = _data(shapes), _data(shapes, drop=0.3, jitter=0.5, jitter_scale=0.3)
    split = noisy.splits["train"]
    counts = split.corruption.per_image
    before, after = _boxes(clean.splits["train"]), _boxes(split)
    dropped = sum(c["dropped"] for c in counts.values())
    assert sum(len(v) for v in before.values()) - sum(len(v) for v in after.values()) == dropped
    assert sum(c["dropped"] for c in counts.values()) > 0 and sum(c["jittered"] for c in counts.values()) > 0
    moved = 0
    for i, boxes in after.items():
        for (x, y, w, h), _ in boxes:
            assert x >= 0 and y >= 0 and w >= 2 and h >= 2 and x + w <= 64 and y + h <= 64
        moved += sum(b[0] not in [a[0] for a in before[i]] for b in boxes)
    assert moved == sum(c["jittered"] for c in counts.values())
    assert all(c["class_flips"] == 0 for c in counts.values())


def test_instance_dependent_flips_pick_the_wrong_class_from_the_object():
    # two images of the same objects: identical pixels and class give the same wrong class
    boxes = {i: [(100 * i + k, [0.0, 0.0, 8.0, 8.0], 1 + 2 * (k % 2)) for k in range(40)] for i in (1, 2)}
    pixels = np.random.default_rng(0).integers(0, 256, (40, 192)).astype(np.float64)

    def crops(image_id, image_boxes):
        return pixels[: len(image_boxes)]

    noise = AnnotationNoise(class_flip=0.99, kind="instance")
    out = corrupt_boxes(noise, boxes, {1: (64, 64), 2: (64, 64)}, [1, 3, 7], seed=0, crops=crops)
    first = [out.boxes[100 + k][1] for k in range(40)]
    second = [out.boxes[200 + k][1] for k in range(40)]
    flipped = [k for k in range(40) if first[k] != boxes[1][k][2] and second[k] != boxes[2][k][2]]
    assert len(flipped) > 30 and all(first[k] == second[k] for k in flipped)
    # symmetric flips ignore the pixels: both wrong classes appear for one true class
    sym = corrupt_boxes(AnnotationNoise(class_flip=0.99), boxes, {1: (64, 64), 2: (64, 64)}, [1, 3, 7], seed=0)
    wrong = {sym.boxes[i * 100 + k][1] for i in (1, 2) for k in range(0, 40, 2)} - {1}
    assert wrong == {3, 7}


@pytest.mark.parametrize(("noise", "fragment"), [
    ({"class_flip": 1.5}, "class_flip=1.5 must be a fraction in [0, 1)"),
    ({"kind": "pairwise"}, "kind='pairwise'"),
    ({"jitter_scale": 0.0}, "jitter_scale=0.0"),
    ({"seed": -1}, "seed=-1"),
])
def test_bad_noise_settings_are_one_message_naming_the_field(noise, fragment):
    with pytest.raises(ConfigError, match=r"CocoDetection\.annotation_noise") as err:
        CocoDetection(root="unused", annotation_noise=AnnotationNoise(**noise))
    assert fragment in str(err.value)


def test_detectron2_trains_on_the_same_corrupted_boxes(shapes):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (see the README)")
    from collab_distill.tasks.detection.detectron2 import Detectron2Coco, Detectron2Detection

    data = Detectron2Coco(root=str(shapes), meta_fraction=0.2, val_fraction=0.2, dataset_name="noise_test",
                          annotation_noise=AnnotationNoise(class_flip=0.4, kind="instance", drop=0.2, jitter=0.2))
    task = Detectron2Detection(data, min_size=64, max_size=64)
    task.setup(0)
    split = data.splits["train"]
    # the flags the C-Net's report reads, on the task's training data set
    assert task.dataset("train").flipped.tolist() == split.corrupted.tolist() and task.dataset("val").flipped is None
    contiguous = {1: 0, 3: 1, 7: 2}
    for record, image_id in zip(data.records["train"], split.image_ids):
        ours = split.entries(image_id)
        assert [([float(v) for v in a["bbox"]], a["category_id"]) for a in record["annotations"]] == \
            [(xywh, contiguous[c]) for xywh, c in ours]
    clean = _data(shapes)
    for record, image_id in zip(data.records["val"], data.splits["val"].image_ids):
        assert [[float(v) for v in a["bbox"]] for a in record["annotations"]] == \
            [xywh for xywh, _ in clean.splits["val"].entries(image_id)]
