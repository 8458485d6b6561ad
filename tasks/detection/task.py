"""Object detection as a task adapter (torchvision Faster R-CNN): per-image losses and class
logits over regions that every cohort member pools through its own box head.

The shared regions of a batch are the region source's RPN proposals (the first teacher, or the
first student when there is no teacher; best ``regions_per_image`` per image, no gradient) plus
the ground-truth boxes. Each member's record then holds, for those same regions in the same
order, class logits with background in the last column, and ``unit_labels`` (the class of the
ground-truth box a region overlaps with IoU >= ``region_iou``, else background). KD, consensus
targets and the C-Net therefore compare like with like, and a C-Net weight for an image weighs
all of that image's regions.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from collab_distill.profiling import ForwardCall
from collab_distill.records import Knowledge
from collab_distill.task import ConfigError, Evaluator, ModelFactory, Task, TaskInfo
from collab_distill.tasks.detection.data import CocoDetection
from collab_distill.tasks.detection.models import RegionDetector, region_labels
from collab_distill.tasks.detection.roi_align import twice_differentiable_pooling

__all__ = ["ObjectDetection", "CocoEvaluator", "PerImageEvaluator", "DetectionContext", "observed", "example_image"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class DetectionContext:
    """What every member of the cohort shares for one batch."""

    images: Tensor  # [B, 3, H, W], resized, normalised and padded once
    image_sizes: list[tuple[int, int]]
    targets: list[dict[str, Tensor]]  # boxes in the resized frame
    regions: list[Tensor]
    unit_image: Tensor
    unit_labels: Tensor
    source: Optional[nn.Module]
    source_features: Optional[dict[str, Tensor]]
    seed: int
    #: ``id`` of the frozen members (teachers): their own detection losses are never computed
    frozen: frozenset[int] = frozenset()
    #: each member's regions sampled for its own box loss, kept for every later call on this batch
    samples: dict[int, Any] = field(default_factory=dict)

    def losses_of(self, model: nn.Module) -> bool:
        """Whether ``model``'s own detection losses are computed on this batch: for every member
        but the frozen teachers (a student in eval mode too, e.g. when a C-Net that reads them is
        applied to a split), whatever its parameters are (functional ones in the meta step)."""
        return id(model) not in self.frozen


def batch_seed(samples: list[dict[str, Any]]) -> int:
    """One seed per batch from its samples' seeds (their indices for evaluation samples)."""
    return sum(int(s["seed"]) if s["seed"] >= 0 else int(s["index"]) for s in samples) % (2**62)


def region_context(proposals: list[Tensor], features: dict[str, Tensor], targets: list[dict[str, Tensor]],
                   image_sizes: list[tuple[int, int]], source: nn.Module, seed: int, *, regions_per_image: int,
                   include_gt: bool, num_classes: int, iou: float, images: Optional[Tensor] = None,
                   frozen: Mapping[str, nn.Module] = {}) -> DetectionContext:
    """The shared regions of a batch from the region source's proposals (best first) and the
    ground truth (``targets`` with labels ``1..K``); the source's features are kept for reuse
    only when it is frozen."""
    regions = [p[:regions_per_image].detach() for p in proposals]
    if include_gt:
        regions = [torch.cat([r, t["boxes"].to(r.dtype)]) for r, t in zip(regions, targets)]
    device = regions[0].device
    unit_image = torch.cat([torch.full((len(r),), i, dtype=torch.int64, device=device) for i, r in enumerate(regions)])
    source_frozen = not source.training
    return DetectionContext(
        images=images if images is not None else torch.empty(0), image_sizes=list(image_sizes), targets=targets,
        regions=regions, unit_image=unit_image, unit_labels=region_labels(regions, targets, num_classes, iou),
        source=source if source_frozen else None,
        source_features={k: v.detach() for k, v in features.items()} if source_frozen else None,
        seed=seed, frozen=frozenset(id(m) for m in frozen.values()),
    )


def example_image(size: tuple[int, int]) -> Tensor:
    """A fixed noise image ``[3, H, W]`` in [0, 1] to count a detector's MACs on: noise rather than
    a blank image so the RPN scores vary as on a photo; its own generator leaves torch's RNG alone."""
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(0))


def observed(module: nn.Module) -> bool:
    """Whether a forward hook watches ``module`` or one of its submodules (e.g. a feature the
    engine captures by module path): its forward must then really run in the member's own
    knowledge call, so the region source's cached features are not reused."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


#: how the adapters pool regions in training: ``kernel`` is torchvision's RoIAlign (C++/CUDA),
#: ``matmul`` :func:`~collab_distill.tasks.detection.roi_align.roi_align` (the same numbers as two
#: matrix products; 1.8x faster per CPU training step of ``examples/coco_tiny.yaml``, whose time
#: was 40% RoIAlign's backward), ``auto`` matmul on the CPU and the kernel elsewhere
RoIAlignChoice = Literal["auto", "kernel", "matmul"]


def pooling(choice: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The context a member's training forward runs in for the ``roi_align`` choice."""
    matmul = choice == "matmul" or (choice == "auto" and device.type == "cpu")
    return twice_differentiable_pooling() if matmul else contextlib.nullcontext()


def region_knowledge(context: DetectionContext, run: Callable[[], dict[str, Any]], roi_align: str = "kernel") -> Knowledge:
    """Run one member (``run`` returns its ``region_logits`` and, when training, its
    per-image ``supervised_loss``) with region sampling seeded by the batch, and package it."""
    device = context.unit_image.device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    # the RPN's and box head's region sampling is random: seed it per batch so that every
    # evaluation of one batch (e.g. the finite-difference meta step) samples the same regions
    with torch.random.fork_rng(devices=devices), pooling(roi_align, device):
        torch.manual_seed(context.seed)
        out = run()
    logits = out["region_logits"]
    loss = out.get("supervised_loss")
    if loss is None:
        loss = logits.new_zeros(len(context.image_sizes))
    return Knowledge(supervised_loss=loss, logits=logits, unit_image=context.unit_image,
                     unit_labels=context.unit_labels, num_images=len(context.image_sizes))


class ObjectDetection(Task):
    """Students and teachers are detectors; a distillation unit is a shared region.

    Args:
        data: the COCO-format data (:class:`CocoDetection`).
        min_size, max_size: resize of the shorter / longer image side (torchvision's transform;
            every member uses the same one so regions mean the same pixels).
        regions_per_image: shared proposals per image taken from the region source.
        regions_include_gt: add the ground-truth boxes to the shared regions.
        region_iou: IoU from which a region takes the class of a ground-truth box.
        cnet_image_size: side of the square image that image-conditioned meta modules see.
        roi_align: how training forwards pool regions: ``kernel`` (torchvision's op), ``matmul``
            (the same numbers as matrix products, faster on a CPU) or ``auto`` (matmul on the CPU,
            the kernel on a GPU). The exact meta step always uses matmul in its lookahead.
    """

    selection_metric = "AP"

    def twice_differentiable(self) -> Any:
        """torchvision's RoIAlign has no double backward: pool with an exact one meanwhile."""
        return twice_differentiable_pooling()

    def __init__(
        self,
        data: CocoDetection,
        min_size: int = 800,
        max_size: int = 1333,
        regions_per_image: int = 64,
        regions_include_gt: bool = True,
        region_iou: float = 0.5,
        cnet_image_size: int = 64,
        roi_align: RoIAlignChoice = "auto",
    ) -> None:
        if roi_align not in ("auto", "kernel", "matmul"):
            raise ConfigError(f"ObjectDetection.roi_align={roi_align!r}: choose auto, kernel or matmul")
        if min_size < 16 or max_size < min_size:
            raise ConfigError(f"ObjectDetection: need 16 <= min_size <= max_size, got {min_size} and {max_size}")
        if regions_per_image < 1 or not 0 < region_iou <= 1 or cnet_image_size < 8:
            raise ConfigError("ObjectDetection: regions_per_image >= 1, 0 < region_iou <= 1 and cnet_image_size >= 8 "
                              "are required")
        self.data = data
        self.min_size, self.max_size = min_size, max_size
        self.regions_per_image = regions_per_image
        self.regions_include_gt = regions_include_gt
        self.region_iou = region_iou
        self.cnet_image_size = cnet_image_size
        self.roi_align = roi_align
        self.transform = GeneralizedRCNNTransform(min_size, max_size, IMAGENET_MEAN, IMAGENET_STD)
        self.info: Optional[TaskInfo] = None

    # -- data -----------------------------------------------------------------------------

    def setup(self, seed: int) -> TaskInfo:
        self.data.setup(seed)
        self.info = TaskInfo(
            num_classes=self.data.num_classes, in_channels=3, image_size=(self.min_size, self.min_size),
            extra={"min_size": self.min_size, "max_size": self.max_size,
                   "categories": [c["name"] for c in self.data.categories],
                   "split_sizes": {k: len(v) for k, v in self.data.splits.items()}},
        )
        return self.info

    def dataset(self, split: str) -> Dataset:
        return self.data.splits[split]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "images": [s["image"] for s in samples],
            "targets": [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples],
            "image_id": torch.tensor([s["image_id"] for s in samples]),
            "index": torch.tensor([s["index"] for s in samples]),
            "seed": batch_seed(samples),
            "split": samples[0]["split"],
        }

    def loader_options(self, split: str) -> dict[str, Any]:
        return self.data.loader_options(split)

    def move_batch(self, batch: dict[str, Any], fabric: Any) -> dict[str, Any]:
        return {**batch, "images": [fabric.to_device(x) for x in batch["images"]],
                "targets": [{k: fabric.to_device(v) for k, v in t.items()} for t in batch["targets"]],
                "index": fabric.to_device(batch["index"])}

    # -- models ---------------------------------------------------------------------------

    def build_model(self, factory: ModelFactory, info: TaskInfo) -> nn.Module:
        model = factory.build(info)
        if not isinstance(model, RegionDetector):
            raise ConfigError(f"{factory.describe()} does not build a detector; use collab_distill.tasks.detection.FasterRCNN")
        if model.num_classes != info.num_classes:
            raise ConfigError(f"{factory.describe()} has {model.num_classes} classes but the data has {info.num_classes}")
        return model

    def example_input(self, info: TaskInfo) -> ForwardCall:
        """One ``min_size`` square image through the detector's inference pass (transform, RPN,
        box head, NMS), the cost it is deployed with; the box head's share grows with the
        proposals kept (``rpn_post_nms_top_n_test``)."""
        return ForwardCall(([example_image(info.image_size)],), {"mode": "predict"})

    def shared_context(self, batch: Any, teachers: Mapping[str, nn.Module],
                       students: Mapping[str, nn.Module]) -> DetectionContext:
        targets = [{k: v.clone() for k, v in t.items()} for t in batch["targets"]]
        image_list, targets = self.transform(list(batch["images"]), targets)
        source = next(iter(teachers.values()), None) or next(iter(students.values()))
        with torch.no_grad():
            proposals, features = source(image_list.tensors, image_list.image_sizes, mode="regions")
        return region_context(proposals, features, targets, image_list.image_sizes, source, int(batch.get("seed", 0)),
                              regions_per_image=self.regions_per_image, include_gt=self.regions_include_gt,
                              num_classes=self.info.num_classes if self.info else 0, iou=self.region_iou,
                              images=image_list.tensors, frozen=teachers)

    def knowledge(self, model: nn.Module, batch: Any, *, view: int = 0, context: Any = None) -> Knowledge:
        if context is None:
            context = self.shared_context(batch, {}, {"model": model})
        reuse = model is context.source and not observed(model.detector.backbone)
        features = context.source_features if reuse else None
        targets = context.targets if context.losses_of(model) else None
        return region_knowledge(context, lambda: model(context.images, context.image_sizes, targets, context.regions,
                                                       features, mode="train", samples=context.samples), self.roi_align)

    def images(self, batch: Any) -> Tensor:
        size = (self.cnet_image_size, self.cnet_image_size)
        mean = torch.tensor(IMAGENET_MEAN, device=batch["images"][0].device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=batch["images"][0].device).view(3, 1, 1)
        resized = [torch.nn.functional.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
                   for x in batch["images"]]
        return (torch.stack(resized) - mean) / std

    # -- evaluation -----------------------------------------------------------------------

    def predict(self, model: nn.Module, batch: Any) -> Any:
        return model(list(batch["images"]), mode="predict")

    def evaluator(self, fabric: Any) -> Evaluator:
        return CocoEvaluator(fabric, self.data)

    def describe(self) -> str:
        return f"ObjectDetection({type(self.data).__name__}, {self.min_size}-{self.max_size}px)"


class PerImageEvaluator(Evaluator):
    """Keeps one entry per image id and scores them all on rank 0. Under DDP the entries are
    gathered first and deduplicated by image id (the engine's sampler pads the last batch with
    repeats, which would otherwise count twice); the numbers are broadcast back."""

    def __init__(self, fabric: Any) -> None:
        self.fabric = fabric
        self.per_image: dict[int, Any] = {}
        self.split: Optional[str] = None

    def score(self, split: str, per_image: dict[int, Any]) -> dict[str, float]:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        merged, split = dict(self.per_image), self.split
        if self.fabric.world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.fabric.world_size
            dist.all_gather_object(gathered, (self.split, self.per_image))
            merged = {}
            for part_split, part in gathered:
                split = split or part_split
                for image_id, entry in part.items():
                    merged.setdefault(image_id, entry)
        metrics = self.score(split, merged) if self.fabric.global_rank == 0 and split is not None else {}
        if self.fabric.world_size > 1:
            metrics = self.fabric.broadcast(metrics, src=0)
        return metrics


class CocoEvaluator(PerImageEvaluator):
    """COCO box AP (pycocotools) of one model on one split, exact under DDP."""

    NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

    def __init__(self, fabric: Any, data: CocoDetection) -> None:
        super().__init__(fabric)
        self.data = data

    def update(self, outputs: Any, batch: Any) -> None:
        self.split = batch["split"]
        for det, image_id in zip(outputs, batch["image_id"].tolist()):
            boxes = det["boxes"].detach().float().cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            cats = self.data.category_id(det["labels"].detach().cpu()).tolist() if len(boxes) else []
            self.per_image[int(image_id)] = [
                {"image_id": int(image_id), "category_id": int(c), "bbox": [round(v, 2) for v in b], "score": round(float(s), 4)}
                for b, c, s in zip(xywh, cats, det["scores"].detach().float().cpu().tolist())
            ]

    def score(self, split: str, per_image: dict[int, Any]) -> dict[str, float]:
        return coco_box_ap(self.data.ground_truth(split), [d for dets in per_image.values() for d in dets])


def coco_box_ap(ground_truth: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, float]:
    """pycocotools' box AP (in percent) of ``detections`` on ``ground_truth`` (a COCO document);
    AP for object sizes the split has no ground truth of is left out."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(detections)
        evaluation = COCOeval(gt, dt, "bbox")
        evaluation.params.imgIds = [im["id"] for im in ground_truth["images"]]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(v) * 100 for name, v in zip(CocoEvaluator.NAMES, evaluation.stats[:6]) if v >= 0}
