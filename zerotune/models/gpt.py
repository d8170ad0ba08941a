"""Decoder-only transformer language model: GPT-2 and Llama layouts in one family.

For token ids t₁…t_T (vocabulary V, width d, L layers, H query heads, H_kv key/value heads,
head size h = d/H unless set):

    x₀ = E[t] (+ P[pos] for learned positions)                      E ∈ ℝ^{V×d}, P ∈ ℝ^{block×d}
    for l = 1…L (pre-norm residual blocks):
        q, k, v = Norm₁(x) W_qkv (+ b)                               q: H heads, k, v: H_kv heads
        q, k    = RoPE(q), RoPE(k)                                   (pos: rope only)
        a       = softmax(q kᵀ / √h + causal mask) v                 each k/v head serves H/H_kv q heads (GQA)
        x       = x + a W_o
        x       = x + MLP(Norm₂(x))
    logits = Norm_f(x) W_headᵀ                                      W_head = E when tied

    MLP(x)  = GELU_tanh(x W_fc) W_proj                               mlp: gelu   (d_ff = 4d)
            = (SiLU(x W_gate) ⊙ x W_up) W_down                        mlp: swiglu (d_ff = 8d/3, to 256)
    Norm(x) = γ (x − μ) / √(σ² + ε) + β                               norm: layernorm
            = γ x / √(mean(x²) + ε)                                   norm: rmsnorm (computed in fp32)
    RoPE: position p rotates each pair (xᵢ, xᵢ₊ₕ/₂) by angle p·θ^(−2i/h), i < h/2 ("rotate-half",
          the layout of the Hugging Face Llama weights, so they load without permutation).

GPT-2 layout: learned positions, LayerNorm, GELU (tanh approximation), biases, tied head.
Llama layout: RoPE, RMSNorm, SwiGLU, no biases, GQA, untied head. Qwen2 adds biases on q/k/v.

Attention runs only through ``F.scaled_dot_product_attention`` (flash/memory-efficient
kernels where available). Generation keeps keys and values in a preallocated
:class:`KVCache` so each new token costs one position, not a full re-run.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.models.init import check_scheme, init_weights
from zerotune.spec import DataInfo

PRESETS_FILE = Path(__file__).resolve().parent.parent / "presets" / "gpt.yaml"
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@cache
def presets() -> dict[str, dict[str, Any]]:
    """The named GPT configs in ``zerotune/presets/gpt.yaml``."""
    return yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8"))


class GPTConfig(BaseModel):
    """A decoder LM. ``preset`` fills every key the config leaves out; explicit keys win."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["gpt"] = "gpt"
    preset: str | None = None
    vocab_size: int | None = Field(None, ge=1)  # None: the tokenizer's vocabulary size
    block_size: int = Field(128, ge=1)  # longest sequence (positions) the model handles
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)  # grouped-query attention; None: n_head
    d_model: int = Field(128, ge=1)
    head_dim: int | None = Field(None, ge=1)  # None: d_model // n_head
    d_ff: int | None = Field(None, ge=1)  # None: 4·d (gelu) or the Llama rule (swiglu)
    mlp: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0)
    pos: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: dict[str, Any] | None = None  # Hugging Face layout: {"rope_type": "linear", "factor": 4}
    bias: bool = True  # biases on every linear layer (and LayerNorm β)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    dropout: float = Field(0.0, ge=0, lt=1)
    init: str = "gpt2"  # "gpt2" (N(0, 0.02), scaled residual projections) or a zerotune.models.init scheme

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("preset"), str)
            or data["preset"] not in presets()
        ):
            return data  # an unknown name is reported by _check_preset, on the preset key itself
        return {**presets()[data["preset"]], **data}

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in presets():
            raise ValueError(f"unknown preset; choose from {', '.join(presets())}")
        return v

    @field_validator("init")
    @classmethod
    def _check_init(cls, v: str) -> str:
        return v if v == "gpt2" else check_scheme(v)

    @field_validator("rope_scaling")
    @classmethod
    def _check_rope_scaling(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        v = dict(v)
        kind = v.pop("type", None) or v.get("rope_type")
        if kind in (None, "default"):
            return None
        if kind not in ROPE_SCALING_KEYS:
            raise ValueError(f"unsupported rope_type {kind!r}; choose from linear, llama3")
        missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in v]
        if missing:
            raise ValueError(f"{kind} needs {', '.join(missing)}")
        for k in ROPE_SCALING_KEYS[kind]:
            value = v[k]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{k} must be a finite number > 0, got {value!r}")
        if kind == "llama3" and not v["high_freq_factor"] > v["low_freq_factor"]:
            raise ValueError("high_freq_factor must be larger than low_freq_factor")
        v["rope_type"] = kind
        return v

    @model_validator(mode="after")
    def _check_shapes(self) -> GPTConfig:
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.pos == "rope" and self.head_size % 2:
            raise ValueError(f"rope needs an even head size, got {self.head_size}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ff_size(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        # Llama: two thirds of 4d (so SwiGLU's three matrices cost what GELU's two do), rounded up to 256
        return 256 * math.ceil(int(8 * self.d_model / 3) / 256)


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """γ·x/√(mean(x²)+ε), computed in fp32 (as Llama does) and cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps, bias=bias)


def rope_inv_freq(head_size: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Per-pair angular frequencies θ^(−2i/h), i < h/2, with optional linear or Llama-3 scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # Llama 3.1: keep high frequencies, divide low ones by factor, interpolate in between
    old_len = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # rotate in the compute dtype (bf16 under autocast)
    return x * cos + rotate_half(x) * sin  # (B, H, T, h)


class KVCache:
    """Keys and values of every layer, preallocated for ``batch`` sequences of ``max_len`` tokens."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch, n_kv_heads, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (B, H_kv, T, h) at positions pos…pos+T−1; return all keys/values so far."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ZerotuneError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, H_kv, pos+T, h)

    def view(self, rows: slice, start: int = 0) -> KVCache:
        """The same storage as a cache of the sequences ``rows`` whose position 0 is column ``start``:
        what is written to the view is written here (a server keeps many sequences in one cache)."""
        seen = KVCache.__new__(KVCache)
        seen.k, seen.v = self.k[:, rows, :, start:], self.v[:, rows, :, start:]
        seen.max_len = self.max_len - start
        return seen


class Attention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_heads: int,
        head_size: int,
        bias: bool,
        qkv_bias: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_size = n_head, n_kv_heads, head_size
        # one fused projection for q, k and v: rows [q (H·h) | k (H_kv·h) | v (H_kv·h)]
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_heads) * head_size, bias=bias or qkv_bias)
        self.proj = nn.Linear(n_head * head_size, d_model, bias=bias)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        pos: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, h = self.n_head, self.n_kv_heads, self.head_size
        q, k, v = self.qkv(x).split([H * h, Hkv * h, Hkv * h], dim=-1)
        q = q.view(B, T, H, h).transpose(1, 2)  # (B, H, T, h)
        k = k.view(B, T, Hkv, h).transpose(1, 2)  # (B, H_kv, T, h)
        v = v.view(B, T, Hkv, h).transpose(1, 2)  # (B, H_kv, T, h)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v, pos)  # (B, H_kv, pos+T, h)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            # without a mask: a full causal block (no cache, or a prefill from position 0), or one new token
            # (cache first: an exported graph has no T to test)
            is_causal=mask is None and (cache is None or T > 1),
            enable_gqa=Hkv != H,
        )  # (B, H, T, h)
        y = y.transpose(1, 2).reshape(B, T, H * h)  # (B, T, H·h)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, kind: str, bias: bool, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        if kind == "gelu":
            self.fc = nn.Linear(d_model, d_ff, bias=bias)
            self.proj = nn.Linear(d_ff, d_model, bias=bias)
        else:
            self.gate = nn.Linear(d_model, d_ff, bias=bias)
            self.up = nn.Linear(d_model, d_ff, bias=bias)
            self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            y = self.proj(F.gelu(self.fc(x), approximate="tanh"))  # (B, T, d)
        else:
            y = self.down(F.silu(self.gate(x)) * self.up(x))  # (B, T, d)
        return self.drop(y)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = Attention(
            cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.bias, cfg.qkv_bias, cfg.dropout
        )
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg.d_model, cfg.ff_size, cfg.mlp, cfg.bias, cfg.dropout)

    def forward(self, x, rope, mask, cache, layer, pos) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, mask, cache, layer, pos)
        return x + self.mlp(self.norm2(x))  # (B, T, d)


# ---------------------------------------------------------------- the model


class GPT(nn.Module):
    """Decoder LM built from a :class:`GPTConfig` whose ``vocab_size`` is set."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ZerotuneError("model.vocab_size: not set and no tokenizer to take it from")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos == "rope":
            # cos/sin for every position, fp32 (not saved: they follow from the config)
            inv_freq = rope_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
            freqs = (
                torch.arange(cfg.block_size, dtype=torch.float32)[:, None] * inv_freq[None, :]
            )  # (block, h/2)
            angles = torch.cat((freqs, freqs), dim=-1)  # (block, h)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg = self.config
        if cfg.init != "gpt2":
            init_weights(self, cfg.init)
            return
        # GPT-2 (Radford et al., 2019, §2.3): weights N(0, 0.02); the projections that write into
        # the residual stream are scaled by 1/√N for N = 2·n_layer residual layers.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, 0.0, resid_std)
            nn.init.normal_(
                block.mlp.proj.weight if cfg.mlp == "gelu" else block.mlp.down.weight, 0.0, resid_std
            )

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A zeroed KV cache for ``batch`` sequences of up to ``max_len`` (default block_size) tokens.

        ``dtype`` defaults to the weights' dtype; pass ``torch.bfloat16`` under bf16 autocast.
        """
        cfg = self.config
        p = self.tok_emb.weight
        max_len = max_len or cfg.block_size
        return KVCache(
            cfg.n_layer, batch, max_len, cfg.kv_heads, cfg.head_size, device=p.device, dtype=dtype or p.dtype
        )

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, pos: int = 0, pad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids ``idx`` (B, T).

        Args:
            idx: token ids at positions pos…pos+T−1.
            cache: keys/values of earlier positions; this call appends its own.
            pos: position of ``idx[:, 0]`` (the number of tokens already in ``cache``).
            pad: (B,) count of left-padding tokens per row; those columns are never attended
                to, and each row's positions start at 0 on its first real token.
        """
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ZerotuneError(
                f"sequence of {pos + T} tokens is longer than model.block_size {self.config.block_size}"
            )
        col = torch.arange(pos, pos + T, device=idx.device)  # (T,)
        positions = col[None, :] if pad is None else (col[None, :] - pad[:, None]).clamp(min=0)  # (1|B, T)
        x = self.tok_emb(idx)  # (B, T, d)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        rope = None
        if self.config.pos == "rope":
            cos = self.rope_cos[positions][:, None]  # (1|B, 1, T, h)
            sin = self.rope_sin[positions][:, None]
            rope = (cos, sin)
        mask = None
        if pad is not None or (cache is not None and pos > 0 and T > 1):
            keys = torch.arange(pos + T, device=idx.device)  # (S,)
            mask = keys[None, :] <= col[:, None]  # (T, S) causal
            if pad is not None:
                # padded keys are hidden; a padded query still sees itself so its softmax is defined
                mask = mask & ((keys[None, :] >= pad[:, None])[:, None, :] | (keys[None, :] == col[:, None]))
            mask = mask.view(-1, 1, T, pos + T)  # (1|B, 1, T, S)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, layer, pos)
        return self.lm_head(self.norm_f(x))  # (B, T, V)


def build(cfg: GPTConfig, info: DataInfo) -> GPT:
    """The model for ``cfg``; ``vocab_size`` comes from the data's tokenizer when the config leaves it out."""
    if cfg.vocab_size is None:
        if info.vocab_size is None:
            raise ZerotuneError("model.vocab_size: not set and the data has no tokenizer vocabulary")
        cfg = cfg.model_copy(update={"vocab_size": info.vocab_size})
    elif info.vocab_size is not None and info.vocab_size > cfg.vocab_size:
        raise ZerotuneError(
            f"model.vocab_size: {cfg.vocab_size} is below the tokenizer's vocabulary ({info.vocab_size})"
        )
    return GPT(cfg)


# ---------------------------------------------------------------- size, compute and memory


def num_params(cfg: GPTConfig, embeddings: bool = False) -> int:
    """Parameter count of the model ``cfg`` builds (counted on the meta device, nothing allocated).

    With ``embeddings=False`` the token and position lookup tables are left out, but the
    output head is kept (it is a real matmul per token; when tied it is the same matrix as
    the token embedding, counted once) — the N of nanoGPT's MFU estimate.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are yielded once
    if embeddings:
        return total
    if model.pos_emb is not None:
        total -= model.pos_emb.weight.numel()
    if not cfg.tie_embeddings:
        total -= model.tok_emb.weight.numel()
    return total


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token: 6·N + 12·L·H·h·T (forward + backward).

    N is ``num_params(cfg, embeddings=False)``: each parameter costs a multiply-add (2 FLOPs)
    forward and twice that backward. The attention scores and the weighted sum add
    2·2·L·H·h·T forward for a context of T, again ×3 with backward. Source: PaLM (Chowdhery
    et al., 2022, appendix B) and nanoGPT's ``estimate_mfu``.
    """
    T = seq_len or cfg.block_size
    return 6 * num_params(cfg) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T


def kv_cache_bytes_per_token(cfg: GPTConfig, bytes_per_el: int = 2) -> int:
    """Bytes the KV cache holds per token per sequence: keys and values of every layer."""
    return 2 * cfg.n_layer * cfg.kv_heads * cfg.head_size * bytes_per_el


def memory_estimate(cfg: GPTConfig, batch: int, seq: int, precision: str = "fp32") -> dict[str, int]:
    """Rough training and inference memory in bytes for ``batch`` sequences of ``seq`` tokens.

    Training with AdamW keeps fp32 weights, fp32 gradients and two fp32 moments (16 bytes per
    parameter in all). Activations follow Korthikanti et al. (2022, "Reducing Activation
    Recomputation"): 34·T·B·d bytes per layer at 2 bytes per value with fused (flash) attention,
    ×2 in fp32, plus the fp32 logits (B·T·V) the loss needs. Inference holds the weights in the
    compute precision and the KV cache.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16`` (``bf16``/``fp16`` = autocast activations and cache).
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise ZerotuneError(f"precision: expected fp32, bf16 or fp16, got {precision!r}")
    el = 4 if precision == "fp32" else 2
    n = num_params(cfg, embeddings=True)
    params, grads, optim = 4 * n, 4 * n, 8 * n
    activations = cfg.n_layer * 34 * seq * batch * cfg.d_model * el // 2 + 4 * batch * seq * cfg.vocab_size
    kv = kv_cache_bytes_per_token(cfg, el) * batch * seq
    return {
        "params": params,
        "grads": grads,
        "optimizer": optim,
        "activations": activations,
        "train_total": params + grads + optim + activations,
        "kv_cache": kv,
        "inference_total": n * el + kv,
    }
