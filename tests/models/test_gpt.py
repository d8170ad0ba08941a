"""GPT family: causal masking, KV cache, GQA, presets, size formulas, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from zerotune.config import load_config
from zerotune.errors import ZerotuneError
from zerotune.models import build_model
from zerotune.models.gpt import (
    GPT,
    GPTConfig,
    flops_per_token,
    kv_cache_bytes_per_token,
    memory_estimate,
    num_params,
    rope_inv_freq,
)
from zerotune.spec import DataInfo

GPT2_STYLE = dict(vocab_size=99, block_size=32, n_layer=2, n_head=4, d_model=32)
LLAMA_STYLE = dict(
    vocab_size=99, block_size=32, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, d_ff=48,
    mlp="swiglu", norm="rmsnorm", pos="rope", bias=False, tie_embeddings=False,
)  # fmt: skip
STYLES = {"gpt2": GPT2_STYLE, "llama": LLAMA_STYLE}


def tiny(style: str, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**STYLES[style], **kw})).eval()


@pytest.mark.parametrize("style", STYLES)
def test_causal_masking(style):
    model = tiny(style)
    idx = torch.randint(0, 99, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % 99
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)  # positions < 7 cannot see token 7
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_matches_full_forward(style):
    model = tiny(style)
    idx = torch.randint(0, 99, (2, 14))
    full = model(idx)  # (B, T, V)
    cache = model.new_cache(2, 14)
    parts = [model(idx[:, :5], cache=cache, pos=0), model(idx[:, 5:9], cache=cache, pos=5)]
    parts += [model(idx[:, t : t + 1], cache=cache, pos=t) for t in range(9, 14)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_matches_unpadded():
    model = tiny("llama")
    seq = torch.randint(0, 99, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)
    out = model(padded, pad=torch.tensor([3]))[:, 3:]
    torch.testing.assert_close(out, model(seq), rtol=1e-5, atol=1e-5)


def test_gqa_shapes_and_reference_attention():
    model = tiny("llama", n_head=8, n_kv_heads=2)
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == ((8 + 2 * 2) * 4, 32)  # q: 8 heads, k, v: 2 heads of size 4
    cache = model.new_cache(3, 10)
    assert cache.k.shape == (2, 3, 2, 10, 4)
    # reference: repeat each k/v head for its group of 4 query heads, plain softmax attention
    x = torch.randn(3, 10, 32)
    q, k, v = attn.qkv(x).split([32, 8, 8], dim=-1)
    q = q.view(3, 10, 8, 4).transpose(1, 2)
    k = k.view(3, 10, 2, 4).transpose(1, 2).repeat_interleave(4, dim=1)
    v = v.view(3, 10, 2, 4).transpose(1, 2).repeat_interleave(4, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 2.0 + torch.full((10, 10), float("-inf")).triu(1)
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 10, 32))
    torch.testing.assert_close(attn(x, None, None, None, 0, 0), ref, rtol=1e-5, atol=1e-5)


def test_rmsnorm_and_gelu_match_formulas():
    model = tiny("llama")
    x = torch.randn(2, 5, 32)
    norm = model.blocks[0].norm1
    ref = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), ref, rtol=1e-6, atol=1e-6)
    mlp = tiny("gpt2").blocks[0].mlp
    h = mlp.fc(x)
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    torch.testing.assert_close(mlp(x), mlp.proj(gelu), rtol=1e-5, atol=1e-5)


def test_rope_rotates_pairs_by_position():
    model = tiny("llama")
    inv = rope_inv_freq(8, 10000.0, None)
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.1, 0.01, 0.001]), rtol=1e-6, atol=0)
    p = 5  # a rotation by p·ω keeps the norm of each (x_i, x_{i+h/2}) pair
    cos, sin = model.rope_cos[p], model.rope_sin[p]
    assert torch.allclose(cos[:4] ** 2 + sin[:4] ** 2, torch.ones(4))
    torch.testing.assert_close(cos[0], torch.cos(torch.tensor(5.0)))


def test_rope_scaling_linear_and_llama3():
    base = rope_inv_freq(16, 500000.0, None)
    torch.testing.assert_close(rope_inv_freq(16, 500000.0, {"rope_type": "linear", "factor": 4.0}), base / 4)
    l3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # fmt: skip
    scaled = rope_inv_freq(16, 500000.0, l3)
    wavelen = 2 * math.pi / base
    assert torch.equal(scaled[wavelen < 16], base[wavelen < 16])  # high frequencies untouched
    torch.testing.assert_close(scaled[wavelen > 64], base[wavelen > 64] / 8)  # low ones divided


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=99, n_layer=8, n_head=4, d_model=256))
    std = lambda t: t.std().item()
    assert std(model.blocks[0].mlp.fc.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.blocks[0].mlp.proj.weight) == pytest.approx(0.02 / 4, rel=0.05)  # 0.02/√(2·8)
    assert model.lm_head.weight is model.tok_emb.weight


def test_backward_and_state_dict_round_trip():
    model = tiny("llama").train()
    idx = torch.randint(0, 99, (2, 8))
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad is not None for p in model.parameters())
    clone = GPT(model.config)
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone.eval()(idx), model.eval()(idx), rtol=0, atol=0)


def test_preset_fills_and_explicit_keys_win():
    cfg = load_config(
        {"task": "causal_lm", "model": {"arch": "gpt", "preset": "llama-tiny", "n_layer": 2}}
    ).model
    assert (cfg.n_layer, cfg.d_model, cfg.n_kv_heads, cfg.norm, cfg.tie_embeddings) == (
        2,
        256,
        4,
        "rmsnorm",
        False,
    )
    assert cfg.ff_size == 768  # Llama rule: 8·256/3 = 682 → next multiple of 256
    again = GPTConfig.model_validate(cfg.model_dump())  # a resolved config rebuilds the same model
    assert again == cfg
    over = load_config({"model": {"arch": "gpt", "preset": "cpu-tiny"}}, ["model.d_model=64"]).model
    assert (over.d_model, over.block_size) == (64, 128)


def test_build_takes_vocab_from_data():
    cfg = GPTConfig(preset="cpu-tiny")
    model = build_model(cfg, DataInfo(kind="tokens", input_shape=[128], vocab_size=500))
    assert model.lm_head.out_features == 500
    assert model.config.vocab_size == 500 and cfg.vocab_size is None


def test_num_params_matches_model_and_gpt2_size():
    cfg = GPTConfig(**LLAMA_STYLE)
    model = GPT(cfg)
    assert num_params(cfg, embeddings=True) == sum(p.numel() for p in model.parameters())
    assert num_params(cfg) == num_params(cfg, embeddings=True) - 99 * 32  # untied: token table out
    assert num_params(GPTConfig(preset="gpt2-124m"), embeddings=True) == 124_439_808  # Hugging Face gpt2
    tiny_lm = GPTConfig(preset="cpu-tiny", vocab_size=8000)
    assert 1_000_000 <= num_params(tiny_lm, embeddings=True) <= 3_000_000


def test_flops_kv_and_memory_formulas():
    cfg = GPTConfig(**GPT2_STYLE)
    n = num_params(cfg)
    assert flops_per_token(cfg, 16) == 6 * n + 12 * 2 * 4 * 8 * 16
    llama = GPTConfig(**LLAMA_STYLE)
    assert kv_cache_bytes_per_token(llama, 2) == 2 * 2 * 2 * 8 * 2  # k and v · layers · kv heads · h · bytes
    mem = memory_estimate(llama, batch=2, seq=16, precision="bf16")
    assert mem["params"] == 4 * num_params(llama, embeddings=True)
    assert mem["kv_cache"] == kv_cache_bytes_per_token(llama, 2) * 32
    assert mem["train_total"] == mem["params"] + mem["grads"] + mem["optimizer"] + mem["activations"]


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ({"preset": "gpt-9"}, "model.preset: unknown preset; choose from gpt2-124m, gpt2-350m"),
        ({"d_model": 30, "n_head": 4}, "d_model (30) must be divisible by n_head (4)"),
        ({"n_head": 4, "n_kv_heads": 3}, "n_head (4) must be divisible by n_kv_heads (3)"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 2}},
            "model.rope_scaling: unsupported rope_type 'yarn'",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 2}},
            "model.rope_scaling: llama3 needs low_freq_factor",
        ),
        ({"mlp": "relu"}, "model.mlp: expected one of 'gelu' or 'swiglu', got 'relu'"),
        ({"init": "zeros"}, "model.init: unknown init scheme"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, model, fragment):
    path = tmp_path / "gpt.yaml"
    path.write_text(yaml.safe_dump({"task": "causal_lm", "model": {"arch": "gpt", **model}}))
    with pytest.raises(ZerotuneError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ") and fragment in str(e.value)


def test_bad_vocab_and_length():
    with pytest.raises(ZerotuneError, match="model.vocab_size: not set and the data has no tokenizer"):
        build_model(GPTConfig(), DataInfo(kind="tokens", input_shape=[128]))
    with pytest.raises(
        ZerotuneError, match=r"model.vocab_size: 50257 is below the tokenizer's vocabulary \(60000\)"
    ):
        build_model(
            GPTConfig(preset="gpt2-124m", n_layer=1),
            DataInfo(kind="tokens", input_shape=[8], vocab_size=60000),
        )
    with pytest.raises(ZerotuneError, match="longer than model.block_size 32"):
        tiny("gpt2")(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ZerotuneError, match="KV cache holds 4 positions"):
        model = tiny("gpt2")
        model(torch.zeros(1, 5, dtype=torch.long), cache=model.new_cache(1, 4))


def test_bf16_weights_run_with_cache():
    model = tiny("llama")
    idx = torch.randint(0, 99, (2, 10))
    ref = model(idx)
    half = tiny("llama").to(torch.bfloat16)
    cache = half.new_cache(2, 10)
    assert cache.k.dtype == torch.bfloat16
    out = torch.cat([half(idx[:, :6], cache=cache), half(idx[:, 6:], cache=cache, pos=6)], dim=1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)  # bf16 keeps ~3 significant digits
