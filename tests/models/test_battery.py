"""The shared battery: every arch in ``ARCHS`` must pass every test here.

A family joins by adding a ``TINY`` entry (config dict, DataInfo, example batch); an arch
without one fails ``test_every_arch_has_a_tiny_entry`` and every parametrised test. Outputs
are (B, n_outputs) unless ``OUTPUT_SHAPES`` says otherwise (a language model's (B, T, vocab)).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.helpers import n_parameters
from zerotune.config import load_config
from zerotune.errors import ZerotuneError
from zerotune.inspect import inspect_model
from zerotune.models import ARCHS, build_model
from zerotune.spec import DataInfo

TEN = [str(i) for i in range(10)]


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (4, 7), generator=g)
    ids[0, 4:] = 0  # right padding
    ids[1, :2] = 0  # left padding
    return ids


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


TINY: dict[str, tuple[dict, DataInfo, torch.Tensor]] = {
    "mlp": (
        {"arch": "mlp", "hidden": [8, 8], "norm": "batch", "dropout": 0.1},
        DataInfo("tabular", [5], target="regression"),
        _randn(4, 5),
    ),
    "cnn": (
        {
            "arch": "cnn",
            "channels": [4, 8],
            "convs_per_stage": 2,
            "norm": "batch",
            "hidden": [8],
            "dropout": 0.1,
        },
        DataInfo("image", [1, 8, 8], classes=TEN),
        _randn(4, 1, 8, 8),
    ),
    "resnet": (
        {"arch": "resnet", "widths": [4, 8], "blocks": [1, 2], "hidden": [6], "dropout": 0.1},
        DataInfo("image", [3, 8, 8], classes=["a", "b", "c"]),
        _randn(4, 3, 8, 8),
    ),
    "rnn": (
        {
            "arch": "rnn",
            "cell": "gru",
            "hidden": 8,
            "layers": 2,
            "bidirectional": True,
            "embed_dim": 6,
            "pooling": "mean",
            "dropout": 0.1,
        },
        DataInfo("tokens", [7], classes=["neg", "pos"], vocab_size=30, pad_id=0),
        _tokens(),
    ),
    "gpt": (
        {"arch": "gpt", "block_size": 16, "n_layer": 2, "n_head": 4, "n_kv_heads": 2, "d_model": 16,
         "mlp": "swiglu", "norm": "rmsnorm", "pos": "rope", "bias": False, "tie_embeddings": False, "dropout": 0.1},
        DataInfo("tokens", [7], target="causal_lm", vocab_size=30),
        _tokens(),
    ),
    "bert": (
        {"arch": "bert", "hidden": 16, "layers": 2, "heads": 4, "intermediate": 32, "max_position": 16,
         "dropout": 0.1},
        DataInfo("tokens", [7], classes=["neg", "pos"], vocab_size=30, pad_id=0),
        _tokens(),
    ),
}

# arch → expected output shape for (example, info), where it is not (B, n_outputs)
OUTPUT_SHAPES: dict[str, Callable[[torch.Tensor, DataInfo], tuple[int, ...]]] = {
    "gpt": lambda x, info: (*x.shape, info.vocab_size),
}

SCHEMES = ["default", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "normal(0.02)"]
ALL = sorted(ARCHS)


def _build(arch: str, seed: int = 0, **changes) -> tuple[nn.Module, torch.Tensor, DataInfo]:
    raw, info, x = TINY[arch]
    cfg = ARCHS[arch][0].model_validate({**raw, **changes})
    torch.manual_seed(seed)
    return build_model(cfg, info), x, info


def test_every_arch_has_a_tiny_entry():
    missing = sorted(set(ARCHS) - set(TINY))
    assert not missing, f"add TINY entries for {missing} to the battery"


@pytest.mark.parametrize("arch", ALL)
def test_forward_shape(arch):
    model, x, info = _build(arch)
    out = model(x)
    expected = OUTPUT_SHAPES[arch](x, info) if arch in OUTPUT_SHAPES else (x.shape[0], info.n_outputs)
    assert out.shape == expected
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ALL)
def test_backward_reaches_every_parameter(arch):
    model, x, _ = _build(arch)
    out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("arch", ALL)
def test_safetensors_round_trip(arch, tmp_path):
    model, x, _ = _build(arch, seed=0)
    with torch.no_grad():
        model.train()
        model(x)  # move BatchNorm running statistics off their defaults
    model.eval()
    path = tmp_path / "model.safetensors"
    # tied weights share storage, which save_file refuses; a clone per name stores each once
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(path))

    fresh, _, _ = _build(arch, seed=1)
    fresh.eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))  # a different seed really is a different model
        fresh.load_state_dict(load_file(str(path)))
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ALL)
def test_config_round_trip(arch):
    raw, _, _ = TINY[arch]
    cls = ARCHS[arch][0]
    cfg = cls.model_validate(raw)
    assert cls.model_validate(cfg.model_dump()) == cfg
    assert cls.model_validate_json(cfg.model_dump_json()) == cfg
    assert load_config({"model": raw}).model == cfg  # the top-level config picks the family by arch


@pytest.mark.parametrize("arch", ALL)
def test_config_has_dropout_and_init_and_rejects_unknown_keys(arch):
    raw, _, _ = TINY[arch]
    fields = ARCHS[arch][0].model_fields
    assert "dropout" in fields and "init" in fields
    with pytest.raises(ZerotuneError, match=r"^config: model\.no_such_key: unknown key$"):
        load_config({"model": {**raw, "no_such_key": 1}})


@pytest.mark.parametrize("arch", ALL)
def test_dropout_zero_turns_dropout_off(arch):
    model, x, _ = _build(arch, dropout=0.0)
    assert not [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    assert all(m.dropout == 0 for m in rnns)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ALL)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_init_scheme_builds(arch, scheme):
    model, x, _ = _build(arch, init=scheme)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    if scheme != "default":
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0


def test_mlp_hand_counts():
    """784→64→64→10: (784·64+64) + (64·64+64) + (64·10+10) = 55,050 parameters and
    2·(784·64 + 64·64 + 64·10) = 109,824 forward FLOPs per example (2·in·out per Linear)."""
    info = DataInfo("image", [1, 28, 28], classes=TEN)
    model = build_model(load_config({"model": {"arch": "mlp", "hidden": [64, 64]}}).model, info)
    assert n_parameters(model) == 55_050
    report = inspect_model(model, torch.zeros(3, 1, 28, 28))
    assert report.total_params == 55_050
    assert report.flops_per_sample == 2 * (784 * 64 + 64 * 64 + 64 * 10) == 109_824
