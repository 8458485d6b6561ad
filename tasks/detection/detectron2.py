"""Detection through detectron2 (an optional dependency): detectron2's own models, dataset
catalog, mapper and COCO evaluator, giving the engine the same knowledge record as the
torchvision adapter.

* Models are ``GeneralizedRCNN`` detectors built by :func:`detectron2.modeling.build_model`
  from a detectron2 config: a built-in Faster R-CNN + FPN of ResNet depth 18/34/50/101
  (``Base-RCNN-FPN``'s settings), or any config file, plus ``options`` overriding single keys.
* Data is registered with ``register_coco_instances`` and read by detectron2's
  ``load_coco_json``; samples go through its ``DatasetMapper`` (resize, flip, ``Instances``).
  The split into train/meta/val is the one of :class:`CocoDetection`, so both adapters train
  and select on the same images.
* Evaluation is detectron2's ``COCOEvaluator`` (pycocotools) on the split's images.

What the YAML passes to detectron2: the model config (``config_file``, ``depth`` and any key
in ``options``; ``MODEL.ROI_HEADS.NUM_CLASSES`` always follows the data and
``MODEL.DEVICE`` is Fabric's). The ``INPUT.*`` keys and ``SOLVER``, ``DATALOADER``, ``TEST``
are *not* used: image sizes come from :class:`Detectron2Detection`, the optimiser, schedule and
loop from collab-distill's own config, and samplers from the engine (seeded, resumable,
sharded by rank; detectron2's ``TrainingSampler`` is infinite and has no epochs).

The model wrapper is in :mod:`~collab_distill.tasks.detection.detectron2_model`, the built-in
config and the weight loading in :mod:`~collab_distill.tasks.detection.detectron2_config`, one
split's data set in :mod:`~collab_distill.tasks.detection.detectron2_data`; their public names
stay importable from here.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from collab_distill.records import Knowledge
from collab_distill.task import ConfigError, Evaluator, ModelFactory, Task, TaskInfo
from collab_distill.tasks.detection.data import CocoDetection
from collab_distill.tasks.detection.detectron2_config import (
    default_config,
    load_detectron2_weights,
    recording_checkpointer,
)
from collab_distill.tasks.detection.detectron2_data import Detectron2Split, unregister_dataset, with_boxes
from collab_distill.tasks.detection.detectron2_model import Detectron2Detector, DistillingRCNN, ground_truth_boxes
from collab_distill.tasks.detection.roi_align import twice_differentiable_pooling
from collab_distill.tasks.detection.task import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoEvaluator,
    DetectionContext,
    PerImageEvaluator,
    RoIAlignChoice,
    batch_seed,
    observed,
    region_context,
    region_knowledge,
)

__all__ = ["Detectron2RCNN", "Detectron2Detector", "Detectron2Coco", "Detectron2Detection", "Detectron2CocoEvaluator",
           "DistillingRCNN", "detectron2_available", "load_detectron2_weights"]

_recording_checkpointer = recording_checkpointer  # its name before it moved (tests/test_detectron2.py reads it here)

INSTALL_HINT = ("install it from source: pip install --no-build-isolation "
                "'git+https://github.com/facebookresearch/detectron2.git' (see the README, 'Detection with detectron2')")


def detectron2_available() -> bool:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


def _require_detectron2(who: str) -> None:
    if not detectron2_available():
        raise ConfigError(f"{who} needs detectron2, which is not installed; {INSTALL_HINT}")


class Detectron2RCNN(ModelFactory):
    """A detectron2 R-CNN detector for the task's classes.

    Args:
        depth: ResNet depth of the built-in Faster R-CNN FPN config (18, 34, 50, 101); ignored
            when ``config_file`` is given.
        config_file: a detectron2 YAML config (``_BASE_`` references resolve relative to it),
            e.g. ``configs/COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml`` of a detectron2 checkout.
        options: detectron2 config keys to override, ``{"MODEL.RPN.POST_NMS_TOPK_TRAIN": 300}``.
            Unknown keys are an error.
        weights: a detectron2 checkpoint (``.pkl`` from its model zoo, ``.pth`` of a detectron2
            run) or a converted ImageNet backbone, loaded with ``DetectionCheckpointer``.
        weights_partial: allow ``weights`` to cover only part of the model (a backbone file).
            Otherwise a key missing from the file or of the wrong shape is an error, so a teacher
            never silently keeps a random head.
    """

    def __init__(self, depth: int = 50, config_file: Optional[str] = None, options: Optional[dict[str, Any]] = None,
                 weights: Optional[str] = None, weights_partial: bool = False) -> None:
        _require_detectron2("Detectron2RCNN")
        if config_file is None and depth not in (18, 34, 50, 101, 152):
            raise ConfigError(f"Detectron2RCNN.depth={depth}: detectron2's ResNets have depth 18, 34, 50, 101 or 152")
        if config_file is not None and not Path(config_file).is_file():
            raise ConfigError(f"Detectron2RCNN.config_file: {config_file!r} does not exist")
        if weights is not None and not Path(weights).is_file():
            raise ConfigError(f"Detectron2RCNN.weights: {weights!r} does not exist")
        self.depth, self.config_file, self.options = depth, config_file, dict(options or {})
        self.weights, self.weights_partial = weights, weights_partial
        self.cfg = self._config()  # validates every key now, before any data is read

    def _config(self) -> Any:
        cfg = default_config(self.depth)
        if self.config_file is not None:
            try:
                cfg.merge_from_file(self.config_file)
            except Exception as err:  # yacs raises KeyError / AssertionError / yaml errors
                raise ConfigError(f"Detectron2RCNN.config_file: detectron2 cannot read {self.config_file!r}: {err}") from err
        for key, value in self.options.items():
            try:
                cfg.merge_from_list([key, value])
            except (KeyError, ValueError, AssertionError) as err:
                raise ConfigError(f"Detectron2RCNN.options[{key!r}]: {err}") from err
        return cfg

    @property
    def provides_trained_weights(self) -> bool:
        return self.weights is not None and not self.weights_partial

    def build(self, info: TaskInfo) -> Detectron2Detector:
        from detectron2.modeling import build_model

        cfg = self.cfg.clone()
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = info.num_classes
        cfg.MODEL.DEVICE = "cpu"  # Fabric moves the model
        cfg.MODEL.WEIGHTS = ""
        cfg.freeze()
        try:
            model = build_model(cfg)
        except AssertionError as err:
            raise ConfigError(f"{self.describe()}: detectron2 rejects the config: {err}") from err
        if self.weights is not None:
            self._load_weights(model)
        return Detectron2Detector(model, cfg)

    def _load_weights(self, model: nn.Module) -> None:
        assert self.weights is not None
        load_detectron2_weights(model, self.weights, strict=not self.weights_partial, field="Detectron2RCNN.weights",
                                fix="Set weights_partial: true to load a backbone-only file on purpose.")

    def describe(self) -> str:
        return f"Detectron2RCNN({self.config_file or f'R{self.depth}-FPN'})"


class Detectron2Coco(CocoDetection):
    """COCO-format data read through detectron2's dataset catalog.

    Takes the arguments of :class:`CocoDetection` (same files, same checks with clear errors,
    same seeded train/meta/val split) plus ``dataset_name``: the prefix under which the two
    annotation files are registered with ``register_coco_instances`` (``<name>_train``,
    ``<name>_test``) and the splits for evaluation (``<name>_val``, ...).
    """

    def __init__(self, dataset_name: str = "collab_distill_coco", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset_name = dataset_name
        self.records: dict[str, list[dict[str, Any]]] = {}
        self._ground_truth_dir: Optional[tempfile.TemporaryDirectory] = None
        self._metadata: dict[str, Any] = {}

    def setup(self, seed: int) -> None:
        _require_detectron2("Detectron2Coco")
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from detectron2.data.datasets import register_coco_instances

        super().setup(seed)  # validates the files and chooses the splits
        loaded = {}
        for part, annotation_file, images in (("train", self.train_annotations, self.train_images),
                                              ("test", self.test_annotations, self.test_images)):
            name = f"{self.dataset_name}_{part}"
            unregister_dataset(name)
            register_coco_instances(name, {}, str(annotation_file), str(images))
            with contextlib.redirect_stdout(io.StringIO()):
                loaded[part] = {r["image_id"]: r for r in DatasetCatalog.get(name)}
            if part == "train":
                meta = MetadataCatalog.get(name)
                self._metadata = {"thing_classes": list(meta.thing_classes),
                                  "thing_dataset_id_to_contiguous_id": dict(meta.thing_dataset_id_to_contiguous_id)}
        for split, part in self.splits.items():
            source = loaded["test" if split == "test" else "train"]
            self.records[split] = [source[i] for i in part.image_ids]
        train = self.splits["train"]
        if train.corruption is not None:
            contiguous = self._metadata["thing_dataset_id_to_contiguous_id"]
            self.records["train"] = [with_boxes(record, train, contiguous) for record in self.records["train"]]

    def evaluation_dataset(self, split: str) -> str:
        """The catalog name of a split for ``COCOEvaluator``: the test file itself, or (for
        splits cut from the training file) a registered subset whose ground truth JSON holds
        exactly the split's images."""
        from detectron2.data import DatasetCatalog, MetadataCatalog

        if split == "test":
            return f"{self.dataset_name}_test"
        name = f"{self.dataset_name}_{split}"
        if name not in DatasetCatalog.list():
            if self._ground_truth_dir is None:
                self._ground_truth_dir = tempfile.TemporaryDirectory(prefix="collab_distill_gt_")
            path = Path(self._ground_truth_dir.name) / f"{name}.json"
            path.write_text(json.dumps(self.ground_truth(split)))
            records = self.records[split]
            DatasetCatalog.register(name, lambda: records)
            MetadataCatalog.get(name).set(json_file=str(path), evaluator_type="coco", **self._metadata)
        return name


class Detectron2Detection(Task):
    """Detection with detectron2 models and data; a distillation unit is a shared region
    (the region source's best proposals plus the ground-truth boxes, as in
    :class:`~collab_distill.tasks.detection.ObjectDetection`).

    Args:
        data: :class:`Detectron2Coco`.
        min_size: shorter side for training; a list gives detectron2's multi-scale choice.
        max_size: cap of the longer side.
        min_size_test: shorter side for evaluation (default: the largest ``min_size``).
        image_format: channel order the mapper reads images in; a model whose ``INPUT.FORMAT``
            differs gets its channels reordered.
        regions_per_image, regions_include_gt, region_iou, cnet_image_size, roi_align: as for
            :class:`~collab_distill.tasks.detection.ObjectDetection`.
    """

    selection_metric = "AP"

    def twice_differentiable(self) -> Any:
        """detectron2's RoIAlign has no double backward: pool with an exact one meanwhile."""
        return twice_differentiable_pooling()

    def __init__(self, data: Detectron2Coco, min_size: Union[int, list[int]] = 800, max_size: int = 1333,
                 min_size_test: Optional[int] = None, image_format: str = "BGR", regions_per_image: int = 64,
                 regions_include_gt: bool = True, region_iou: float = 0.5, cnet_image_size: int = 64,
                 roi_align: RoIAlignChoice = "auto") -> None:
        if roi_align not in ("auto", "kernel", "matmul"):
            raise ConfigError(f"Detectron2Detection.roi_align={roi_align!r}: choose auto, kernel or matmul")
        sizes = [min_size] if isinstance(min_size, int) else list(min_size)
        if not sizes or min(sizes) < 16 or max_size < max(sizes):
            raise ConfigError(f"Detectron2Detection: need 16 <= min_size <= max_size, got {min_size} and {max_size}")
        if image_format not in ("BGR", "RGB"):
            raise ConfigError(f"Detectron2Detection.image_format={image_format!r}: use 'BGR' or 'RGB'")
        if regions_per_image < 1 or not 0 < region_iou <= 1 or cnet_image_size < 8:
            raise ConfigError("Detectron2Detection: regions_per_image >= 1, 0 < region_iou <= 1 and cnet_image_size >= 8 "
                              "are required")
        self.data = data
        self.min_sizes, self.max_size = sizes, max_size
        self.min_size_test = min_size_test or max(sizes)
        self.image_format = image_format
        self.regions_per_image, self.regions_include_gt = regions_per_image, regions_include_gt
        self.region_iou, self.cnet_image_size = region_iou, cnet_image_size
        self.roi_align = roi_align
        self.info: Optional[TaskInfo] = None
        self._datasets: dict[str, Detectron2Split] = {}

    def setup(self, seed: int) -> TaskInfo:
        self.data.setup(seed)
        from detectron2.data import DatasetMapper
        from detectron2.data import transforms as T

        flip = [T.RandomFlip(prob=self.data.flip)] if self.data.flip > 0 else []
        train_mapper = DatasetMapper(is_train=True, image_format=self.image_format, augmentations=[
            T.ResizeShortestEdge(self.min_sizes, self.max_size, "choice"), *flip])
        eval_mapper = DatasetMapper(is_train=False, image_format=self.image_format,
                                    augmentations=[T.ResizeShortestEdge(self.min_size_test, self.max_size, "choice")])
        self._datasets = {split: Detectron2Split(self.data.records[split],
                                                 train_mapper if split in ("train", "meta") else eval_mapper, split,
                                                 self.data.splits[split].corrupted)
                          for split in self.data.splits}
        self.info = TaskInfo(
            num_classes=self.data.num_classes, in_channels=3, image_size=(self.min_size_test, self.min_size_test),
            extra={"min_size": self.min_sizes, "max_size": self.max_size, "min_size_test": self.min_size_test,
                   "categories": [c["name"] for c in self.data.categories],
                   "split_sizes": {k: len(v) for k, v in self.data.splits.items()}},
        )
        return self.info

    def dataset(self, split: str) -> Dataset:
        return self._datasets[split]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"inputs": samples, "index": torch.tensor([s["index"] for s in samples]),
                "seed": batch_seed(samples), "split": samples[0]["split"]}

    def loader_options(self, split: str) -> dict[str, Any]:
        return self.data.loader_options(split)

    def move_batch(self, batch: dict[str, Any], fabric: Any) -> dict[str, Any]:
        # detectron2 models move their own inputs (GeneralizedRCNN.preprocess_image)
        return {**batch, "index": fabric.to_device(batch["index"])}

    def build_model(self, factory: ModelFactory, info: TaskInfo) -> nn.Module:
        model = factory.build(info)
        if not isinstance(model, Detectron2Detector):
            raise ConfigError(f"{factory.describe()} does not build a detectron2 detector; use "
                              "collab_distill.tasks.detection.detectron2.Detectron2RCNN with Detectron2Detection")
        if model.num_classes != info.num_classes:
            raise ConfigError(f"{factory.describe()} has {model.num_classes} classes but the data has {info.num_classes}")
        if model.input_format not in ("BGR", "RGB"):
            raise ConfigError(f"{factory.describe()}: INPUT.FORMAT={model.input_format!r} is not supported; use BGR or RGB")
        model.flip_channels = model.input_format != self.image_format
        return model

    def example_input(self, info: TaskInfo) -> Any:
        """One ``min_size_test`` square image (uint8, as the mapper gives) through the detector's
        inference pass, the cost it is deployed with; the box head's share grows with the
        proposals kept (``MODEL.RPN.POST_NMS_TOPK_TEST``)."""
        from collab_distill.profiling import ForwardCall
        from collab_distill.tasks.detection.task import example_image

        height, width = info.image_size
        image = example_image((height, width)).mul(255).to(torch.uint8)
        return ForwardCall(([{"image": image, "height": height, "width": width}],), {"mode": "predict"})

    def shared_context(self, batch: Any, teachers: Mapping[str, nn.Module],
                       students: Mapping[str, nn.Module]) -> DetectionContext:
        inputs = batch["inputs"]
        source = next(iter(teachers.values()), None) or next(iter(students.values()))
        with torch.no_grad():
            proposals, image_sizes, features = source(inputs, mode="regions")
        gt = ground_truth_boxes(inputs, proposals[0].device)
        return region_context(proposals, features, gt, image_sizes, source, int(batch.get("seed", 0)),
                              regions_per_image=self.regions_per_image, include_gt=self.regions_include_gt,
                              num_classes=self.info.num_classes if self.info else 0, iou=self.region_iou,
                              frozen=teachers)

    def knowledge(self, model: nn.Module, batch: Any, *, view: int = 0, context: Any = None) -> Knowledge:
        if context is None:
            context = self.shared_context(batch, {}, {"model": model})
        reuse = model is context.source and not observed(model.model.backbone)
        features = context.source_features if reuse else None
        return region_knowledge(context, lambda: model(batch["inputs"], regions=context.regions, features=features,
                                                       mode="train", losses=context.losses_of(model),
                                                       samples=context.samples), self.roi_align)

    def images(self, batch: Any) -> Tensor:
        size = (self.cnet_image_size, self.cnet_image_size)
        out = []
        for x in batch["inputs"]:
            image = x["image"].float().div(255)
            if self.image_format == "BGR":
                image = image.flip(0)
            out.append(torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0])
        images = torch.stack(out)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((images - mean) / std).to(batch["index"].device)

    def predict(self, model: nn.Module, batch: Any) -> Any:
        return model(batch["inputs"], mode="predict")

    def evaluator(self, fabric: Any) -> Evaluator:
        return Detectron2CocoEvaluator(fabric, self.data)

    def describe(self) -> str:
        return f"Detectron2Detection({type(self.data).__name__}, {self.min_sizes}-{self.max_size}px)"


class Detectron2CocoEvaluator(PerImageEvaluator):
    """detectron2's ``COCOEvaluator`` on one split (predictions gathered and deduplicated
    across ranks by :class:`PerImageEvaluator`, not by detectron2's own gather)."""

    def __init__(self, fabric: Any, data: Detectron2Coco) -> None:
        super().__init__(fabric)
        self.data = data

    def update(self, outputs: Any, batch: Any) -> None:
        self.split = batch["split"]
        for x, out in zip(batch["inputs"], outputs):
            self.per_image[int(x["image_id"])] = ({"image_id": x["image_id"]}, {"instances": _detached(out["instances"])})

    def score(self, split: str, per_image: dict[int, Any]) -> dict[str, float]:
        from detectron2.evaluation import COCOEvaluator as D2COCOEvaluator

        name = self.data.evaluation_dataset(split)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = D2COCOEvaluator(name, tasks=("bbox",), distributed=False, output_dir=None, use_fast_impl=False)
            evaluator.reset()
            for image_id in sorted(per_image):
                x, out = per_image[image_id]
                evaluator.process([x], [out])
            if not any(len(out["instances"]) for _, out in per_image.values()):
                return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
            results = evaluator.evaluate().get("bbox", {})
        return {k: float(results[k]) for k in CocoEvaluator.NAMES if k in results and math.isfinite(results[k])}


def _detached(instances: Any) -> Any:
    """A CPU copy of predicted ``Instances`` without autograd history (they travel between
    processes and become numpy arrays in the evaluator)."""
    from detectron2.structures import Instances

    out = Instances(instances.image_size)
    for key, value in instances.get_fields().items():
        if isinstance(value, Tensor):
            value = value.detach().cpu()
        elif hasattr(value, "tensor"):
            value = type(value)(value.tensor.detach().cpu())
        out.set(key, value)
    return out
