"""torchvision Faster R-CNN detectors of several sizes, wrapped so that distillation can ask
them for per-image losses and for class logits over regions shared by the whole cohort.

Backbones: torchvision's ``resnet18``/``resnet34``/``resnet50`` with an FPN (as the MC-Distil
authors used), or a member of the ResNet10 family (``xxs`` ... ``l``, ``resnet10``) with an
ImageNet-style stride-4 stem, for detectors small enough to train on a CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import misc as misc_ops

from collab_distill.task import ConfigError, ModelFactory, TaskInfo
from collab_distill.tasks.classification.models import RESNET_FAMILY, ResNetCifar
from collab_distill.tasks.detection.roi_align import exact_pooling_enabled, multiscale_roi_align

__all__ = ["FasterRCNN", "RegionDetector", "TORCHVISION_BACKBONES"]

TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


def _small_resnet_fpn(size: str, fpn_channels: int) -> BackboneWithFPN:
    """The stages of a ResNet10-family classifier behind a 7x7/2 stem and a max-pool (stride 4
    like torchvision's ResNets, so full-size images stay affordable), with an FPN."""
    widths, blocks = RESNET_FAMILY[size]
    classifier = ResNetCifar(widths, blocks, num_classes=1)
    trunk: OrderedDict[str, nn.Module] = OrderedDict()
    trunk["stem"] = nn.Sequential(
        nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    for k in range(1, 5):
        trunk[f"layer{k}"] = getattr(classifier, f"layer{k}")
    return BackboneWithFPN(nn.Sequential(trunk), {f"layer{k}": str(k - 1) for k in range(1, 5)}, list(widths), fpn_channels)


def _load_trunk(body: nn.Module, path: str) -> None:
    """ImageNet weights of a torchvision ResNet (its ``fc`` is ignored) into the FPN's trunk."""
    from pathlib import Path

    if not Path(path).is_file():
        raise ConfigError(f"FasterRCNN.backbone_weights: file {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = body.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if len(usable) < len([k for k in own if not k.endswith("num_batches_tracked")]) // 2:
        raise ConfigError(f"FasterRCNN.backbone_weights: {path!r} matches only {len(usable)} of the trunk's {len(own)} "
                          "tensors; give the state dict of the same torchvision ResNet")
    body.load_state_dict(usable, strict=False)


class FasterRCNN(ModelFactory):
    """A torchvision Faster R-CNN with an FPN, built for the task's classes.

    Args:
        backbone: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` (torchvision) or a
            ResNet10-family size (``xxs``, ``xs``, ``s``, ``m``, ``l``, ``resnet10``).
        fpn_channels: FPN width (torchvision: 256; small students: 64).
        backbone_weights: optional local file with a state dict for the torchvision trunk
            (ImageNet weights; nothing is downloaded).
        frozen_bn: freeze BatchNorm statistics (right for pretrained trunks; training from
            scratch needs ``false``).
        trainable_layers: trunk stages that train (torchvision backbones; 5 = all).
        rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test, rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test, box_batch_size_per_image: torchvision's Faster R-CNN settings of
            the same names (on a CPU the RPN's non-maximum suppression over the pre-NMS proposals
            can be a quarter of a small detector's step: fewer pre-NMS proposals make it cheaper).
        representation_size: width of the two-layer box head (torchvision: 1024); most of a
            small detector's parameters are here.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        fpn_channels: int = 256,
        backbone_weights: Optional[str] = None,
        frozen_bn: bool = False,
        trainable_layers: int = 5,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        box_batch_size_per_image: int = 512,
        representation_size: int = 1024,
    ) -> None:
        if backbone not in TORCHVISION_BACKBONES and backbone not in RESNET_FAMILY:
            raise ConfigError(f"FasterRCNN.backbone={backbone!r}: use one of {list(TORCHVISION_BACKBONES) + list(RESNET_FAMILY)}")
        if backbone_weights is not None and backbone not in TORCHVISION_BACKBONES:
            raise ConfigError("FasterRCNN.backbone_weights is only for the torchvision backbones")
        if fpn_channels < 1 or representation_size < 1 or not 0 <= trainable_layers <= 5:
            raise ConfigError("FasterRCNN: fpn_channels >= 1 and 0 <= trainable_layers <= 5 are required")
        self.backbone = backbone
        self.fpn_channels = fpn_channels
        self.backbone_weights = backbone_weights
        self.frozen_bn = frozen_bn
        self.trainable_layers = trainable_layers
        self.representation_size = representation_size
        self.settings = {"rpn_pre_nms_top_n_train": rpn_pre_nms_top_n_train,
                         "rpn_pre_nms_top_n_test": rpn_pre_nms_top_n_test,
                         "rpn_post_nms_top_n_train": rpn_post_nms_top_n_train,
                         "rpn_post_nms_top_n_test": rpn_post_nms_top_n_test,
                         "box_batch_size_per_image": box_batch_size_per_image}

    def build(self, info: TaskInfo) -> RegionDetector:
        if self.backbone in TORCHVISION_BACKBONES:
            norm = misc_ops.FrozenBatchNorm2d if self.frozen_bn else nn.BatchNorm2d
            trunk = resnet_fpn_backbone(backbone_name=self.backbone, weights=None, norm_layer=norm,
                                        trainable_layers=self.trainable_layers)
            if self.fpn_channels != 256:
                raise ConfigError("FasterRCNN.fpn_channels: torchvision backbones come with a 256-channel FPN")
            if self.backbone_weights is not None:
                _load_trunk(trunk.body, self.backbone_weights)
        else:
            trunk = _small_resnet_fpn(self.backbone, self.fpn_channels)
        extra = dict(info.extra)
        pool = 7  # torchvision's MultiScaleRoIAlign output size
        detector = TorchvisionFasterRCNN(
            trunk, num_classes=None,
            min_size=extra.get("min_size", 800), max_size=extra.get("max_size", 1333),
            box_head=TwoMLPHead(trunk.out_channels * pool * pool, self.representation_size),
            box_predictor=FastRCNNPredictor(self.representation_size, info.num_classes + 1),  # + background (index 0)
            **self.settings,
        )
        return RegionDetector(detector)

    def describe(self) -> str:
        return f"FasterRCNN({self.backbone}-FPN{self.fpn_channels})"


class RegionDetector(nn.Module):
    """A torchvision Faster R-CNN whose ``forward`` also serves distillation.

    Everything goes through ``forward`` (so DDP sees it) with a ``mode``:

    * ``"predict"``: ``images`` is a list of ``[3, H, W]`` tensors in [0, 1]; returns torchvision's
      post-processed detections in input coordinates.
    * ``"regions"``: RPN proposals (eval-mode settings, best first) for already transformed
      images, plus the feature maps so the caller can reuse them.
    * ``"train"``: for transformed images, targets and shared regions: the detector's own
      supervised loss **per image** (RPN and box-head losses, each normalised per image as
      torchvision normalises per batch), and class logits over the shared regions with
      background moved to the last column.
    """

    #: ``collab-distill export`` writes no TorchScript / torch.export program for it (see ``export_note``)
    export_formats: tuple[str, ...] = ()
    export_note = ("a torchvision detector takes a list of images and returns a list of dicts, which tracing a tensor "
                   "example cannot capture; torch.jit.script scripts torchvision's FasterRCNN once it has loaded the .pt")

    def __init__(self, detector: TorchvisionFasterRCNN) -> None:
        super().__init__()
        self.detector = detector

    @property
    def num_classes(self) -> int:
        """Foreground classes."""
        return self.detector.roi_heads.box_predictor.cls_score.out_features - 1

    def export_state_dict(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
        """``state`` (this wrapper's state dict) as the torchvision ``FasterRCNN``'s own state dict,
        which that detector (as :meth:`FasterRCNN.build` makes it) loads without this wrapper."""
        return {key.removeprefix("detector."): value for key, value in state.items()}, ".pt"

    def forward(self, images: Any, image_sizes: Optional[list[tuple[int, int]]] = None,
                targets: Optional[list[dict[str, Tensor]]] = None, regions: Optional[list[Tensor]] = None,
                features: Optional[dict[str, Tensor]] = None, mode: str = "train",
                samples: Optional[dict[int, Any]] = None) -> Any:
        """``samples``: a dict shared by the calls on one batch in which the regions the box head
        samples for its own loss are kept (under this model's ``id``) the first time and reused
        after, so that evaluating one batch at nearby parameters (the finite-difference meta step)
        changes the losses only through the parameters, as the exact hypergradient sees them."""
        if mode == "predict":
            return self.detector(images)
        assert image_sizes is not None
        image_list = ImageList(images, image_sizes)
        if features is None:
            features = self.detector.backbone(images)
        if mode == "regions":
            proposals, _ = self._rpn_per_image(image_list, features, None)
            return proposals, features
        return self._train_outputs(image_list, features, targets, regions, samples)

    def _rpn_per_image(self, image_list: ImageList, features: dict[str, Tensor],
                       targets: Optional[list[dict[str, Tensor]]]) -> tuple[list[Tensor], Optional[Tensor]]:
        """torchvision's RPN forward, with its two losses computed image by image (none
        without targets). Proposals follow the RPN's train/eval settings."""
        rpn = self.detector.rpn
        maps = list(features.values())
        objectness, deltas = rpn.head(maps)
        anchors = rpn.anchor_generator(image_list, maps)
        num_images = len(anchors)
        per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, per_level)
        if targets is None:
            return boxes, None
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
        regression = rpn.box_coder.encode(matched, anchors)
        per_anchor = objectness.shape[0] // num_images
        losses = []
        for i in range(num_images):
            part = slice(i * per_anchor, (i + 1) * per_anchor)
            obj, box = rpn.compute_loss(objectness[part], deltas[part], [labels[i]], [regression[i]])
            losses.append(obj + box)
        return boxes, torch.stack(losses)

    def _train_outputs(self, image_list: ImageList, features: dict[str, Tensor], targets: Optional[list[dict[str, Tensor]]],
                       regions: Optional[list[Tensor]], samples: Optional[dict[int, Any]] = None) -> dict[str, Any]:
        heads = self.detector.roi_heads
        sizes = image_list.image_sizes
        num_images = len(sizes)
        shared = list(regions) if regions is not None else [features["0"].new_zeros((0, 4)) for _ in range(num_images)]
        if targets is not None:
            proposals, rpn_loss = self._rpn_per_image(image_list, features, targets)
            drawn = samples.get(id(self)) if samples is not None else None
            if drawn is None:
                drawn = heads.select_training_samples(proposals, targets)
                if samples is not None:
                    samples[id(self)] = drawn
            sampled, _, labels, regression_targets = drawn
        else:
            sampled, labels, regression_targets, rpn_loss = [], [], [], None
        # one RoI pass over [own sampled regions, shared regions] per image
        boxes = [torch.cat([sampled[i], shared[i]]) if sampled else shared[i] for i in range(num_images)]
        if exact_pooling_enabled():  # the lookahead of an exact meta step: a RoIAlign with a double backward
            pooled = heads.box_head(multiscale_roi_align(heads.box_roi_pool, features, boxes, sizes))
        else:
            pooled = heads.box_head(heads.box_roi_pool(features, boxes, sizes))
        class_logits, box_deltas = heads.box_predictor(pooled)
        counts = [len(b) for b in boxes]
        own_counts = [len(s) for s in sampled] if sampled else [0] * num_images
        pieces_logits = class_logits.split(counts)
        pieces_deltas = box_deltas.split(counts)
        shared_logits = torch.cat([p[n:] for p, n in zip(pieces_logits, own_counts)])
        out: dict[str, Any] = {"region_logits": torch.cat([shared_logits[:, 1:], shared_logits[:, :1]], dim=1)}
        if targets is not None:
            assert rpn_loss is not None  # the RPN's losses come with targets
            per_image = []
            for i in range(num_images):
                n = own_counts[i]
                cls, box = fastrcnn_loss(pieces_logits[i][:n], pieces_deltas[i][:n], [labels[i]], [regression_targets[i]])
                per_image.append(cls + box)
            out["supervised_loss"] = rpn_loss + torch.stack(per_image)
        return out


def region_labels(regions: list[Tensor], targets: list[dict[str, Tensor]], num_classes: int, iou: float = 0.5) -> Tensor:
    """Ground-truth class of every shared region in the task's convention (``0..K-1``, and
    ``K`` for background): the label of the box it overlaps most if IoU >= ``iou``."""
    from torchvision.ops import box_iou

    out = []
    for boxes, target in zip(regions, targets):
        labels = torch.full((len(boxes),), num_classes, dtype=torch.int64, device=boxes.device)
        if len(boxes) and len(target["boxes"]):
            overlap, which = box_iou(boxes, target["boxes"]).max(dim=1)
            hit = overlap >= iou
            labels[hit] = target["labels"][which[hit]] - 1
        out.append(labels)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


