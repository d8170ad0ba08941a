"""QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314): LoRA on top of a quantized frozen base.

Every frozen ``nn.Linear`` weight W (out × in) is stored in a few bits and dequantized on the
fly in each forward pass; only the LoRA adapters (kept in the compute dtype) are trained:

    y = dequant(Q(W)) x + b + (α / r) · B A x

    4-bit NF4: W is cut into blocks of 64 consecutive values; each block keeps its absmax
        m = max|w| and the index of the nearest of the 16 NormalFloat levels to w / m (levels:
        the quantiles of N(0, 1) scaled to [−1, 1], with an exact 0). Two indices per byte;
        with double quantization the fp32 block maxima are themselves quantized to 8 bits.
        Storage: ≈ 0.5 + 4/64 bytes per weight (≈ 0.14× fp32), ≈ 0.13× with double quantization.
    8-bit:  each row of W keeps its absmax s_i and round(127 · w / s_i) as int8 (LLM.int8()
        without the outlier split; W is rounded to fp16 first, as that algorithm works on fp16
        weights). Storage: 1 + 4/in bytes per weight (≈ 0.25× fp32).

The quantized layers and their kernels come from ``bitsandbytes`` (``Linear4bit`` /
``Linear8bitLt``), which has a CPU backend as well as the CUDA one; it is imported only here
(``pip install 'zerotune[qlora]'``). Gradients flow through the quantized matmul to the
adapters and the layers below; the quantized weights themselves never get gradients.

Order matters: adapters wrap plain ``nn.Linear`` layers, so apply LoRA first and quantize
after (the base linear inside each :class:`~zerotune.finetune.lora.LoRALinear` is quantized
too); ``zerotune.finetune.adapt.apply_method`` does the three steps. The output head is left
in full precision by default, and a linear layer whose weight is shared with another module (a tied head) is never
quantized. A state dict holds the packed weights and their quantization state; loading one
back (resuming from a checkpoint) checks that the frozen base is the same. For export,
:func:`dequantize_model` puts plain ``nn.Linear`` layers back (``merge_lora`` / ``unwrap_lora``
then work as usual).

Example:
    >>> apply_lora(model, ["attn.qkv", "attn.proj"], r=8, alpha=16)
    >>> quantize_for_qlora(model, bits=4)
    >>> mark_only_lora_as_trainable(model)
    >>> ...train...
    >>> dequantize_model(model); unwrap_lora(model)
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.finetune.lora import matches

BITS = (4, 8)


def _bnb():
    """``bitsandbytes``, imported on this path only; a missing install is a one-line error."""
    # its CPU backend logs a warning when an optional fused kernel package is absent; the
    # plain CPU kernels it falls back on are the ones used here
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # its import uses the deprecated torch.jit.script_method
            warnings.simplefilter("ignore")
            import bitsandbytes
    except ImportError:
        raise ZerotuneError(
            "finetune.method qlora needs the bitsandbytes package: pip install 'zerotune[qlora]'"
        ) from None
    finally:
        logger.setLevel(level)
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """Is ``module`` a quantized linear layer made by :func:`quantize_for_qlora`."""
    bnb = _bnb()
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def quantize_linear(linear: nn.Linear, bits: int = 4, *, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen quantized copy of ``linear`` (bitsandbytes ``Linear4bit`` NF4 or ``Linear8bitLt``).

    Args:
        linear: the layer; its weight is quantized on the weight's device, its bias kept as is.
        bits: 4 (NF4) or 8 (int8, per output row).
        blocksize: NF4 block length (values sharing one absmax).
        double_quant: 4-bit only: quantize the block maxima too (QLoRA's double quantization).
        compute_dtype: dtype of the dequantized matmul; default the weight's dtype.
    """
    bnb = _bnb()
    if bits not in BITS:
        raise ZerotuneError(f"qlora.bits: expected 4 or 8, got {bits}")
    w = linear.weight.detach()
    device = w.device
    has_bias = linear.bias is not None
    if bits == 4:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                              compute_dtype=compute_dtype or w.dtype, compress_statistics=double_quant,
                              quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w.to("cpu").clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=blocksize, compress_statistics=double_quant)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                has_fp16_weights=False, threshold=0.0, device="meta")
        q.weight = bnb.nn.Int8Params(w.to("cpu").clone(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.detach().to("cpu").clone(), requires_grad=False)
    q = q.to(device)  # moving the module to a device is what quantizes the weight
    if bits == 4:
        q._register_load_state_dict_pre_hook(_check_frozen_state, with_module=True)
    return q


def _check_frozen_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Loading a state dict (a checkpoint to resume) into a 4-bit layer.

    The packed weight and its quantization state never train, so a checkpoint of the same
    run holds exactly the layer's own; they are checked equal and the quantization-state
    entries consumed (bitsandbytes' ``Linear4bit`` saves them but does not load them back).
    """
    own: dict[str, torch.Tensor] = {}
    module._save_to_state_dict(own, prefix, keep_vars=False)
    for key, mine in own.items():
        if key not in state_dict or key == prefix + "bias":
            continue
        theirs = state_dict[key]
        if tuple(theirs.shape) != tuple(mine.shape) or not torch.equal(theirs.to(mine.device), mine):
            raise ZerotuneError(f"tensor {key!r}: the saved 4-bit base weight differs from the model's "
                                "(another base model or quantization settings)")
        if key != prefix + "weight":
            del state_dict[key]


def quantize_for_qlora(model: nn.Module, bits: int = 4, *, skip: list[str] | tuple[str, ...] = ("lm_head",),
                       blocksize: int = 64, double_quant: bool = True,
                       compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the frozen ``nn.Linear`` layers of ``model`` by quantized ones, in place; LoRA adapters stay.

    Every exact ``nn.Linear`` (including the base layer inside each ``LoRALinear``) is quantized
    unless its name matches ``skip`` (names, dotted suffixes or globs) or its weight is shared
    with another module. See :func:`quantize_linear` for the other arguments.

    Returns:
        ``model``.

    Raises:
        ZerotuneError: bits not 4 or 8, bitsandbytes missing, no linear layer to quantize.
    """
    if bits not in BITS:
        raise ZerotuneError(f"qlora.bits: expected 4 or 8, got {bits}")
    tied = _shared_weights(model)
    chosen = [
        name for name, m in model.named_modules()
        if type(m) is nn.Linear and id(m.weight) not in tied and not any(matches(name, s) for s in skip)
    ]
    if not chosen:
        raise ZerotuneError("qlora: no linear layer left to quantize (all skipped or tied)")
    for name in chosen:
        model.set_submodule(name, quantize_linear(model.get_submodule(name), bits, blocksize=blocksize,
                                                    double_quant=double_quant, compute_dtype=compute_dtype))
    return model


def _row_scales(module: nn.Module) -> torch.Tensor:
    """An int8 layer's row absmax: on the weight until the first forward, on the layer's state after it."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The weight (out, in) a quantized layer computes with, in fp32."""
    bnb = _bnb()
    w = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            # an eval-mode forward on a CPU with AVX512-BF16 repacked the weight for bitsandbytes'
            # CPU kernel: back to the standard layout first, as bitsandbytes' own state_dict does
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        return w.data.float() * (_row_scales(module).float()[:, None] / 127.0)  # (out, in) int8 codes × row scale
    raise ZerotuneError(f"{type(module).__name__} is not a quantized linear layer")


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Put a plain ``nn.Linear`` (dequantized weights, in ``dtype``) back in place of every quantized layer."""
    for name, m in list(model.named_modules()):
        if name and is_quantized(m):
            w = dequantize_weight(m).to(dtype)
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            lin.requires_grad_(False)
            model.set_submodule(name, lin)
    return model


__all__ = ["dequantize_model", "dequantize_weight", "is_quantized", "quantize_for_qlora", "quantize_linear"]
