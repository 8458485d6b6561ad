"""What the engine asks of a task adapter (classification, detection, ...).

The engine never looks inside a batch or a model: it asks the task for data sets, asks it to
build models from factories, and asks it to turn ``(model, batch)`` into a
:class:`~collab_distill.records.Knowledge` record. Evaluation is the task's too, because the
metrics of classification (top-k) and detection (COCO AP) have nothing in common.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from collab_distill.records import Knowledge

__all__ = ["TaskInfo", "ModelFactory", "Evaluator", "Task", "ConfigError"]


class ConfigError(ValueError):
    """Bad user input (config, data, checkpoint) found before or during setup.

    The message names the offending field or file and says how to fix it. The CLI prints it
    without a traceback.
    """


@dataclass(frozen=True)
class TaskInfo:
    """Facts about the data that model factories need."""

    num_classes: int
    in_channels: int = 3
    image_size: tuple[int, int] = (32, 32)
    extra: Mapping[str, Any] = field(default_factory=dict)


class ModelFactory(abc.ABC):
    """Builds a model once the data is known. Configured in YAML by ``class_path``/``init_args``."""

    @abc.abstractmethod
    def build(self, info: TaskInfo) -> nn.Module:
        """Return a freshly initialised model for a task described by ``info``."""

    @property
    def provides_trained_weights(self) -> bool:
        """True when :meth:`build` loads trained weights itself (e.g. a detector from a
        model-zoo file), so a teacher built by it needs neither a checkpoint nor training."""
        return False

    def describe(self) -> str:
        return type(self).__name__


class Evaluator(abc.ABC):
    """Accumulates one model's predictions over an evaluation split and reduces them to metrics."""

    @abc.abstractmethod
    def update(self, outputs: Any, batch: Any) -> None: ...

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """Metrics for everything seen, already reduced across processes."""


class Task(abc.ABC):
    """A task adapter. Subclasses are selected in YAML under ``task:``."""

    #: names of the data splits the task provides; ``meta`` is held out from ``train``.
    splits: tuple[str, ...] = ("train", "meta", "val", "test")
    #: whether the task's models can be differentiated twice (the exact second-order meta step),
    #: inside :meth:`twice_differentiable`; when False the engine refuses that hypergradient up front
    double_backward: bool = True

    @abc.abstractmethod
    def setup(self, seed: int) -> TaskInfo:
        """Load/split the data (seeded) and validate it; raise :class:`ConfigError` on bad input."""

    @abc.abstractmethod
    def dataset(self, split: str) -> Dataset:
        """The data set of one split (``train`` yields augmented samples)."""

    def collate(self, samples: list[Any]) -> Any:
        """Batch a list of samples; default is torch's default collation."""
        from torch.utils.data import default_collate

        return default_collate(samples)

    @property
    def num_views(self) -> int:
        """How many independently augmented views of each training image a batch carries."""
        return 1

    def build_model(self, factory: ModelFactory, info: TaskInfo) -> nn.Module:
        return factory.build(info)

    def example_input(self, info: TaskInfo) -> Any:
        """A single-sample input used to count parameters and MACs; ``None`` skips counting."""
        return None

    def shared_context(self, batch: Any, teachers: Mapping[str, nn.Module], students: Mapping[str, nn.Module]) -> Any:
        """Computed once per batch before any member runs (e.g. regions shared by the cohort)."""
        return None

    @abc.abstractmethod
    def knowledge(self, model: nn.Module, batch: Any, *, view: int = 0, context: Any = None) -> Knowledge:
        """Run ``model`` on ``batch`` (its ``view``-th augmented view) and return its record."""

    @abc.abstractmethod
    def evaluator(self, fabric: Any) -> Evaluator:
        """A fresh evaluator; ``fabric`` is given so it can reduce across processes."""

    @abc.abstractmethod
    def predict(self, model: nn.Module, batch: Any) -> Any:
        """Evaluation-mode outputs of ``model`` on ``batch`` for :meth:`Evaluator.update`."""

    def images(self, batch: Any) -> Tensor:
        """The batch's images as one ``[B, C, H, W]`` tensor, for image-conditioned meta modules
        (a C-Net). Tasks with variable-size images resize or pad here."""
        raise NotImplementedError(f"{type(self).__name__} does not provide images for meta modules")

    def loader_options(self, split: str) -> dict[str, Any]:
        """Keyword arguments of the split's ``DataLoader``; must include ``batch_size``."""
        return {"batch_size": 32, "num_workers": 0}

    def move_batch(self, batch: Any, fabric: Any) -> Any:
        return fabric.to_device(batch)

    def twice_differentiable(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the task's forward passes support a second derivative. The exact
        meta step enters it around its lookahead (the part differentiated twice); tasks whose
        fast kernels lack a double backward (RoIAlign in detectors) switch to exact ones here."""
        return contextlib.nullcontext()

    def describe(self) -> str:
        return type(self).__name__


def check_num_classes(model: nn.Module, logits: Tensor, info: TaskInfo, where: str) -> None:
    """Raise a clear error when a model's output does not match the data's classes."""
    if logits.shape[-1] != info.num_classes:
        raise ConfigError(
            f"{where}: the model outputs {logits.shape[-1]} classes but the data has "
            f"{info.num_classes}. Build the model for {info.num_classes} classes or use matching data."
        )
