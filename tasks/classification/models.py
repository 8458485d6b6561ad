"""Image classifiers and the :class:`~collab_distill.task.ModelFactory` classes that build them.

Two sources of models:

* :class:`ResNet` -- the CIFAR-style "ResNet10 family" used by MC-Distil (tiny students up to
  ResNet34 teachers), built by :class:`ResNetCifar` for any class count, channel count and
  input size from 8x8 upwards.
* :class:`TorchvisionModel` -- any torchvision classification model, adapted to the data's
  channel count and, for small images, given a CIFAR stem.

Both are selected in YAML, e.g.::

    model:
      class_path: collab_distill.tasks.classification.models.ResNet
      init_args: {size: xs}
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from collab_distill.task import ConfigError, ModelFactory, TaskInfo

__all__ = ["BasicBlock", "ResNetCifar", "RESNET_FAMILY", "ResNet", "TorchvisionModel"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut, as in He et al. 2016.

    ReLUs are not in-place so that forward hooks used for feature distillation see the
    tensors they captured unchanged.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet for small images: 3x3 stride-1 stem, no max-pool, four BasicBlock stages.

    Stages downsample by 1/2/2/2, so a 32x32 input ends at 4x4 and an 8x8 input (sklearn
    digits) at 1x1 before the global average pool; larger inputs just give larger maps.

    Args:
        widths: channel width of each of the four stages; the stem has ``widths[0]`` channels.
        blocks: number of BasicBlocks in each stage.
        num_classes: size of the logits.
        in_channels: channels of the input images (1 for grey-scale).
    """

    def __init__(
        self, widths: Sequence[int], blocks: Sequence[int], num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        widths, blocks = list(widths), list(blocks)
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError(f"ResNetCifar needs 4 stage widths and 4 block counts, got {widths} and {blocks}")
        if min(widths) < 1 or min(blocks) < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"ResNetCifar sizes must be positive: widths={widths}, blocks={blocks}, "
                f"num_classes={num_classes}, in_channels={in_channels}"
            )
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages = []
        in_planes = widths[0]
        for width, count, stride in zip(widths, blocks, (1, 2, 2, 2)):
            layers = []
            for i in range(count):
                layers.append(BasicBlock(in_planes, width, stride if i == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        #: length of the vector returned by :meth:`features` (the classifier's input).
        self.num_features = widths[-1]
        self.fc = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """The pooled penultimate vector ``[N, num_features]`` (input of the classifier)."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]``; everything runs inside this call, so DDP sees it all."""
        return self.fc(self.features(x))


#: MC-Distil's model family: name -> (stage widths, blocks per stage), all BasicBlock.
RESNET_FAMILY: dict[str, tuple[tuple[int, int, int, int], tuple[int, int, int, int]]] = {
    "xxxs": ((4, 8, 8, 16), (1, 1, 1, 1)),
    "xxs": ((8, 8, 16, 16), (1, 1, 1, 1)),
    "xs": ((8, 16, 16, 32), (1, 1, 1, 1)),
    "s": ((8, 16, 32, 64), (1, 1, 1, 1)),
    "m": ((16, 32, 64, 128), (1, 1, 1, 1)),
    "l": ((32, 64, 128, 256), (1, 1, 1, 1)),
    "resnet10": ((64, 128, 256, 512), (1, 1, 1, 1)),
    "resnet18": ((64, 128, 256, 512), (2, 2, 2, 2)),
    "resnet34": ((64, 128, 256, 512), (3, 4, 6, 3)),
}


def _unknown(kind: str, name: str, valid: Sequence[str], listing: str | None = None) -> ConfigError:
    """A ConfigError for an unknown name that suggests the closest valid ones.

    ``listing`` replaces the full list of valid names when that list is too long to print.
    """
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"Unknown {kind} {name!r}.{hint} Valid names: {listing or ', '.join(valid)}.")


class ResNet(ModelFactory):
    """A member of the CIFAR-style ResNet10 family (see :data:`RESNET_FAMILY`).

    Args:
        size: ``xxxs``, ``xxs``, ``xs``, ``s``, ``m``, ``l`` (ResNet10 layouts of growing
            width), or ``resnet10``, ``resnet18``, ``resnet34``.
    """

    def __init__(self, size: str = "s") -> None:
        if size not in RESNET_FAMILY:
            raise _unknown("ResNet size", size, list(RESNET_FAMILY))
        self.size = size

    def build(self, info: TaskInfo) -> ResNetCifar:
        widths, blocks = RESNET_FAMILY[self.size]
        return ResNetCifar(widths, blocks, num_classes=info.num_classes, in_channels=info.in_channels)

    def describe(self) -> str:
        return f"ResNet({self.size})"


def _classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """Parent, attribute name and module of the first registered Conv2d (the input stem)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise LookupError("no Conv2d")


def _conv_like(conv: nn.Conv2d, in_channels: int, **overrides: Any) -> nn.Conv2d:
    """A fresh conv with the geometry of ``conv`` but ``in_channels`` inputs (He-initialised)."""
    args: dict[str, Any] = dict(
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    args.update(overrides)
    new = nn.Conv2d(in_channels, **args)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


class TorchvisionModel(ModelFactory):
    """Any torchvision classification model, built for the data's classes and channels.

    There is no internet access at run time, so ``weights`` is a local file holding a state
    dict (plain, or under a ``state_dict``/``model`` key), loaded after the model is adapted.
    Tensors whose shape differs from the adapted model (a classifier for another class count,
    a replaced stem) keep their fresh initialisation and a warning names them; a key the model
    does not have, or one it lacks, is an error, because it means a different architecture.

    Args:
        name: a ``torchvision.models.get_model`` name, e.g. ``resnet18``, ``mobilenet_v3_small``.
        weights: path to a local state-dict file, or ``None`` for random initialisation.
        kwargs: extra keyword arguments for the model's constructor (not ``num_classes``/``weights``).
        cifar_stem: for ResNet-style models on small images (up to 64x64): replace the 7x7
            stride-2 ``conv1`` by a 3x3 stride-1 conv and drop the max-pool, so that a 32x32
            image is not reduced to 1x1 before the last stage.
    """

    def __init__(
        self,
        name: str,
        weights: str | None = None,
        kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
    ) -> None:
        valid = _classification_models()
        if name not in valid:
            if name in torchvision.models.list_models():
                raise ConfigError(
                    f"torchvision model {name!r} is not an image classifier (detection, segmentation, "
                    f"video or optical flow); TorchvisionModel builds classifiers only."
                )
            listing = "see torchvision.models.list_models(module=torchvision.models)"
            raise _unknown("torchvision classification model", name, valid, listing)
        kwargs = dict(kwargs or {})
        reserved = sorted({"num_classes", "weights"} & set(kwargs))
        if reserved:
            raise ConfigError(
                f"TorchvisionModel({name}).kwargs must not set {reserved}: the class count comes from "
                f"the data and weights from the 'weights' argument."
            )
        if weights is not None and not Path(weights).is_file():
            raise ConfigError(
                f"TorchvisionModel({name}).weights: no file at {weights!r}. Only local state-dict "
                f"files can be loaded (there is no download); use null for random initialisation."
            )
        self.name = name
        self.weights = weights
        self.kwargs = kwargs
        self.cifar_stem = cifar_stem

    def build(self, info: TaskInfo) -> nn.Module:
        model = torchvision.models.get_model(self.name, weights=None, num_classes=info.num_classes, **self.kwargs)
        if self.cifar_stem:
            self._apply_cifar_stem(model, info)
        elif info.in_channels != 3:
            self._adapt_input_channels(model, info.in_channels)
        if self.weights is not None:
            self._load_weights(model)
        return model

    def _apply_cifar_stem(self, model: nn.Module, info: TaskInfo) -> None:
        conv1 = getattr(model, "conv1", None)
        if not isinstance(conv1, nn.Conv2d) or not isinstance(getattr(model, "maxpool", None), nn.Module):
            raise ConfigError(
                f"TorchvisionModel({self.name}).cifar_stem needs a ResNet-style model (a Conv2d 'conv1' "
                f"and a 'maxpool'), e.g. resnet18, resnext50_32x4d or wide_resnet50_2."
            )
        if min(info.image_size) > 64:
            warnings.warn(
                f"TorchvisionModel({self.name}).cifar_stem is meant for images up to 64x64; on "
                f"{info.image_size[0]}x{info.image_size[1]} images it multiplies the cost by about 16.",
                stacklevel=3,
            )
        model.conv1 = _conv_like(conv1, info.in_channels, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()

    def _adapt_input_channels(self, model: nn.Module, in_channels: int) -> None:
        try:
            parent, attr, conv = _first_conv(model)
        except LookupError:
            conv = None
        if conv is None or conv.in_channels != 3 or conv.groups != 1:
            raise ConfigError(
                f"TorchvisionModel({self.name}): cannot adapt the model to {in_channels} input channels "
                f"(its first layer is not a plain 3-channel Conv2d). Convert the images to RGB or "
                f"pick a CNN such as resnet18."
            )
        setattr(parent, attr, _conv_like(conv, in_channels))

    def _load_weights(self, model: nn.Module) -> None:
        assert self.weights is not None
        where = f"TorchvisionModel({self.name}).weights ({self.weights})"
        try:
            state = torch.load(self.weights, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            raise ConfigError(f"{where}: cannot read a state dict: {e}") from e
        for key in ("state_dict", "model"):
            if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
                state = state[key]
        if not isinstance(state, Mapping):
            raise ConfigError(f"{where}: expected a state dict, found {type(state).__name__}.")
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ConfigError(
                f"{where} does not match the architecture: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}."
            )
        skipped = [k for k, v in state.items() if getattr(v, "shape", None) != own[k].shape]
        if skipped:
            warnings.warn(f"{where}: shapes differ, keeping fresh initialisation for {skipped}", stacklevel=3)
        model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)

    def describe(self) -> str:
        return f"TorchvisionModel({self.name}{', cifar_stem' if self.cifar_stem else ''})"
