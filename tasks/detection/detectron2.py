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
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from collab_distill.checkpoint import prefix_mapped
from collab_distill.data import IndexedDataset, SeededSample
from collab_distill.records import Knowledge, SoftTarget, per_image_mean
from collab_distill.task import ConfigError, Evaluator, ModelFactory, Task, TaskInfo
from collab_distill.tasks.detection.data import CocoDetection
from collab_distill.tasks.detection.roi_align import (
    TwiceDifferentiableROIAlign,
    exact_pooling_enabled,
    twice_differentiable_pooling,
)
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

if TYPE_CHECKING:  # detectron2 ships no type information: these are Any to mypy
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.modeling.poolers import ROIPooler

__all__ = ["Detectron2RCNN", "Detectron2Detector", "Detectron2Coco", "Detectron2Detection", "Detectron2CocoEvaluator",
           "DistillingRCNN", "detectron2_available", "load_detectron2_weights"]

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


def default_config(depth: int) -> Any:
    """A detectron2 config for Faster R-CNN with a ResNet-``depth`` FPN backbone, with the
    values of detectron2's ``Base-RCNN-FPN.yaml`` (built in code: ``model_zoo`` needs
    ``pkg_resources``, which recent setuptools no longer ships)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    m = cfg.MODEL
    m.META_ARCHITECTURE = "GeneralizedRCNN"
    m.WEIGHTS = ""
    m.BACKBONE.NAME = "build_resnet_fpn_backbone"
    m.RESNETS.DEPTH = depth
    m.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    m.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    m.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    m.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    m.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.PRE_NMS_TOPK_TEST = 2000, 1000
    m.RPN.POST_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TEST = 1000, 1000
    m.ROI_HEADS.NAME = "StandardROIHeads"
    m.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    m.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    m.ROI_BOX_HEAD.NUM_FC = 2
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    return cfg


def _recording_checkpointer(model: nn.Module, preloaded: Optional[dict[str, Any]] = None) -> Any:
    """detectron2's ``DetectionCheckpointer`` that remembers which keys did not load (it only
    logs them), reads ``.pth`` files with non-tensor payloads, and takes a torch file's content
    already read (``preloaded``), so a file inspected first is not read twice."""
    from detectron2.checkpoint import DetectionCheckpointer

    class RecordingCheckpointer(DetectionCheckpointer):
        incompatible: Any = None

        def _torch_load(self, f: Any) -> Any:
            if preloaded is not None:
                return preloaded
            return torch.load(f, map_location="cpu", weights_only=False)

        def _log_incompatible_keys(self, incompatible: Any) -> None:
            self.incompatible = incompatible
            super()._log_incompatible_keys(incompatible)

    return RecordingCheckpointer(model)


def load_detectron2_weights(model: nn.Module, path: Union[str, Path], *, strict: bool = True, field: str = "weights",
                            member: Optional[str] = None, fix: str = "",
                            checkpointables: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Load a weights file into a detectron2 model (a ``GeneralizedRCNN``, or a module of them
    such as :class:`DistillingRCNN`), all of it or nothing.

    Reads what ``DetectionCheckpointer`` reads (model-zoo ``.pkl``, detectron2 ``.pth``,
    ``detectron2://`` URLs) and collab-distill's own files: a plain state dict (a run's
    ``teachers/NAME/teacher.pt``, a ``collab-distill export``) whose keys carry
    :class:`Detectron2Detector`'s ``model.`` prefix, or the model ``member`` of a run's
    ``last.ckpt`` (needed when it holds several). detectron2 loads what fits and only logs the
    rest, so a teacher could silently keep a random head; with ``strict`` a key of the model
    missing from the file, a key of the file the model lacks or a tensor of another shape is a
    :class:`ConfigError` naming ``field``, the file, the first problems and the likely cause, then
    ``fix``. ``strict=False`` is for files that cover part of the model on purpose (an ImageNet
    backbone). ``checkpointables`` (a trainer's ``{"trainer": ...}``) are restored from the file
    after the model, as ``DetectionCheckpointer.load`` does. Returns the file's other fields
    (detectron2's ``iteration``, ...).
    """
    from urllib.parse import urlparse

    from detectron2.utils.file_io import PathManager

    target = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    source = str(path)
    local = urlparse(source)._replace(query="").geturl()  # detectron2 reads e.g. "x.pkl?matching_heuristics=True"
    if not Path(local).is_file():
        try:
            local = PathManager.get_local_path(local)  # detectron2://, https:// (downloaded once, cached)
        except Exception as err:
            raise ConfigError(f"{field}: {source!r} does not exist and cannot be fetched ({type(err).__name__}: {err})") from None
        if not Path(local).is_file():
            raise ConfigError(f"{field}: {source!r} does not exist. Fix the path (relative paths start at the working "
                              "directory).")
    preloaded = None
    if Path(local).suffix not in (".pkl", ".pyth"):  # pickles of numpy arrays and pycls files: detectron2 reads them
        try:
            content = torch.load(local, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ConfigError(f"{field}: {source!r} cannot be read as a torch file ({type(err).__name__}: {err}); give a "
                              "detectron2 .pkl/.pth or a collab-distill weights file") from None
        preloaded = _detectron2_layout(content, target, f"{field}: {source!r}", member)
    checkpointer = _recording_checkpointer(target, preloaded)
    try:
        extra = checkpointer.load(source, checkpointables=[])
    except Exception as err:
        raise ConfigError(f"{field}: detectron2 cannot load {source!r}: {type(err).__name__}: {err}") from err
    if strict and checkpointer.incompatible is not None:
        problem = _weights_mismatch(checkpointer.incompatible, target)
        if problem:
            raise ConfigError(f"{field}: {source!r} does not fit this model: {problem}" + (f" {fix}" if fix else ""))
    for key, state in (checkpointables or {}).items():
        if key in extra:
            state.load_state_dict(extra.pop(key))
    return extra


def _detectron2_layout(content: Any, model: nn.Module, where: str, member: Optional[str]) -> dict[str, Any]:
    """A torch file's content as detectron2's ``{"model": state_dict, ...}``: a collab-distill
    run checkpoint gives its ``member``, a plain state dict is wrapped, and keys that equal the
    model's once a prefix common to all of them is removed or added (collab-distill's ``model.``)
    are mapped."""
    from collab_distill.checkpoint import READABLE_FORMATS

    if isinstance(content, Mapping) and content.get("format") in READABLE_FORMATS and "students" in content:
        pool = {**content.get("teachers", {}), **content.get("students", {})}
        if member is None and len(pool) == 1:
            member = next(iter(pool))
        if member not in pool:
            named = "no member is named" if member is None else f"it has no member {member!r}"
            raise ConfigError(
                f"{where} is a collab-distill run checkpoint with members {sorted(pool)} and {named}: name one "
                "(--teacher-member in examples/detectron2_train_net.py), or give one model's file (`collab-distill "
                "export --student NAME`, or a run's teachers/NAME/teacher.pt)")
        content = {"model": pool[member]}
    elif isinstance(content, nn.Module):
        content = {"model": content.state_dict()}
    elif isinstance(content, Mapping) and not isinstance(content.get("model"), Mapping):
        content = {"model": content}
    if not isinstance(content, Mapping) or not isinstance(content.get("model"), Mapping):
        raise ConfigError(f"{where} holds a {type(content).__name__}, not weights")
    content = dict(content)
    if not content.get("matching_heuristics"):  # files renamed by detectron2's heuristics keep their keys
        content["model"] = dict(prefix_mapped(dict(content["model"]), set(model.state_dict())))
    return content


def _weights_mismatch(incompatible: Any, model: nn.Module) -> str:
    """detectron2's incompatible keys as one line: counts, the first keys of each kind and the
    likely cause; empty when everything loaded."""
    own = set(model.state_dict())
    computed = {name for name, _ in model.named_buffers()} - own  # non-persistent buffers (pixel_mean): set by the config
    shapes = [(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes]
    missing = [k for k in incompatible.missing_keys if k not in {s[0] for s in shapes}]
    unexpected = [k for k in incompatible.unexpected_keys if k not in computed]
    if not (shapes or missing or unexpected):
        return ""
    counts = [f"{len(shapes)} tensor(s) of another shape" if shapes else "",
              f"{len(missing)} key(s) of the model are not in the file" if missing else "",
              f"{len(unexpected)} key(s) of the file are not in the model" if unexpected else ""]
    first = ([f"{k}: file {a} vs model {b}" for k, a, b in shapes[:3]] + [f"{k}: not in the file" for k in missing[:3]]
             + [f"{k}: not in the model" for k in unexpected[:3]])
    heads = [(a, b) for k, a, b in shapes if k.endswith("box_predictor.cls_score.weight")]

    def tops(keys: Any) -> list[str]:
        return sorted({k.split(".", 1)[0] + "." for k in keys})

    if heads:  # detectron2's class head has one row per class plus background
        cause = (f"the file was trained for {heads[0][0][0] - 1} classes and this model has {heads[0][1][0] - 1} "
                 "(MODEL.ROI_HEADS.NUM_CLASSES, the classes of the data)")
    elif unexpected and {name for name, _ in model.named_parameters()} <= set(missing):  # no weight loaded
        cause = (f"none of the model's keys is in the file: the model's start with {tops(own)}, the file's with "
                 f"{tops(unexpected)}, so it was saved from another (wrapped or unwrapped) model")
        if tops(unexpected) == ["student.", "teacher."]:
            cause += ("; this is a DistillingRCNN checkpoint (detectron2_train_net.py's model_*.pth): its student "
                      "alone is OUTPUT_DIR/student_final.pth")
    elif missing and not (shapes or unexpected):
        cause = "the file covers only part of the model (e.g. a backbone-only file)"
    else:
        cause = "the file was saved from another architecture (config)"
    return f"{', '.join(c for c in counts if c)}; first: {first}. Likely cause: {cause}."


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


def _ground_truth(inputs: list[dict[str, Any]], device: torch.device) -> list[dict[str, Tensor]]:
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
            context = region_context(proposals, features, _ground_truth(batched_inputs, proposals[0].device), sizes,
                                     teacher, 0, regions_per_image=self.regions_per_image, include_gt=self.regions_include_gt,
                                     num_classes=teacher.num_classes, iou=0.5)
            teacher_logits = teacher(batched_inputs, regions=context.regions, features=context.source_features)["region_logits"]
        out = student(batched_inputs, regions=context.regions)
        target = SoftTarget.from_logits(teacher_logits, self.temperature)
        kl = target.kl_per_unit(out["region_logits"], self.temperature) * self.temperature**2
        losses = {name: self.alpha * value.mean() for name, value in out["supervised_parts"].items()}
        losses["loss_distill"] = self.beta * per_image_mean(kl, context.unit_image, len(sizes)).mean()
        return losses


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
            _unregister(name)
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
            self.records["train"] = [_with_boxes(record, train, contiguous) for record in self.records["train"]]

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


def _with_boxes(record: dict[str, Any], split: Any, contiguous: Mapping[int, int]) -> dict[str, Any]:
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


def _unregister(name: str) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


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
        gt = _ground_truth(inputs, proposals[0].device)
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
