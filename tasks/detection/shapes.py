"""A small synthetic detection data set in COCO format, for trying things on a CPU.

Every image is a noisy background with 1-4 filled shapes (rectangle, ellipse, triangle) of
random size, position and colour; the annotation is each shape's bounding box. Category ids are
deliberately not contiguous (1, 3, 7), as in COCO, so the id mapping is exercised.

The layout is detectron2's ``DETECTRON2_DATASETS`` layout for COCO::

    ROOT/annotations/instances_train2017.json   ROOT/train2017/*.png
    ROOT/annotations/instances_val2017.json     ROOT/val2017/*.png

so ``CocoDetection(root=ROOT)`` (and detectron2's ``register_coco_instances``) read it like COCO:

    python -m collab_distill.tasks.detection.shapes data/shapes --train 400 --val 100
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 3, "name": "ellipse"}, {"id": 7, "name": "triangle"}]


def _draw_image(rng: random.Random, size: int):
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(0, 90) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    noise = Image.effect_noise((size, size), 24).convert("RGB")
    image = Image.blend(image, noise, 0.25)
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(rng.randint(1, 4)):
        w, h = rng.randint(size // 8, size // 2), rng.randint(size // 8, size // 2)
        x0, y0 = rng.randint(0, size - w - 1), rng.randint(0, size - h - 1)
        category = rng.choice(CATEGORIES)["id"]
        colour = tuple(rng.randint(120, 255) for _ in range(3))
        if category == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif category == 3:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.polygon([(x0, y0 + h), (x0 + w, y0 + h), (x0 + w // 2, y0)], fill=colour)
        boxes.append((category, [float(x0), float(y0), float(w + 1), float(h + 1)]))
    return image, boxes


def write_shapes_coco(root: str | Path, train: int = 400, val: int = 100, size: int = 128, seed: int = 0) -> Path:
    """Write the data set under ``root`` (see the module docstring); returns ``root``."""
    root = Path(root)
    rng = random.Random(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    annotation_id = 1
    for split, count in (("train2017", train), ("val2017", val)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, boxes = _draw_image(rng, size)
            name = f"{i:06d}.png"
            image.save(folder / name)
            image_id = i + 1
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
            for category, (x, y, w, h) in boxes:
                annotations.append({"id": annotation_id, "image_id": image_id, "category_id": category,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
                annotation_id += 1
        document = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="output folder")
    parser.add_argument("--train", type=int, default=400, help="training images")
    parser.add_argument("--val", type=int, default=100, help="val2017 images (the test split)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_shapes_coco(args.root, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} + {args.val} images to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
