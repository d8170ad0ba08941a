"""CNN and ResNet: shapes on digits/MNIST/CIFAR, a functional-PyTorch reference, hand counts, errors."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tests.helpers import n_parameters
from zerotune.config import load_config
from zerotune.errors import ZerotuneError
from zerotune.models import build_model
from zerotune.models.cnn import BasicBlock, CNNConfig, ResNetConfig, build, build_resnet
from zerotune.spec import DataInfo

TEN = [str(i) for i in range(10)]
SHAPES = {"digits": [1, 8, 8], "mnist": [1, 28, 28], "cifar": [3, 32, 32]}


def _image(shape: list[int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _randomise_norm_stats(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("data", sorted(SHAPES))
@pytest.mark.parametrize(
    "model",
    [
        {"arch": "cnn", "channels": [4, 8]},
        {"arch": "cnn", "channels": [4, 4, 8], "readout": "global_avg", "norm": "batch", "pool": "avg"},
        {"arch": "cnn", "channels": [4], "readout": "global_max", "kernel": 5, "hidden": [6]},
        {"arch": "resnet", "widths": [4, 8, 8], "blocks": [1, 1, 1]},
    ],
)
def test_output_shape_on_digits_mnist_cifar(data, model):
    info = DataInfo("image", SHAPES[data], classes=TEN)
    net = build_model(load_config({"model": model}).model, info)
    assert net(_image(SHAPES[data])).shape == (2, 10)


def test_cnn_matches_functional_reference():
    """Two stages of two 3×3 convs + BatchNorm + ReLU + max-pool, flatten, hidden 6, linear head."""
    info = DataInfo("image", [2, 8, 8], classes=["a", "b", "c"])
    cfg = CNNConfig(channels=[3, 4], convs_per_stage=2, norm="batch", hidden=[6])
    torch.manual_seed(0)
    model = build(cfg, info)
    _randomise_norm_stats(model)
    model.eval()
    x = _image([2, 8, 8], batch=3)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(c.bias is None for c in convs)  # BatchNorm's shift makes a conv bias redundant
    h = x
    for stage in range(2):
        for k in range(2):
            c, n = convs[2 * stage + k], norms[2 * stage + k]
            h = F.conv2d(h, c.weight, padding=1)
            h = F.batch_norm(h, n.running_mean, n.running_var, n.weight, n.bias, eps=n.eps)
            h = F.relu(h)
        h = F.max_pool2d(h, 2)
    assert h.shape == (3, 4, 2, 2)
    h = F.relu(F.linear(h.flatten(1), lins[0].weight, lins[0].bias))
    expected = F.linear(h, lins[1].weight, lins[1].bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_cnn_global_avg_readout_matches_mean():
    info = DataInfo("image", [1, 8, 8], classes=TEN)
    model = build(CNNConfig(channels=[4], readout="global_avg"), info).eval()
    x = _image([1, 8, 8])
    feats = model.features(x)  # (B, 4, 4, 4)
    expected = model.head(feats.mean((2, 3)))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_cnn_hand_parameter_count():
    """channels [32, 64], 3×3, no norm, flatten, linear head on 1×28×28:
    (1·9·32 + 32) + (32·9·64 + 64) + (64·7·7·10 + 10) = 320 + 18,496 + 31,370 = 50,186."""
    info = DataInfo("image", [1, 28, 28], classes=TEN)
    assert n_parameters(build(CNNConfig(channels=[32, 64]), info)) == 50_186


def test_resnet_hand_parameter_count():
    """widths [4, 8], blocks [1, 1] on 3 channels, 10 classes (BN has 2 params per channel):
    stem 3·4·9 + 8 = 116; block 4→4: 2·(4·4·9 + 8) = 304;
    block 4→8 stride 2: (4·8·9 + 16) + (8·8·9 + 16) + shortcut (4·8 + 16) = 944; head 8·10 + 10 = 90."""
    info = DataInfo("image", [3, 32, 32], classes=TEN)
    model = build_resnet(ResNetConfig(widths=[4, 8], blocks=[1, 1]), info)
    assert n_parameters(model) == 116 + 304 + 944 + 90 == 1_454


def _record(shapes: dict, name: str, module, args, out) -> None:
    shapes[name] = tuple(out.shape)


def test_resnet_shortcut_shapes():
    """The first block of each later stage halves H×W and changes width through a 1×1 projection;
    every other block keeps an identity shortcut."""
    info = DataInfo("image", [3, 32, 32], classes=TEN)
    model = build_resnet(ResNetConfig(widths=[16, 32, 64], blocks=[2, 2, 2]), info).eval()
    shapes: dict[str, tuple] = {}
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, BasicBlock)}
    hooks = [m.shortcut.register_forward_hook(partial(_record, shapes, name)) for name, m in blocks.items()]
    with torch.no_grad():
        model(_image([3, 32, 32]))
    for h in hooks:
        h.remove()
    assert shapes == {
        "stages.0.0": (2, 16, 32, 32),
        "stages.0.1": (2, 16, 32, 32),
        "stages.1.0": (2, 32, 16, 16),
        "stages.1.1": (2, 32, 16, 16),
        "stages.2.0": (2, 64, 8, 8),
        "stages.2.1": (2, 64, 8, 8),
    }
    kinds = {name: type(m.shortcut).__name__ for name, m in blocks.items()}
    assert [k for k, v in kinds.items() if v == "Sequential"] == ["stages.1.0", "stages.2.0"]
    proj = model.stages[1][0].shortcut[0]
    assert (proj.kernel_size, proj.stride) == ((1, 1), (2, 2))


def test_resnet_projection_when_only_stride_changes():
    block = BasicBlock(8, 8, stride=2)
    assert isinstance(block.shortcut, nn.Sequential)
    assert isinstance(BasicBlock(8, 8, stride=1).shortcut, nn.Identity)


def test_basic_block_matches_functional_reference():
    torch.manual_seed(0)
    block = BasicBlock(3, 5, stride=2)
    _randomise_norm_stats(block)
    block.eval()
    x = _image([3, 7, 7], batch=2)

    def bn(h, n):
        return F.batch_norm(h, n.running_mean, n.running_var, n.weight, n.bias, eps=n.eps)

    out = F.relu(bn(F.conv2d(x, block.conv1.weight, stride=2, padding=1), block.bn1))
    out = bn(F.conv2d(out, block.conv2.weight, padding=1), block.bn2)
    short = bn(F.conv2d(x, block.shortcut[0].weight, stride=2), block.shortcut[1])
    expected = F.relu(out + short)
    assert expected.shape == (2, 5, 4, 4)  # ⌈7/2⌉
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_non_image_data_is_rejected(arch):
    info = DataInfo("tabular", [10], classes=TEN)
    cfg = load_config({"model": {"arch": arch}}).model
    message = rf"model\.arch: {arch} needs image data .* tabular data of shape \[10\]"
    with pytest.raises(ZerotuneError, match=message):
        build_model(cfg, info)


def test_too_many_pooling_stages_is_rejected():
    info = DataInfo("image", [1, 8, 8], classes=TEN)
    build(CNNConfig(channels=[2, 2, 2]), info)  # 8 → 4 → 2 → 1 still fits
    with pytest.raises(ZerotuneError, match=r"model\.channels: 4 stages .* 8×8 input .* stage 4"):
        build(CNNConfig(channels=[2, 2, 2, 2]), info)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"arch": "cnn", "channels": []}, r"model\.channels: channels must be a non-empty list"),
        ({"arch": "cnn", "channels": [8, 0]}, r"model\.channels: channels must be"),
        ({"arch": "cnn", "kernel": 0}, r"model\.kernel: "),
        ({"arch": "cnn", "pool": "sum"}, r"model\.pool: expected one of 'max' or 'avg', got 'sum'"),
        ({"arch": "cnn", "hidden": [0]}, r"model\.hidden: hidden sizes must be ≥ 1"),
        ({"arch": "resnet", "widths": [8, 16], "blocks": [1]}, r"model\.blocks: needs one entry per stage"),
        ({"arch": "resnet", "blocks": [2, 0, 2]}, r"model\.blocks: blocks must be"),
        ({"arch": "resnet", "norm": "batch"}, r"model\.norm: unknown key"),
    ],
)
def test_bad_config_names_the_key(model, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    with pytest.raises(ZerotuneError, match=rf"^{path}: {message}"):
        load_config(path)
