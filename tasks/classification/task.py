"""Image classification as a task adapter: one distillation unit per image."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from collab_distill.records import Knowledge
from collab_distill.task import ConfigError, Evaluator, Task, TaskInfo
from collab_distill.tasks.classification.data import ClassificationData

__all__ = ["ImageClassification", "TopKEvaluator"]


def _logits(output: Any) -> Tensor:
    """Plain logits from what a classifier returns (tensor, torchvision's named tuples)."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"a classifier returned {type(output).__name__}; expected a logits tensor")


def _exit_features(output: Any) -> dict[str, Tensor]:
    """A multi-exit classifier's exits and stage maps as record features, for self-boosting rules:
    ``exit_logits`` ``[E, B, K]`` (shallow to deep, the last is the final exit) and ``stage_<k>``
    (k = 1..K); empty for a plain classifier."""
    exits = getattr(output, "exits", None)
    if exits is None:
        return {}
    features = {"exit_logits": torch.stack(tuple(exits))}
    for k, stage in enumerate(getattr(output, "features", ()), start=1):
        features[f"stage_{k}"] = stage
    return features


class ImageClassification(Task):
    """Students and teachers are image classifiers; a unit is an image.

    Args:
        data: the data set (``Digits``, ``CIFAR100``, ``CIFAR10``, ``TinyImageNet``, ``ImageFolderData``).
        topk: the top-k accuracies to report (in percent); each k below the number of classes
            (top-k over all classes is always 100 %). Default: top-1 and, with more than 5
            classes, top-5.
    """

    selection_metric = "top1"

    def __init__(self, data: ClassificationData, topk: Optional[Sequence[int]] = None) -> None:
        if topk is not None and (not topk or any(k < 1 for k in topk)):
            raise ConfigError(f"task.topk={list(topk)} must be positive integers")
        self.data = data
        self.requested_topk = None if topk is None else tuple(sorted(set(int(k) for k in topk)))
        self.topk = self.requested_topk or (1, 5)
        self.info: TaskInfo | None = None

    def setup(self, seed: int) -> TaskInfo:
        self.data.setup(seed)
        classes = self.data.num_classes
        if self.requested_topk is None:
            self.topk = tuple(k for k in (1, 5) if k == 1 or k < classes)
        elif any(k > 1 and k >= classes for k in self.requested_topk):
            raise ConfigError(
                f"task.topk={list(self.requested_topk)}: the data has {classes} classes, so top-k for k >= {classes} "
                f"is always 100 %; give values below {classes}")
        self.info = TaskInfo(
            num_classes=self.data.num_classes,
            in_channels=self.data.in_channels,
            image_size=tuple(self.data.image_size),
        )
        return self.info

    def dataset(self, split: str) -> Dataset:
        return self.data.dataset(split)

    def loader_options(self, split: str) -> dict[str, Any]:
        batch = self.data.batch_size if split == "train" else (self.data.eval_batch_size or self.data.batch_size)
        return {"batch_size": batch, "num_workers": self.data.num_workers, "persistent_workers": self.data.num_workers > 0}

    @property
    def num_views(self) -> int:
        return self.data.views

    def example_input(self, info: TaskInfo) -> Tensor:
        return torch.zeros(1, info.in_channels, *info.image_size)

    @staticmethod
    def _inputs(batch: dict[str, Tensor], view: int) -> Tensor:
        x = batch["inputs"]
        if x.dim() == 5:  # [B, V, C, H, W]: each student sees its own augmented view
            x = x[:, view % x.shape[1]]
        return x

    def knowledge(self, model: nn.Module, batch: Any, *, view: int = 0, context: Any = None) -> Knowledge:
        output = model(self._inputs(batch, view))
        return Knowledge.for_images(_logits(output), batch["targets"], **_exit_features(output))

    def images(self, batch: Any) -> Tensor:
        return self._inputs(batch, 0)

    def predict(self, model: nn.Module, batch: Any) -> Any:
        """Logits; for a multi-exit model its output without the stage maps, so the evaluator
        also scores every exit and their ensemble in the same pass."""
        output = model(self._inputs(batch, 0))
        if getattr(output, "exits", None) is not None and hasattr(output, "_replace"):
            return output._replace(features=())
        return _logits(output)

    def evaluator(self, fabric: Any) -> Evaluator:
        return TopKEvaluator(fabric, self.topk)

    def describe(self) -> str:
        return f"ImageClassification({type(self.data).__name__})"


class TopKEvaluator(Evaluator):
    """Top-k accuracy (%) and mean cross-entropy; exact under DDP.

    Samples are keyed by their data-set index so the padding a distributed sampler adds to even
    out ranks is counted once.

    For outputs with ``exits`` (a multi-exit classifier) ``top<k>``/``loss`` stay those of the
    final exit (the deployed model, and the selection metric); added are ``exit<e>_top1`` of
    every exit ``e = 1..E`` and ``ensemble_top<k>`` of the mean of the exits' softmax
    probabilities (the self-distillation papers' "ensemble output").
    """

    def __init__(self, fabric: Any, topk: Sequence[int] = (1, 5)) -> None:
        self.fabric = fabric
        self.topk = tuple(topk)
        self._index: list[Tensor] = []
        self._correct: list[Tensor] = []
        self._loss: list[Tensor] = []
        self._exit_correct: list[Tensor] = []  # [B, E + len(topk)]: each exit's top-1, then the ensemble's top-k
        self._num_exits = 0

    def _hits(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``[B, len(topk)]`` whether the target is in each top-k."""
        k_max = min(max(self.topk), logits.shape[-1])
        hits = logits.topk(k_max, dim=-1).indices.eq(targets[:, None])
        return torch.stack([hits[:, : min(k, k_max)].any(dim=1) for k in self.topk], dim=1)

    def update(self, outputs: Any, batch: Any) -> None:
        targets = batch["targets"]
        logits = _logits(outputs).float()
        self._index.append(batch["index"].detach())
        self._correct.append(self._hits(logits, targets).detach())
        self._loss.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none").detach())
        exits = getattr(outputs, "exits", None)
        if exits is not None:
            stacked = torch.stack([e.float() for e in exits])  # [E, B, K]
            k_max = min(max(self.topk), stacked.shape[-1])  # as _hits, so the last exit's top-1 is top1 exactly
            per_exit = stacked.topk(k_max, dim=-1).indices[..., 0].eq(targets[None, :])  # [E, B]
            ensemble = self._hits(stacked.softmax(dim=-1).mean(dim=0), targets)
            self._exit_correct.append(torch.cat([per_exit.t(), ensemble], dim=1).detach())
            self._num_exits = stacked.shape[0]

    def compute(self) -> dict[str, float]:
        if not self._index:
            return {**{f"top{k}": float("nan") for k in self.topk}, "loss": float("nan")}
        index = torch.cat(self._index)
        correct = torch.cat(self._correct).double()
        loss = torch.cat(self._loss)
        with_exits = len(self._exit_correct) == len(self._index)
        exit_correct = torch.cat(self._exit_correct).double() if with_exits else None
        if self.fabric is not None and self.fabric.world_size > 1:
            with warnings.catch_warnings():  # Fabric's all_gather uses a deprecated torch helper
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", UserWarning)
                index = self.fabric.all_gather(index).flatten(0, 1)
                correct = self.fabric.all_gather(correct).flatten(0, 1)
                loss = self.fabric.all_gather(loss).flatten(0, 1)
                if exit_correct is not None:
                    exit_correct = self.fabric.all_gather(exit_correct).flatten(0, 1)
        order = torch.argsort(index, stable=True)
        index, correct, loss = index[order], correct[order], loss[order]
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[1:] != index[:-1]
        correct, loss = correct[keep], loss[keep]
        out = {f"top{k}": 100.0 * float(correct[:, i].mean()) for i, k in enumerate(self.topk)}
        out["loss"] = float(loss.double().mean())
        if exit_correct is not None:
            exit_correct = exit_correct[order][keep]
            for e in range(self._num_exits):
                out[f"exit{e + 1}_top1"] = 100.0 * float(exit_correct[:, e].mean())
            for i, k in enumerate(self.topk):
                out[f"ensemble_top{k}"] = 100.0 * float(exit_correct[:, self._num_exits + i].mean())
        return out
