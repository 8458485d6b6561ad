"""The detectron2 model as the engine sees it: :class:`Detectron2Detector`, a ``GeneralizedRCNN``
that also gives per-image losses and class logits over shared regions (and exports in
detectron2's formats), and :class:`DistillingRCNN`, region distillation inside a user's own
detectron2 training loop.

Apart from :mod:`~collab_distill.tasks.detection.detectron2` (the config-facing factory, data
and task) so that the wrapper's forward passes read on their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from collab_distill.records import SoftTarget, per_image_mean
from collab_distill.task import ConfigError
from collab_distill.tasks.detection.roi_align import TwiceDifferentiableROIAlign, exact_pooling_enabled
from collab_distill.tasks.detection.task import region_context

if TYPE_CHECKING:  # detectron2 ships no type information: these are Any to mypy
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.modeling.poolers import ROIPooler

__all__ = ["Detectron2Detector", "DistillingRCNN", "ground_truth_boxes"]


@contextlib.contextmanager
def _event_storage() -> Any:
    """detectron2's heads log to the current ``EventStorage`` and fail without one: open a
    throwaway one unless a detectron2 trainer already has one open."""
    from detectron2.utils.events import EventStorage, get_event_storage

    try:
        get_event_storage()
    except AssertionError:
        with EventStorage(0):
            yield
        return
    yield


class Detectron2Detector(nn.Module):
    """A detectron2 ``GeneralizedRCNN`` that can also return per-image losses and class logits
    over given regions (the same three modes as the torchvision ``RegionDetector``)."""

    #: ``collab-distill export`` writes no TorchScript / torch.export program for it (see ``export_note``)
    export_formats: tuple[str, ...] = ()
    export_note = ("a detectron2 detector takes a list of image dicts and returns Instances, which tracing a tensor "
                   "example cannot capture; detectron2's own detectron2.export (TracingAdapter) makes graphs from the .pth")

    def __init__(self, model: GeneralizedRCNN, cfg: Any = None, input_format: Optional[str] = None) -> None:
        super().__init__()
        self.model = model
        self.input_format = input_format or (str(cfg.INPUT.FORMAT) if cfg is not None else "BGR")
        self.config_yaml = cfg.dump() if cfg is not None else ""
        #: set by the task when its images come in the other channel order (BGR vs RGB), so a
        #: cohort may mix e.g. a model-zoo teacher (BGR) and torchvision-initialised students (RGB)
        self.flip_channels = False

    @property
    def num_classes(self) -> int:
        return int(self.model.roi_heads.num_classes)

    def export_state_dict(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Any], str]:
        """``state`` (this wrapper's state dict) in detectron2's checkpoint format: the
        ``GeneralizedRCNN``'s own keys under ``"model"``, so ``MODEL.WEIGHTS`` and
        ``DetectionCheckpointer(build_model(cfg)).load`` take the file as it is."""
        return {"model": {key.removeprefix("model."): value for key, value in state.items()}}, ".pth"

    def export_config(self, weights_file: Path) -> Optional[tuple[str, str]]:
        """The detectron2 config this model was built from, as YAML (``get_cfg().merge_from_file``
        then ``build_model`` rebuild it), with ``MODEL.WEIGHTS`` naming the exported ``weights_file``
        so that ``DefaultPredictor(cfg)`` loads the pair too. ``None`` for a model built without one."""
        if not self.config_yaml:
            return None
        from detectron2.config import CfgNode

        cfg = CfgNode.load_cfg(self.config_yaml)
        cfg.MODEL.WEIGHTS = str(Path(weights_file).resolve())
        return cfg.dump(), ".yaml"

    def forward(self, inputs: list[dict[str, Any]], regions: Optional[list[Tensor]] = None,
                features: Optional[dict[str, Tensor]] = None, mode: str = "train", losses: Optional[bool] = None,
                samples: Optional[dict[int, Any]] = None) -> Any:
        """``losses``: in ``train`` mode, whether to compute the model's own losses (per image) when
        the inputs carry annotations; ``None``: in training mode only. ``samples``: as for
        :meth:`~collab_distill.tasks.detection.RegionDetector.forward`."""
        if self.flip_channels:
            inputs = [{**x, "image": x["image"].flip(0)} for x in inputs]
        with _event_storage():
            if mode == "predict":
                return self.model(inputs)
            images = self.model.preprocess_image(inputs)
            if features is None:
                features = self.model.backbone(images.tensor)
            if mode == "regions":
                proposals, _ = self._rpn(images, features, None)
                return [p.proposal_boxes.tensor for p in proposals], list(images.image_sizes), features
            return self._train_outputs(inputs, images, features, regions, losses, samples)

    def _rpn(self, images: Any, features: dict[str, Tensor], gt: Optional[list[Any]]) -> tuple[list[Any], dict[str, Tensor]]:
        """detectron2's RPN forward with its losses computed image by image (none without
        ground truth); proposals follow the RPN's train/eval settings, best first."""
        rpn = self.model.proposal_generator
        maps = [features[f] for f in rpn.in_features]
        anchors = rpn.anchor_generator(maps)
        objectness, deltas = rpn.rpn_head(maps)
        objectness = [o.permute(0, 2, 3, 1).flatten(1) for o in objectness]
        box_dim = rpn.anchor_generator.box_dim
        deltas = [d.view(d.shape[0], -1, box_dim, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2) for d in deltas]
        losses: dict[str, Tensor] = {}
        if gt is not None:
            labels, boxes = rpn.label_and_sample_anchors(anchors, gt)
            per_image = [rpn.losses(anchors, [o[i:i + 1] for o in objectness], labels[i:i + 1],
                                    [d[i:i + 1] for d in deltas], boxes[i:i + 1]) for i in range(len(gt))]
            losses = {key: torch.stack([p[key] for p in per_image]) for key in per_image[0]}
        return rpn.predict_proposals(anchors, objectness, deltas, images.image_sizes), losses

    def _train_outputs(self, inputs: list[dict[str, Any]], images: Any, features: dict[str, Tensor],
                       regions: Optional[list[Tensor]], losses: Optional[bool],
                       samples: Optional[dict[int, Any]] = None) -> dict[str, Any]:
        from detectron2.structures import Boxes

        heads = self.model.roi_heads
        device = images.tensor.device
        num_images = len(images.image_sizes)
        shared = list(regions) if regions is not None else [images.tensor.new_zeros((0, 4)) for _ in range(num_images)]
        supervised = "instances" in inputs[0] and (self.training if losses is None else losses)
        sampled: list[Any] = []
        rpn_loss: dict[str, Tensor] = {}
        if supervised:
            gt = [x["instances"].to(device) for x in inputs]
            proposals, rpn_loss = self._rpn(images, features, gt)
            drawn = samples.get(id(self)) if samples is not None else None
            if drawn is None:
                drawn = heads.label_and_sample_proposals(proposals, gt)
                if samples is not None:
                    samples[id(self)] = drawn
            sampled = drawn
        # one RoI pass over [own sampled regions, shared regions] per image
        boxes = [Boxes(torch.cat([sampled[i].proposal_boxes.tensor, shared[i]]) if sampled else shared[i])
                 for i in range(num_images)]
        with _twice_differentiable(heads.box_pooler) if exact_pooling_enabled() else contextlib.nullcontext():
            pooled = heads.box_head(heads.box_pooler([features[f] for f in heads.box_in_features], boxes))
        scores, deltas = heads.box_predictor(pooled)
        counts = [len(b) for b in boxes]
        own = [len(s) for s in sampled] if sampled else [0] * num_images
        score_parts, delta_parts = scores.split(counts), deltas.split(counts)
        # detectron2 already puts background in the last column, the engine's convention
        out: dict[str, Any] = {"region_logits": torch.cat([p[n:] for p, n in zip(score_parts, own)])}
        if supervised:
            per_image = [heads.box_predictor.losses((score_parts[i][:own[i]], delta_parts[i][:own[i]]), [sampled[i]])
                         for i in range(num_images)]
            parts = {key: torch.stack([p[key] for p in per_image]) for key in per_image[0]}
            parts.update(rpn_loss)
            out["supervised_parts"] = parts  # detectron2's own loss names, one value per image
            out["supervised_loss"] = sum(parts.values())
        return out


@contextlib.contextmanager
def _twice_differentiable(pooler: ROIPooler) -> Any:
    """detectron2's ``ROIPooler`` with its per-level RoIAlign modules swapped for ones with a
    double backward (same output size, scale, sampling ratio and alignment) inside the block."""
    levels = pooler.level_poolers
    pooler.level_poolers = nn.ModuleList(
        TwiceDifferentiableROIAlign(p.output_size, p.spatial_scale, p.sampling_ratio, p.aligned) for p in levels)
    try:
        yield
    finally:
        pooler.level_poolers = levels


def ground_truth_boxes(inputs: list[dict[str, Any]], device: torch.device) -> list[dict[str, Tensor]]:
    """Each input's boxes and labels ``1..K`` (the shared-region convention; 0 = none)."""
    empty = {"boxes": torch.zeros((0, 4), device=device), "labels": torch.zeros(0, dtype=torch.int64, device=device)}
    return [{"boxes": x["instances"].gt_boxes.tensor.to(device), "labels": x["instances"].gt_classes.to(device) + 1}
            if "instances" in x else empty for x in inputs]


class DistillingRCNN(nn.Module):
    """Distillation inside a user's own detectron2 training loop (``SimpleTrainer``,
    ``AMPTrainer``, a ``DefaultTrainer`` subclass whose ``build_model`` returns this).

    In training mode the forward returns detectron2's loss dict: the student's own losses
    (``loss_cls``, ``loss_box_reg``, ``loss_rpn_cls``, ``loss_rpn_loc``, each times ``alpha``)
    plus ``loss_distill``: ``beta * tau^2 * KL(teacher || student)`` over the teacher's best
    ``regions_per_image`` proposals and the ground-truth boxes, pooled by each model's own box
    head, averaged per image and then over the batch (the engine's KD term). The trainer sums
    and logs every key as usual. In eval mode it *is* the student, so evaluators and
    ``inference_on_dataset`` work unchanged. The teacher stays frozen and in eval mode.

    Args:
        student, teacher: detectron2 ``GeneralizedRCNN`` models for the same classes.
        student_format, teacher_format: their ``INPUT.FORMAT`` (the data arrives in the
            student's; the teacher's channels are reordered if it differs).
    """

    def __init__(self, student: GeneralizedRCNN, teacher: GeneralizedRCNN, *, alpha: float = 1.0, beta: float = 0.5,
                 temperature: float = 2.0, regions_per_image: int = 64, regions_include_gt: bool = True,
                 student_format: str = "BGR", teacher_format: str = "BGR") -> None:
        super().__init__()
        if student.roi_heads.num_classes != teacher.roi_heads.num_classes:
            raise ConfigError(f"DistillingRCNN: the student has {student.roi_heads.num_classes} classes and the teacher "
                              f"{teacher.roi_heads.num_classes}; distillation needs the same classes")
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.regions_per_image, self.regions_include_gt = regions_per_image, regions_include_gt
        # region-level views of the two models, kept out of the module tree (and the checkpoint)
        teacher_view = Detectron2Detector(teacher, input_format=teacher_format)
        teacher_view.flip_channels = teacher_format != student_format
        self._views = (Detectron2Detector(student, input_format=student_format), teacher_view)

    @property
    def device(self) -> torch.device:
        return self.student.device

    def train(self, mode: bool = True) -> DistillingRCNN:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, batched_inputs: list[dict[str, Any]]) -> Any:
        if not self.training:
            return self.student(batched_inputs)
        student, teacher = self._views
        with torch.no_grad():
            proposals, sizes, features = teacher(batched_inputs, mode="regions")
            context = region_context(proposals, features, ground_truth_boxes(batched_inputs, proposals[0].device), sizes,
                                     teacher, 0, regions_per_image=self.regions_per_image, include_gt=self.regions_include_gt,
                                     num_classes=teacher.num_classes, iou=0.5)
            teacher_logits = teacher(batched_inputs, regions=context.regions, features=context.source_features)["region_logits"]
        out = student(batched_inputs, regions=context.regions)
        target = SoftTarget.from_logits(teacher_logits, self.temperature)
        kl = target.kl_per_unit(out["region_logits"], self.temperature) * self.temperature**2
        losses = {name: self.alpha * value.mean() for name, value in out["supervised_parts"].items()}
        losses["loss_distill"] = self.beta * per_image_mean(kl, context.unit_image, len(sizes)).mean()
        return losses
