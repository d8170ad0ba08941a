"""Hugging Face decoder checkpoints in and out: GPT-2, Llama, Mistral, Qwen2.

A Hugging Face model folder holds ``config.json`` and the weights as ``model.safetensors``,
a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin`` (:mod:`zerotune.interop.hf_files`
reads them; ``.bin`` only with ``torch.load(weights_only=True)``, which refuses pickled code). The config maps
onto :class:`~zerotune.models.gpt.GPTConfig`; the tensors are renamed per family:

    GPT-2                                   zerotune
    wte / wpe                               tok_emb / pos_emb
    h.i.ln_1, h.i.ln_2, ln_f                blocks.i.norm1, blocks.i.norm2, norm_f
    h.i.attn.c_attn  (d, 3d) Conv1D         blocks.i.attn.qkv  (3d, d)   transposed
    h.i.attn.c_proj, h.i.mlp.c_fc/c_proj    blocks.i.attn.proj, blocks.i.mlp.fc/proj   transposed

    Llama / Mistral / Qwen2 (under model.)  zerotune
    embed_tokens, norm, lm_head             tok_emb, norm_f, lm_head
    layers.i.input_layernorm                blocks.i.norm1
    layers.i.post_attention_layernorm       blocks.i.norm2
    layers.i.self_attn.{q,k,v}_proj         blocks.i.attn.qkv   (rows q | k | v, concatenated)
    layers.i.self_attn.o_proj               blocks.i.attn.proj
    layers.i.mlp.{gate,up,down}_proj        blocks.i.mlp.{gate,up,down}

GPT-2 stores its linear layers as Conv1D with the weight (in, out), hence the transposes.
RoPE uses the rotate-half layout in both, so q/k need no permutation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from zerotune.config import describe_error
from zerotune.errors import ZerotuneError
from zerotune.files import read_json_object, save_weights, write_json
from zerotune.interop.hf_files import read_weights
from zerotune.models.gpt import GPT, GPTConfig

FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation
# buffers some checkpoints carry that follow from the config
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# ---------------------------------------------------------------- config.json


def _need(hf: dict[str, Any], key: str, path: Path) -> Any:
    if hf.get(key) is None:
        raise ZerotuneError(f"{key}: required key is missing", path=path)
    return hf[key]


def _rope(hf: dict[str, Any], path: Path) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from ``rope_parameters`` (newer layout) or ``rope_theta``/``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    if params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ZerotuneError("partial_rotary_factor: only 1.0 (rotate the whole head) is supported", path=path)
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    scaling = params if params else hf.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        kind = scaling.pop("type", None) or scaling.get("rope_type", "default")
        if kind == "default":
            return float(theta), None
        if kind not in ("linear", "llama3"):
            raise ZerotuneError(
                f"rope_scaling: unsupported rope_type {kind!r}; zerotune reads linear, llama3", path=path
            )
        scaling["rope_type"] = kind
        if kind == "llama3":
            scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return float(theta), scaling or None


def read_hf_decoder_config(folder: str | Path) -> GPTConfig:
    """The :class:`GPTConfig` for a Hugging Face GPT-2/Llama/Mistral/Qwen2 folder's ``config.json``.

    Raises:
        ZerotuneError: no or malformed config.json, another model family, or a setting
            zerotune does not implement (named).
    """
    path = Path(folder) / "config.json"
    return _decoder_config(read_json_object(path), path)


def _decoder_config(hf: dict[str, Any], path: Path) -> GPTConfig:
    """:func:`read_hf_decoder_config` on the parsed ``config.json`` (``path`` names it in errors)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ZerotuneError(
            f"model_type: {family!r} is not a decoder zerotune reads; expected one of {', '.join(FAMILIES)}",
            path=path,
        )
    if family == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_GELUS:
            raise ZerotuneError(
                f"activation_function: {act!r} is not supported; expected gelu_new", path=path
            )
        for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False)):
            if hf.get(key, ok) != ok:
                raise ZerotuneError(f"{key}: only {str(ok).lower()} is supported", path=path)
        fields = dict(
            vocab_size=_need(hf, "vocab_size", path),
            block_size=hf.get("n_positions", 1024),
            n_layer=_need(hf, "n_layer", path),
            n_head=_need(hf, "n_head", path),
            d_model=_need(hf, "n_embd", path),
            d_ff=hf.get("n_inner"),
            mlp="gelu",
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            pos="learned",
            bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            dropout=hf.get("resid_pdrop", 0.0),
        )
    else:
        if hf.get("hidden_act", "silu") != "silu":
            raise ZerotuneError(
                f"hidden_act: {hf['hidden_act']!r} is not supported; expected silu", path=path
            )
        attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise ZerotuneError(
                "attention_bias and mlp_bias must be equal for zerotune's bias setting", path=path
            )
        d, n_head = _need(hf, "hidden_size", path), _need(hf, "num_attention_heads", path)
        block = hf.get("max_position_embeddings", 2048)
        window = hf.get("sliding_window") if family == "mistral" or hf.get("use_sliding_window") else None
        if window:  # within the window, sliding-window attention is plain causal attention
            block = min(block, window)
        theta, scaling = _rope(hf, path)
        head_dim = hf.get("head_dim")
        fields = dict(
            vocab_size=_need(hf, "vocab_size", path),
            block_size=block,
            n_layer=_need(hf, "num_hidden_layers", path),
            n_head=n_head,
            n_kv_heads=hf.get("num_key_value_heads") or n_head,
            d_model=d,
            head_dim=None if head_dim in (None, d // n_head) else head_dim,
            d_ff=_need(hf, "intermediate_size", path),
            mlp="swiglu",
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            pos="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            bias=attention_bias,
            qkv_bias=family == "qwen2",
            tie_embeddings=hf.get("tie_word_embeddings", False),
            dropout=hf.get("attention_dropout", 0.0),
        )
    try:
        return GPTConfig(**fields)
    except ValidationError as e:
        raise ZerotuneError(
            f"does not describe a valid model: {describe_error(e.errors()[0])}", path=path
        ) from None


# ---------------------------------------------------------------- tensor names and shapes


def family_of(cfg: GPTConfig) -> str:
    """Which Hugging Face family holds this layout (raises when none does)."""
    gpt2 = (cfg.pos, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu")
    llama = (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")
    if gpt2 and cfg.bias and cfg.kv_heads == cfg.n_head and cfg.head_size * cfg.n_head == cfg.d_model:
        return "gpt2"
    if llama and cfg.qkv_bias and not cfg.bias:
        return "qwen2"
    if llama and not cfg.qkv_bias:
        return "llama"
    raise ZerotuneError(
        f"model: no Hugging Face family has this layout (pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp}, "
        f"bias={cfg.bias}, qkv_bias={cfg.qkv_bias}, n_kv_heads={cfg.kv_heads}); "
        "use the GPT-2 layout or the Llama layout"
    )


def hf_shapes(cfg: GPTConfig, family: str) -> dict[str, tuple[int, ...]]:
    """Every tensor name a Hugging Face checkpoint of ``family`` holds for ``cfg``, with its shape."""
    V, d, ff, L = cfg.vocab_size, cfg.d_model, cfg.ff_size, cfg.n_layer
    q, kv = cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size
    shapes: dict[str, tuple[int, ...]] = {}
    if family == "gpt2":
        shapes |= {
            "wte.weight": (V, d),
            "wpe.weight": (cfg.block_size, d),
            "ln_f.weight": (d,),
            "ln_f.bias": (d,),
        }
        for i in range(L):
            p = f"h.{i}."
            shapes |= {p + f"ln_{n}.{w}": (d,) for n in (1, 2) for w in ("weight", "bias")}
            shapes |= {p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,)}
            shapes |= {p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,)}
            shapes |= {p + "mlp.c_fc.weight": (d, ff), p + "mlp.c_fc.bias": (ff,)}
            shapes |= {p + "mlp.c_proj.weight": (ff, d), p + "mlp.c_proj.bias": (d,)}
    else:
        shapes |= {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
        for i in range(L):
            p = f"model.layers.{i}."
            shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
            out = {"q_proj": q, "k_proj": kv, "v_proj": kv}
            shapes |= {p + f"self_attn.{n}.weight": (rows, d) for n, rows in out.items()}
            shapes |= {p + "self_attn.o_proj.weight": (d, q)}
            shapes |= {p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d)}
            shapes |= {p + "mlp.down_proj.weight": (d, ff)}
            if cfg.bias or cfg.qkv_bias:
                shapes |= {p + f"self_attn.{n}.bias": (rows,) for n, rows in out.items()}
            if cfg.bias:
                shapes |= {p + "self_attn.o_proj.bias": (d,), p + "mlp.down_proj.bias": (d,)}
                shapes |= {p + "mlp.gate_proj.bias": (ff,), p + "mlp.up_proj.bias": (ff,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, d)
    return shapes


# GPT-2's per-block tensor names (under h.{i}.) → zerotune's (under blocks.{i}.), both directions
GPT2_BLOCK_NAMES = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
                    "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}


def _to_zerotune(hf: dict[str, torch.Tensor], cfg: GPTConfig, family: str) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    if family == "gpt2":
        sd["tok_emb.weight"], sd["pos_emb.weight"] = hf["wte.weight"], hf["wpe.weight"]
        sd["norm_f.weight"], sd["norm_f.bias"] = hf["ln_f.weight"], hf["ln_f.bias"]
        for i in range(cfg.n_layer):
            for theirs, ours in GPT2_BLOCK_NAMES.items():
                w = hf[f"h.{i}.{theirs}.weight"]
                sd[f"blocks.{i}.{ours}.weight"] = w if theirs.startswith("ln") else w.t()  # Conv1D: (in, out)
                sd[f"blocks.{i}.{ours}.bias"] = hf[f"h.{i}.{theirs}.bias"]
    else:
        sd["tok_emb.weight"], sd["norm_f.weight"] = hf["model.embed_tokens.weight"], hf["model.norm.weight"]
        for i in range(cfg.n_layer):
            p, o = f"model.layers.{i}.", f"blocks.{i}."
            sd[o + "norm1.weight"] = hf[p + "input_layernorm.weight"]
            sd[o + "norm2.weight"] = hf[p + "post_attention_layernorm.weight"]
            for kind in ("weight", "bias"):
                parts = [p + f"self_attn.{n}_proj.{kind}" for n in "qkv"]
                if parts[0] in hf:
                    sd[o + f"attn.qkv.{kind}"] = torch.cat([hf[n] for n in parts])  # rows q | k | v
                for theirs, ours in (("self_attn.o_proj", "attn.proj"), ("mlp.gate_proj", "mlp.gate"),
                                     ("mlp.up_proj", "mlp.up"), ("mlp.down_proj", "mlp.down")):  # fmt: skip
                    if p + f"{theirs}.{kind}" in hf:
                        sd[o + f"{ours}.{kind}"] = hf[p + f"{theirs}.{kind}"]
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    return sd


def _to_hf(model: GPT, cfg: GPTConfig, family: str) -> dict[str, torch.Tensor]:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf: dict[str, torch.Tensor] = {}
    if family == "gpt2":
        hf["wte.weight"], hf["wpe.weight"] = sd["tok_emb.weight"], sd["pos_emb.weight"]
        hf["ln_f.weight"], hf["ln_f.bias"] = sd["norm_f.weight"], sd["norm_f.bias"]
        for i in range(cfg.n_layer):
            for theirs, ours in GPT2_BLOCK_NAMES.items():
                w = sd[f"blocks.{i}.{ours}.weight"]
                hf[f"h.{i}.{theirs}.weight"] = w if theirs.startswith("ln") else w.t()
                hf[f"h.{i}.{theirs}.bias"] = sd[f"blocks.{i}.{ours}.bias"]
        hf = {f"transformer.{k}": v for k, v in hf.items()}
    else:
        hf["model.embed_tokens.weight"], hf["model.norm.weight"] = sd["tok_emb.weight"], sd["norm_f.weight"]
        sizes = [cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.kv_heads * cfg.head_size]
        for i in range(cfg.n_layer):
            p, o = f"model.layers.{i}.", f"blocks.{i}."
            hf[p + "input_layernorm.weight"] = sd[o + "norm1.weight"]
            hf[p + "post_attention_layernorm.weight"] = sd[o + "norm2.weight"]
            for kind in ("weight", "bias"):
                if o + f"attn.qkv.{kind}" in sd:
                    for n, part in zip("qkv", sd[o + f"attn.qkv.{kind}"].split(sizes), strict=True):
                        hf[p + f"self_attn.{n}_proj.{kind}"] = part
                for theirs, ours in (("self_attn.o_proj", "attn.proj"), ("mlp.gate_proj", "mlp.gate"),
                                     ("mlp.up_proj", "mlp.up"), ("mlp.down_proj", "mlp.down")):  # fmt: skip
                    if o + f"{ours}.{kind}" in sd:
                        hf[p + f"{theirs}.{kind}"] = sd[o + f"{ours}.{kind}"]
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = sd["lm_head.weight"]
    # safetensors stores each tensor once, contiguous and unshared
    return {k: v.contiguous().clone() for k, v in hf.items()}


# ---------------------------------------------------------------- weights in


def _strip_prefix(name: str, family: str) -> str:
    if family == "gpt2":  # GPT2LMHeadModel saves transformer.*, the original GPT-2 checkpoints bare names
        return name.removeprefix("transformer.")
    if name.startswith("model.") or name == "lm_head.weight":
        return name
    return "model." + name  # a bare LlamaModel checkpoint


def load_hf_decoder(folder: str | Path) -> tuple[GPT, GPTConfig]:
    """Build the zerotune model for a Hugging Face GPT-2/Llama/Mistral/Qwen2 folder and load its weights.

    The weights keep fp32 (cast on load when stored in half precision). Every tensor the
    config implies must be present with its shape, and every tensor present must be used.

    Raises:
        ZerotuneError: missing, unexpected or mis-shaped tensor (named, with its file), an
            unreadable file, or a config zerotune cannot read.

    Example:
        >>> model, cfg = load_hf_decoder("checkpoints/gpt2")
    """
    folder = Path(folder)
    hf = read_json_object(folder / "config.json")
    cfg, family = _decoder_config(hf, folder / "config.json"), hf["model_type"]
    raw, origin = read_weights(folder)
    family_names = "gpt2" if family == "gpt2" else "llama"
    tensors = {_strip_prefix(k, family_names): v for k, v in raw.items()}
    where = {_strip_prefix(k, family_names): origin[k] for k in raw}
    expected = hf_shapes(cfg, family_names)
    for name, shape in expected.items():
        if name not in tensors:
            raise ZerotuneError(f"tensor {name} is missing", path=folder)
        if tuple(tensors[name].shape) != shape:
            raise ZerotuneError(
                f"tensor {name} has shape {tuple(tensors[name].shape)}; config.json implies {shape}",
                path=where[name],
            )
    for name in tensors:
        tied_head = name == "lm_head.weight" and cfg.tie_embeddings
        if name not in expected and not tied_head and not name.endswith(IGNORED_SUFFIXES):
            raise ZerotuneError(f"unexpected tensor {name} (not part of a {family} model)", path=where[name])
    model = GPT(cfg)
    sd = {
        k: v.float() if v.is_floating_point() else v
        for k, v in _to_zerotune(tensors, cfg, family_names).items()
    }
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg


# ---------------------------------------------------------------- weights out


def hf_config_dict(cfg: GPTConfig) -> dict[str, Any]:
    """The ``config.json`` contents that make ``transformers`` rebuild this model."""
    family = family_of(cfg)
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.ff_size,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings,
            "torch_dtype": "float32",
        }
    scaling = cfg.rope_scaling
    out = {
        "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        # both layouts: rope_theta/rope_scaling (transformers 4) and rope_parameters (transformers 5)
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(scaling or {})},
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }
    if family == "llama":
        out |= {"attention_bias": cfg.bias, "mlp_bias": cfg.bias}
    else:
        out |= {"use_sliding_window": False}
    return out


def hf_special_ids(folder: str | Path) -> dict[str, int | list[int] | None]:
    """``bos``, ``eos`` and ``pad`` token ids of a Hugging Face folder (generation_config.json wins).

    ``eos`` may be a list (Llama 3 stops on several tokens); ``generate(eos_id=...)`` takes either.
    """
    folder = Path(folder)
    ids: dict[str, int | list[int] | None] = {"bos": None, "eos": None, "pad": None}
    for name in ("config.json", "generation_config.json"):
        if (folder / name).is_file():
            data = read_json_object(folder / name)
            for key in ids:
                if data.get(f"{key}_token_id") is not None:
                    ids[key] = data[f"{key}_token_id"]
    return ids


def export_hf_decoder(
    model: GPT,
    cfg: GPTConfig,
    folder: str | Path,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``AutoModelForCausalLM.from_pretrained`` loads.

    GPT-2 layouts become ``gpt2``; Llama layouts ``llama`` (or ``qwen2`` with q/k/v-only biases).
    ``bos_id``/``eos_id``/``pad_id`` (the tokenizer's special tokens) go into config.json.

    Raises:
        ZerotuneError: the layout has no Hugging Face counterpart (e.g. RoPE with LayerNorm).
    """
    if cfg.vocab_size is None:
        cfg = model.config
    family = family_of(cfg)
    config = hf_config_dict(cfg) | {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _to_hf(model, cfg, family)
    expected = {("transformer." + k if family == "gpt2" and k != "lm_head.weight" else k): s
                for k, s in hf_shapes(cfg, "gpt2" if family == "gpt2" else "llama").items()}  # fmt: skip
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected, "zerotune/HF name maps disagree"
    save_weights(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    write_json(folder / "config.json", config, indent=2)
    return folder
