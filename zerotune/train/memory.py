"""Will training fit in memory? Counted before anything of its size is allocated.

The weights, gradients and AdamW moments are counted from the model built on the meta device;
the activations the backward pass keeps, by running the model's forward and the task's loss on
a batch of meta tensors and adding up what autograd saves (:func:`activation_bytes`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from zerotune.config import Config
from zerotune.data.lazy import available_memory
from zerotune.errors import ZerotuneError
from zerotune.models import build_model
from zerotune.units import human


class FusedAttention(TorchFunctionMode):
    """Counts attention as ``device`` runs it. On the meta device ``F.scaled_dot_product_attention``
    falls back to the math path, which keeps the (T × T) attention matrix; GPUs run a fused kernel
    that keeps only q, k, v, the output and its log-sum-exp, and so do CPUs without attention
    dropout (with it, they take the math path too). Routed to the CPU's fused kernel (which has a
    meta implementation), the estimate keeps what the device keeps."""

    NAMES = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.counted_as: dict[int, int] = {}  # id of an expanded grouped k/v → the bytes the kernel keeps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, *rest = args
        kwargs.update(zip(self.NAMES, rest, strict=False))
        if self.device.type == "cpu" and kwargs.get("dropout_p", 0.0) > 0:
            return func(q, k, v, **kwargs)
        kwargs["dropout_p"] = 0.0  # a GPU's fused kernel keeps a seed, not a dropout mask
        if kwargs.get("enable_gqa") and k.shape[1] != q.shape[1]:  # grouped keys, expanded to one per query head
            grouped = k, v  # ... which the device's kernel keeps as they are
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in grouped)
            self.counted_as |= {id(k): grouped[0].nbytes, id(v): grouped[1].nbytes}
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False),
            attn_mask=kwargs.get("attn_mask"), scale=kwargs.get("scale"))[0]


def activation_bytes(model: nn.Module, task, rows: int, device: torch.device) -> int | None:
    """Bytes the backward pass keeps of one micro-batch of ``rows`` examples: the tensors autograd
    saves in the forward and the loss (fp32; the weights it saves are not counted again), with
    attention counted as ``device`` runs it (:class:`FusedAttention`).

    ``model`` runs in train mode on a batch of zeros of that shape with its weights and buffers
    swapped for meta tensors (``functional_call``), so nothing is allocated and nothing of the
    model changes: it may be a real model or one built on the meta device. None when a layer
    cannot run on the meta device (a quantized one, say).
    """
    info, meta = task.info, torch.device("meta")
    x = torch.zeros(rows, *info.input_shape, dtype=torch.long if info.kind == "tokens" else torch.float32,
                    device=meta)
    y_train = getattr(getattr(task, "train", None), "y", None)
    if isinstance(y_train, torch.Tensor):  # a classifier's or regressor's targets
        y = torch.zeros(rows, *y_train.shape[1:], dtype=y_train.dtype, device=meta)
    else:  # a language model's targets have the inputs' shape
        y = x
    swapped = {name: torch.empty_like(t, device=meta).requires_grad_(t.requires_grad)
               for name, t in [*model.named_parameters(), *model.named_buffers()]}
    weights = {id(t) for t in swapped.values()}
    attention = FusedAttention(device)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in weights and id(t._base) not in weights:  # a weight, or a view of one (W.t())
            saved[id(t)] = attention.counted_as.get(id(t), t.numel() * t.element_size())
        return t

    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), saved_tensors_hooks(pack, lambda t: t), attention:
            task.loss(functional_call(model.train(), swapped, (x,)), y)
    except Exception:  # an op with no meta kernel (bitsandbytes, a custom kernel): no estimate
        return None
    finally:
        model.train(was_training)
    return sum(saved.values())


def micro_batch(cfg: Config, task, device: torch.device, world_size: int) -> tuple[int, str]:
    """Rows in one micro-batch of one process (a data set smaller than a batch is one batch), and
    the dtype its activations are kept in: bf16 under the loop's autocast, else fp32."""
    t = cfg.train
    batch = min(t.batch_size, getattr(task, "n", t.batch_size))
    half = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")  # as loop.autocast_for
    return math.ceil(math.ceil(batch / world_size) / t.grad_accum), "bf16" if half else "fp32"


def activations_of(model: nn.Module, cfg: Config, task, device: torch.device, world_size: int):
    """(rows, bytes, dtype) of one micro-batch's activations; bytes None when not estimated. Under
    bf16 autocast the count of the fp32 forward is halved (most saved tensors are bf16 there)."""
    rows, dtype = micro_batch(cfg, task, device, world_size)
    acts = activation_bytes(model, task, rows, device)
    return rows, None if acts is None else acts // (2 if dtype == "bf16" else 1), dtype


def check_fits(cfg: Config, task, device: torch.device, world_size: int = 1) -> None:
    """Refuse a model that cannot fit in the memory of ``device`` before any of it is allocated:
    its weights, gradients and AdamW moments (4 fp32 copies), counted on the meta device, plus
    the activations the backward pass keeps of one micro-batch (:func:`activation_bytes`)."""
    with torch.device("meta"):
        model = build_model(cfg.model, task.info)
    n = sum(p.numel() for p in model.parameters())
    have = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else available_memory()
    state = 16 * n
    if state > have:
        raise ZerotuneError(f"model: {n:,} parameters need about {state / 2**30:,.1f} GiB for weights, gradients and "
                            f"optimizer state, more than the {have / 2**30:,.1f} GiB this {device.type} has; make it "
                            "smaller")
    rows, acts, dtype = activations_of(model, cfg, task, device, world_size)
    if acts is not None and state + acts > have:
        raise ZerotuneError(
            f"train.batch_size: a micro-batch of {rows:,} examples keeps about {human(acts, 'B')} of activations for "
            f"the backward pass ({dtype}), which with {human(state, 'B')} of weights, gradients and optimizer state "
            f"is more than the {human(have, 'B')} this {device.type} has; lower train.batch_size, raise "
            "train.grad_accum (same update, smaller micro-batches) or make the model smaller")


def check_activations_fit(model: nn.Module, cfg: Config, task, device: torch.device, world_size: int = 1) -> None:
    """For a model already in memory (fine-tuning): refuse a micro-batch whose activations, with the
    gradients and AdamW moments of the trainable weights (3 fp32 copies), exceed what is left."""
    state = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    rows, acts, dtype = activations_of(model, cfg, task, device, world_size)
    if acts is not None and state + acts > have:
        raise ZerotuneError(
            f"train.batch_size: a micro-batch of {rows:,} examples keeps about {human(acts, 'B')} of activations for "
            f"the backward pass ({dtype}), which with {human(state, 'B')} of gradients and optimizer state is more "
            f"than the {human(have, 'B')} this {device.type} has left; lower train.batch_size or raise "
            "train.grad_accum (same update, smaller micro-batches)")
