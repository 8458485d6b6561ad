"""Multi-exit classifiers: a backbone split into stages with a classifier after each stage.

Self-boosting methods (DSN, self-distillation, MetaDistiller) supervise these early exits during
training; at deployment only the backbone's own final exit is kept (:attr:`MultiExitNet.backbone`
is the plain classifier, with unchanged parameter names), so the exit heads are training-only cost.

Configured in YAML by wrapping any supported backbone factory::

    model:
      class_path: collab_distill.tasks.classification.MultiExit
      init_args:
        backbone: {class_path: collab_distill.tasks.classification.ResNet, init_args: {size: s}}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import torchvision
from torch import Tensor, nn

from collab_distill.task import ConfigError, ModelFactory, TaskInfo
from collab_distill.tasks.classification.models import ResNetCifar, TorchvisionModel

__all__ = ["MultiExitOutput", "BottleneckHead", "MultiExitNet", "MultiExit"]


class MultiExitOutput(NamedTuple):
    """What a multi-exit classifier returns, in training and in evaluation.

    Attributes:
        logits: ``[B, K]`` the final exit (the deployed classifier's output).
        exits: ``[B, K]`` logits of every exit, shallow to deep; the last one is ``logits``.
        features: ``[B, C_k, H_k, W_k]`` output of every stage, shallow to deep.
    """

    logits: Tensor
    exits: tuple[Tensor, ...]
    features: tuple[Tensor, ...]


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class BottleneckHead(nn.Module):
    """An early-exit classifier: 1x1 reduce, 3x3 convs (stride 2 each, ``downsample`` times, so the
    map shrinks toward the final stage's resolution; one stride-1 conv if 0), 1x1 expand, each
    with BN+ReLU, then global average pooling and a linear layer.

    Args:
        in_channels: channels of the stage it reads.
        width: the bottleneck width.
        out_channels: width after the 1x1 expansion (the final stage's width).
        num_classes: size of the logits.
        downsample: number of stride-2 3x3 convs.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, num_classes: int, downsample: int) -> None:
        super().__init__()
        layers = _conv_bn_relu(in_channels, width, 1)
        for _ in range(max(downsample, 1)):
            layers += _conv_bn_relu(width, width, 3, stride=2 if downsample > 0 else 1)
        layers += _conv_bn_relu(width, out_channels, 1)
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


#: how to cut each supported backbone: the attributes run by each stage, and by the final exit
_RESNET_CIFAR_STAGES = (("stem", "layer1"), ("layer2",), ("layer3",), ("layer4",))
_RESNET_CIFAR_EXIT = ("pool", "fc")
_TORCHVISION_RESNET_STAGES = (("conv1", "bn1", "relu", "maxpool", "layer1"), ("layer2",), ("layer3",), ("layer4",))
_TORCHVISION_RESNET_EXIT = ("avgpool", "fc")


def _stage_plan(backbone: nn.Module) -> tuple[tuple[tuple[str, ...], ...], tuple[str, str]] | None:
    if isinstance(backbone, ResNetCifar):
        return _RESNET_CIFAR_STAGES, _RESNET_CIFAR_EXIT
    if isinstance(backbone, torchvision.models.ResNet):
        return _TORCHVISION_RESNET_STAGES, _TORCHVISION_RESNET_EXIT
    return None


def default_width(stage_channels: Sequence[int]) -> int:
    """A ResNet bottleneck's width for an output of the final stage's width: a quarter of it,
    but at least 8 channels (or the final width itself when that is smaller)."""
    final = stage_channels[-1]
    return max(final // 4, min(final, 8))


class MultiExitNet(nn.Module):
    """A backbone cut into ``K`` stages, with a :class:`BottleneckHead` after each of the first
    ``K - 1`` stages and the backbone's own pooling and classifier as the final exit.

    The backbone's modules are run in place (not copied), so ``backbone`` is the deployable
    plain classifier with the trained weights. ``forward`` returns a :class:`MultiExitOutput`
    in both training and evaluation mode.

    Args:
        backbone: a :class:`ResNetCifar` or a torchvision ``ResNet`` (resnet*, resnext*, wide_resnet*).
        num_classes: classes of the early exits (the backbone's ``fc`` already has them).
        example: one input ``[1, C, H, W]`` of the training size, to find stage shapes.
        head_width: the heads' bottleneck width (default: :func:`default_width`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, example: Tensor, head_width: Optional[int] = None) -> None:
        super().__init__()
        plan = _stage_plan(backbone)
        if plan is None:
            raise ConfigError(
                f"MultiExit.backbone builds a {type(backbone).__name__}, which MultiExit cannot cut into stages; "
                "use collab_distill.tasks.classification.ResNet or a TorchvisionModel of the ResNet family "
                "(resnet18, resnet50, resnext50_32x4d, wide_resnet50_2, ...)"
            )
        self.backbone = backbone
        self._stages, self._exit = plan
        shapes = self._probe(example)
        #: channels of every stage's output, shallow to deep
        self.stage_channels: tuple[int, ...] = tuple(s[0] for s in shapes)
        #: spatial size of every stage's output for the training image size
        self.stage_sizes: tuple[tuple[int, int], ...] = tuple((s[1], s[2]) for s in shapes)
        #: stride-2 convs each early head needs to reach the final stage's resolution
        self.head_downsamples: tuple[int, ...] = tuple(
            _halvings(size, self.stage_sizes[-1]) for size in self.stage_sizes[:-1]
        )
        width = head_width or default_width(self.stage_channels)
        self.heads = nn.ModuleList(
            BottleneckHead(c, width, self.stage_channels[-1], num_classes, d)
            for c, d in zip(self.stage_channels[:-1], self.head_downsamples)
        )

    @property
    def num_exits(self) -> int:
        """Early exits plus the final one (the marker self-boosting plugins check for)."""
        return len(self._stages)

    @property
    def final_stage_path(self) -> str:
        """Module path (as ``named_modules()`` spells it) of the final stage, whose output is the
        deepest feature map, e.g. ``backbone.layer4``."""
        return "backbone." + self._stages[-1][-1]

    @property
    def head_feature_paths(self) -> tuple[str, ...]:
        """Module paths of the early heads' bottleneck bodies, shallow to deep (``heads.0.body``,
        ...): each outputs the final stage's channels at (about) its resolution."""
        return tuple(f"heads.{k}.body" for k in range(len(self.heads)))

    @property
    def deploy_model(self) -> nn.Module:
        """The plain classifier kept for deployment (final exit only; the heads are dropped)."""
        return self.backbone

    def _run(self, names: Sequence[str], x: Tensor) -> Tensor:
        for name in names:
            x = getattr(self.backbone, name)(x)
        return x

    @torch.no_grad()
    def _probe(self, example: Tensor) -> list[tuple[int, int, int]]:
        modes = {m: m.training for m in self.backbone.modules()}
        self.backbone.eval()
        try:
            shapes, x = [], example
            for names in self._stages:
                x = self._run(names, x)
                shapes.append((x.shape[1], x.shape[-2], x.shape[-1]))
        finally:
            for m, training in modes.items():
                m.training = training
        return shapes

    def forward(self, x: Tensor) -> MultiExitOutput:
        features = []
        for names in self._stages:
            x = self._run(names, x)
            features.append(x)
        pool, fc = self._exit
        final = getattr(self.backbone, fc)(torch.flatten(getattr(self.backbone, pool)(x), 1))
        exits = tuple(head(f) for head, f in zip(self.heads, features)) + (final,)
        return MultiExitOutput(final, exits, tuple(features))


def _halvings(size: tuple[int, int], final: tuple[int, int]) -> int:
    ratio = max(size[0] / max(final[0], 1), size[1] / max(final[1], 1))
    return max(0, round(math.log2(ratio))) if ratio > 0 else 0


_TORCHVISION_RESNETS = ("resnet", "resnext", "wide_resnet")


class MultiExit(ModelFactory):
    """Wraps a backbone factory into a :class:`MultiExitNet` (early exits after every stage but the last).

    Args:
        backbone: ``ResNet`` (the ResNet10 family) or ``TorchvisionModel`` of the ResNet family.
        head_width: bottleneck width of the early-exit heads (default: a quarter of the final
            stage's width, at least 8).
    """

    def __init__(self, backbone: ModelFactory, head_width: Optional[int] = None) -> None:
        if isinstance(backbone, MultiExit):
            raise ConfigError("MultiExit.backbone is itself a MultiExit; give the plain backbone factory")
        if isinstance(backbone, TorchvisionModel) and not backbone.name.startswith(_TORCHVISION_RESNETS):
            raise ConfigError(
                f"MultiExit.backbone: TorchvisionModel({backbone.name}) is not supported; MultiExit cuts ResNet-style "
                "models only (resnet18, resnet50, resnext50_32x4d, wide_resnet50_2, ...) or "
                "collab_distill.tasks.classification.ResNet"
            )
        if head_width is not None and head_width < 1:
            raise ConfigError(f"MultiExit.head_width={head_width} must be >= 1 (or null for the default)")
        self.backbone = backbone
        self.head_width = head_width

    @property
    def provides_trained_weights(self) -> bool:
        return self.backbone.provides_trained_weights

    def build(self, info: TaskInfo) -> MultiExitNet:
        model = self.backbone.build(info)
        example = torch.zeros(1, info.in_channels, *info.image_size)
        return MultiExitNet(model, info.num_classes, example, self.head_width)

    def describe(self) -> str:
        return f"MultiExit({self.backbone.describe()})"
