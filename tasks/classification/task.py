"""Image classification as a task adapter: one distillation unit per image."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

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


class ImageClassification(Task):
    """Students and teachers are image classifiers; a unit is an image.

    Args:
        data: the data set (``Digits``, ``CIFAR100``, ``CIFAR10``, ``TinyImageNet``, ``ImageFolderData``).
        topk: the top-k accuracies to report (in percent).
    """

    selection_metric = "top1"

    def __init__(self, data: ClassificationData, topk: Sequence[int] = (1, 5)) -> None:
        if not topk or any(k < 1 for k in topk):
            raise ConfigError(f"task.topk={list(topk)} must be positive integers")
        self.data = data
        self.topk = tuple(sorted(set(int(k) for k in topk)))
        self.info: TaskInfo | None = None

    def setup(self, seed: int) -> TaskInfo:
        self.data.setup(seed)
        self.info = TaskInfo(
            num_classes=self.data.num_classes,
            in_channels=self.data.in_channels,
            image_size=tuple(self.data.image_size),  # type: ignore[arg-type]
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
        logits = _logits(model(self._inputs(batch, view)))
        return Knowledge.for_images(logits, batch["targets"])

    def images(self, batch: Any) -> Tensor:
        return self._inputs(batch, 0)

    def predict(self, model: nn.Module, batch: Any) -> Tensor:
        return _logits(model(self._inputs(batch, 0)))

    def evaluator(self, fabric: Any) -> Evaluator:
        return TopKEvaluator(fabric, self.topk)

    def describe(self) -> str:
        return f"ImageClassification({type(self.data).__name__})"


class TopKEvaluator(Evaluator):
    """Top-k accuracy (%) and mean cross-entropy; exact under DDP.

    Samples are keyed by their data-set index so the padding a distributed sampler adds to even
    out ranks is counted once.
    """

    def __init__(self, fabric: Any, topk: Sequence[int] = (1, 5)) -> None:
        self.fabric = fabric
        self.topk = tuple(topk)
        self._index: list[Tensor] = []
        self._correct: list[Tensor] = []
        self._loss: list[Tensor] = []

    def update(self, outputs: Tensor, batch: Any) -> None:
        targets = batch["targets"]
        logits = outputs.float()
        k_max = min(max(self.topk), logits.shape[-1])
        top = logits.topk(k_max, dim=-1).indices
        hits = top.eq(targets[:, None])
        correct = torch.stack([hits[:, : min(k, k_max)].any(dim=1) for k in self.topk], dim=1)
        self._index.append(batch["index"].detach())
        self._correct.append(correct.detach())
        self._loss.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none").detach())

    def compute(self) -> dict[str, float]:
        if not self._index:
            return {**{f"top{k}": float("nan") for k in self.topk}, "loss": float("nan")}
        index = torch.cat(self._index)
        correct = torch.cat(self._correct).double()
        loss = torch.cat(self._loss)
        if self.fabric is not None and self.fabric.world_size > 1:
            with warnings.catch_warnings():  # Fabric's all_gather uses a deprecated torch helper
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", UserWarning)
                index = self.fabric.all_gather(index).flatten(0, 1)
                correct = self.fabric.all_gather(correct).flatten(0, 1)
                loss = self.fabric.all_gather(loss).flatten(0, 1)
        order = torch.argsort(index, stable=True)
        index, correct, loss = index[order], correct[order], loss[order]
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[1:] != index[:-1]
        correct, loss = correct[keep], loss[keep]
        out = {f"top{k}": 100.0 * float(correct[:, i].mean()) for i, k in enumerate(self.topk)}
        out["loss"] = float(loss.double().mean())
        return out
