"""What a detectron2 model is built from: the built-in Faster R-CNN + FPN config
(:func:`default_config`, ``Base-RCNN-FPN``'s values) and its weights, read from any file
detectron2 or collab-distill writes (:func:`load_detectron2_weights`), all of them or a clear
error.

Apart from :mod:`~collab_distill.tasks.detection.detectron2` (the model factory, data and task
that use them) so that the weight loading, which also serves detectron2's own training loop
(``examples/detectron2_train_net.py``), stands on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from collab_distill.checkpoint import prefix_mapped
from collab_distill.task import ConfigError

__all__ = ["default_config", "recording_checkpointer", "load_detectron2_weights"]


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


def recording_checkpointer(model: nn.Module, preloaded: Optional[dict[str, Any]] = None) -> Any:
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
    checkpointer = recording_checkpointer(target, preloaded)
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
