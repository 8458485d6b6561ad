"""Classification models and the parameter/MAC counters that report their size."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from collab_distill.profiling import count_macs, count_parameters, format_count
from collab_distill.task import ConfigError, ModelFactory, TaskInfo
from collab_distill.tasks.classification.models import (
    RESNET_FAMILY,
    ResNet,
    ResNetCifar,
    TorchvisionModel,
)

ORDER = ["xxxs", "xxs", "xs", "s", "m", "l", "resnet10", "resnet18", "resnet34"]


def expected_params_and_macs(size: str, num_classes: int, in_channels: int, hw: int) -> tuple[int, int]:
    """Parameters and MACs of a family member worked out by hand from the architecture."""
    widths, blocks = RESNET_FAMILY[size]
    params = in_channels * widths[0] * 9 + 2 * widths[0]  # stem conv + BN
    macs = hw * hw * in_channels * widths[0] * 9
    c_in = widths[0]
    for width, count, stride in zip(widths, blocks, (1, 2, 2, 2)):
        for i in range(count):
            s = stride if i == 0 else 1
            hw //= s
            params += 9 * c_in * width + 2 * width + 9 * width * width + 2 * width
            macs += hw * hw * (9 * c_in * width + 9 * width * width)
            if s != 1 or c_in != width:  # 1x1 projection shortcut + BN
                params += c_in * width + 2 * width
                macs += hw * hw * c_in * width
            c_in = width
    params += widths[-1] * num_classes + num_classes
    macs += widths[-1] * num_classes
    return params, macs


def test_family_table() -> None:
    assert list(RESNET_FAMILY) == ORDER
    assert RESNET_FAMILY["s"] == ((8, 16, 32, 64), (1, 1, 1, 1))
    assert RESNET_FAMILY["resnet34"] == ((64, 128, 256, 512), (3, 4, 6, 3))


@pytest.mark.parametrize("size", ORDER)
def test_family_builds_and_forwards(size: str) -> None:
    torch.manual_seed(0)
    for num_classes in (10, 100):
        for in_channels in (1, 3):
            info = TaskInfo(num_classes=num_classes, in_channels=in_channels)
            model = ResNet(size).build(info)
            assert isinstance(model, ResNetCifar)
            params, _ = expected_params_and_macs(size, num_classes, in_channels, 32)
            assert count_parameters(model) == params
            model.eval()
            # 64x64 through the full-width nets costs seconds each on CPU; 8 and 32 cover their code
            for hw in (8, 32) if size.startswith("resnet") else (8, 32, 64):
                x = torch.randn(2, in_channels, hw, hw)
                with torch.no_grad():
                    logits = model(x)
                    feats = model.features(x)
                assert logits.shape == (2, num_classes)
                assert feats.shape == (2, RESNET_FAMILY[size][0][-1]) == (2, model.num_features)
                assert torch.isfinite(logits).all()
                torch.testing.assert_close(model.fc(feats), logits)


def test_train_mode_forward_on_digits_size_and_backward() -> None:
    model = ResNet("xxxs").build(TaskInfo(num_classes=10, in_channels=1, image_size=(8, 8)))
    logits = model(torch.randn(4, 1, 8, 8))
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_init() -> None:
    model = ResNet("s").build(TaskInfo(num_classes=10))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in bns)
    assert all(torch.equal(bn.bias, torch.zeros_like(bn.bias)) for bn in bns)
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * 3 * 3)) for layer4's 3x3 conv
    conv = model.layer4[0].conv2
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)


def test_parameter_counts_strictly_increase() -> None:
    info = TaskInfo(num_classes=100)
    counts = [count_parameters(ResNet(size).build(info)) for size in ORDER]
    assert all(a < b for a, b in zip(counts, counts[1:])), counts
    # the usual CIFAR-100 ResNet18 figure
    assert counts[ORDER.index("resnet18")] == 11_220_132


@pytest.mark.parametrize("size", ["xxxs", "s", "resnet10"])
@pytest.mark.parametrize("hw", [8, 32])
def test_family_macs_match_hand_count(size: str, hw: int) -> None:
    model = ResNet(size).build(TaskInfo(num_classes=100, in_channels=3))
    assert count_macs(model, torch.randn(1, 3, hw, hw)) == expected_params_and_macs(size, 100, 3, hw)[1]


def test_count_macs_exact_on_tiny_layers() -> None:
    assert count_macs(nn.Linear(10, 5), torch.randn(1, 10)) == 50
    # 3x3 conv, 3 -> 8 channels, same padding on 8x8: 8*8 positions * 8 out * 3 in * 9 taps
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 8, 8)) == 13_824
    # stride 2 halves each side: 4*4 * 4 * 2 * 9
    assert count_macs(nn.Conv2d(2, 4, 3, stride=2, padding=1), torch.randn(1, 2, 8, 8)) == 1_152
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    assert count_macs(seq, torch.randn(1, 1, 4, 4)) == 4 * 4 * 2 * 9 + 32 * 3


def test_count_parameters() -> None:
    linear = nn.Linear(10, 5)
    assert count_parameters(linear) == 55
    assert count_parameters(nn.Sequential(linear, nn.ReLU(), linear)) == 55  # shared once
    frozen = nn.Linear(3, 2)
    frozen.requires_grad_(False)
    assert count_parameters(nn.Sequential(linear, frozen)) == 55 + 8


def test_count_macs_leaves_bn_stats_and_modes_alone() -> None:
    model = ResNet("xxxs").build(TaskInfo(num_classes=10))
    model.train()
    model(torch.randn(4, 3, 32, 32))  # non-trivial running stats
    model.layer2.eval()  # a deliberately frozen part must stay frozen, the rest in train mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}

    count_macs(model, torch.randn(1, 3, 32, 32))

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.training and not model.layer2.training and model.layer3.training

    model.eval()
    count_macs(model, torch.randn(1, 3, 32, 32))
    assert not any(m.training for m in model.modules())


def test_count_macs_restores_modes_on_error() -> None:
    model = ResNet("xxxs").build(TaskInfo(num_classes=10)).train()
    with pytest.raises(RuntimeError):
        count_macs(model, torch.randn(1, 5, 32, 32))  # wrong channel count
    assert all(m.training for m in model.modules())


def test_format_count() -> None:
    assert format_count(12) == "12"
    assert format_count(999) == "999"
    assert format_count(1_000) == "1.0K"
    assert format_count(456_700) == "456.7K"
    assert format_count(999_960) == "1.00M"
    assert format_count(1_234_567) == "1.23M"
    assert format_count(1_159_448_576) == "1.16G"


def test_resnet_factory_describe_and_errors() -> None:
    assert ResNet("xs").describe() == "ResNet(xs)"
    assert ResNet().size == "s"
    with pytest.raises(ConfigError, match=r"'resnet18'.*Valid names: xxxs, xxs, xs, s, m, l, resnet10"):
        ResNet("resnet19")
    with pytest.raises(ConfigError, match="Did you mean 'xxxs'"):
        ResNet("xxxxs")


def test_resnet_cifar_rejects_bad_layout() -> None:
    with pytest.raises(ValueError, match="4 stage widths"):
        ResNetCifar([8, 16, 32], [1, 1, 1], num_classes=10)


def test_torchvision_resnet18_cifar_stem_on_grey_8x8() -> None:
    factory = TorchvisionModel("resnet18", cifar_stem=True)
    assert factory.describe() == "TorchvisionModel(resnet18, cifar_stem)"
    model = factory.build(TaskInfo(num_classes=10, in_channels=1, image_size=(8, 8)))
    assert model.conv1.in_channels == 1
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # a 3x3 stride-1 stem on 32x32 keeps 4x4 maps before the pool: 0.56 GMACs like ResNetCifar
    rgb = factory.build(TaskInfo(num_classes=100))
    assert count_macs(rgb, torch.randn(1, 3, 32, 32)) == expected_params_and_macs("resnet18", 100, 3, 32)[1]


def test_torchvision_adapts_first_conv_to_channels() -> None:
    resnet = TorchvisionModel("resnet18").build(TaskInfo(num_classes=5, in_channels=1))
    assert resnet.conv1.in_channels == 1 and resnet.conv1.kernel_size == (7, 7)
    assert resnet(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    mobile = TorchvisionModel("mobilenet_v3_small").build(TaskInfo(num_classes=7, in_channels=1))
    assert mobile.features[0][0].in_channels == 1
    assert mobile.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 7)


def test_torchvision_errors() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'"):
        TorchvisionModel("resnet19")
    with pytest.raises(ConfigError, match="not an image classifier"):
        TorchvisionModel("fasterrcnn_resnet50_fpn")
    with pytest.raises(ConfigError, match="num_classes"):
        TorchvisionModel("resnet18", kwargs={"num_classes": 3})
    with pytest.raises(ConfigError, match="no file at"):
        TorchvisionModel("resnet18", weights="/nonexistent/resnet18.pth")
    with pytest.raises(ConfigError, match="ResNet-style"):
        TorchvisionModel("mobilenet_v3_small", cifar_stem=True).build(TaskInfo(num_classes=10))


def test_torchvision_local_weights(tmp_path) -> None:
    info = TaskInfo(num_classes=10, in_channels=1, image_size=(8, 8))
    source = TorchvisionModel("resnet18", cifar_stem=True).build(info)
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": source.state_dict()}, path)

    loaded = TorchvisionModel("resnet18", weights=str(path), cifar_stem=True).build(info)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    # another class count: everything but the classifier is loaded, with a warning
    with pytest.warns(UserWarning, match=r"fc\.weight"):
        other = TorchvisionModel("resnet18", weights=str(path), cifar_stem=True).build(
            TaskInfo(num_classes=3, in_channels=1)
        )
    assert torch.equal(other.conv1.weight, source.conv1.weight)
    assert other.fc.out_features == 3

    with pytest.raises(ConfigError, match="does not match the architecture"):
        TorchvisionModel("resnet34", weights=str(path), cifar_stem=True).build(info)


def test_factories_from_yaml_style_config() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--model", type=ModelFactory)
    prefix = "collab_distill.tasks.classification.models"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jsonargparse deprecation notices are not ours
        cfg = parser.parse_object({"model": {"class_path": f"{prefix}.ResNet", "init_args": {"size": "xs"}}})
        assert parser.instantiate(cfg).model.describe() == "ResNet(xs)"
        cfg = parser.parse_object(
            {
                "model": {
                    "class_path": f"{prefix}.TorchvisionModel",
                    "init_args": {"name": "resnet18", "kwargs": {"zero_init_residual": True}, "cifar_stem": True},
                }
            }
        )
        factory = parser.instantiate(cfg).model
    assert isinstance(factory, TorchvisionModel)
    assert factory.kwargs == {"zero_init_residual": True} and factory.cifar_stem
