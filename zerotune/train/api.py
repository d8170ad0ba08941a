"""The train verb: a config in, a run folder out (or an existing run resumed), from scratch.

The model is built from the config (``model.arch``, see :data:`zerotune.models.ARCHS`) for the
data the task reads; the run skeleton (:mod:`zerotune.train.runner`) does the rest.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode

from zerotune.config import Config, load_config
from zerotune.data.lazy import available_memory
from zerotune.errors import ZerotuneError
from zerotune.models import build_model
from zerotune.train.parallel import Parallel
from zerotune.train.runner import Setup, default_out, is_finetuning, open_to_resume, resume_run, run_training
from zerotune.train.tasks import make_task, resolve_vocab
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

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, *rest = args
        kwargs.update(zip(self.NAMES, rest, strict=False))
        if self.device.type == "cpu" and kwargs.get("dropout_p", 0.0) > 0:
            return func(q, k, v, **kwargs)
        kwargs["dropout_p"] = 0.0  # a GPU's fused kernel keeps a seed, not a dropout mask
        if kwargs.get("enable_gqa") and k.shape[1] != q.shape[1]:  # grouped keys: one per query head
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False),
            attn_mask=kwargs.get("attn_mask"), scale=kwargs.get("scale"))[0]


def activation_bytes(model: nn.Module, task, rows: int, device: torch.device) -> int | None:
    """Bytes the backward pass keeps of one micro-batch of ``rows`` examples: the tensors autograd
    saves in the forward and the loss (fp32; the weights it saves are not counted again), found
    by running ``model`` on a batch of zeros of that shape, with attention counted as ``device``
    runs it (:class:`FusedAttention`). Built on the meta device, the model allocates nothing;
    None when a layer cannot run there."""
    info = task.info
    meta = next(model.parameters()).device
    if info.kind == "tokens":  # token ids; a language model's targets have the inputs' shape
        x = torch.zeros(rows, *info.input_shape, dtype=torch.long, device=meta)
        y = x if info.target in ("causal_lm", "masked_lm") else torch.zeros(rows, dtype=torch.long, device=meta)
    else:
        x = torch.zeros(rows, *info.input_shape, device=meta)
        y_train = task.train.y
        y = torch.zeros(rows, *y_train.shape[1:], dtype=y_train.dtype, device=meta)
    weights = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in weights and id(t._base) not in weights:  # a weight, or a view of one (W.t())
            saved[id(t)] = t.numel() * t.element_size()
        return t

    try:
        with saved_tensors_hooks(pack, lambda t: t), FusedAttention(device):
            task.loss(model(x), y)
    except (RuntimeError, NotImplementedError):  # an op with no meta kernel: no estimate
        return None
    return sum(saved.values())


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
    t = cfg.train
    batch = min(t.batch_size, getattr(task, "n", t.batch_size))  # a data set smaller than a batch is one batch
    rows = math.ceil(math.ceil(batch / world_size) / t.grad_accum)  # one micro-batch of one process
    acts = activation_bytes(model.train(), task, rows, device)
    if acts is not None and state + acts > have:
        raise ZerotuneError(
            f"train.batch_size: a micro-batch of {rows:,} examples keeps about {human(acts, 'B')} of activations for "
            f"the backward pass (fp32), which with {human(state, 'B')} of weights, gradients and optimizer state is "
            f"more than the {human(have, 'B')} this {device.type} has; lower train.batch_size, raise "
            "train.grad_accum (same update, smaller micro-batches) or make the model smaller")


def build_from_scratch(cfg: Config, par: Parallel, root: Path, resuming: bool) -> Setup:
    """The task the config names and a freshly initialised model for its data."""
    if cfg.task == "sft":
        raise ZerotuneError("task 'sft' is trained with `zerotune finetune` (it starts from a pretrained decoder)")
    device = par.device
    task = make_task(cfg, device)  # validates the data before any folder is touched
    cfg = resolve_vocab(cfg, task.info)
    check_fits(cfg, task, device, par.world_size)
    model = build_model(cfg.model, task.info).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    return Setup(cfg, task, model, rebuild=lambda: build_model(cfg.model, task.info).to(device),
                 headline=f"{cfg.model.arch}: {n_params:,} parameters · {task.describe()} · device {device}",
                 tokenizer=task.tokenizer)


def train(config: str | Path | dict | Config | None = None, *, out: str | Path | None = None,
          overwrite: bool = False, resume: str | Path | None = None, overrides: list[str] | dict | None = None,
          log=print) -> Path:
    """Train from a config (a YAML path, a mapping or a Config) into a run folder; return its path.

    Args:
        config: the config; ignored with ``resume``.
        out: the run folder (default ``runs/<config name>``); an existing one needs ``overwrite``.
        resume: a run folder to continue from its latest good checkpoint (its own config.yaml); a
            fine-tuning run continues with :func:`zerotune.resume`.
        overrides: ``["train.epochs=3", ...]`` or ``{"train.epochs": 3}``.

    Started by torchrun (or inside an initialised process group), each process runs this same
    call: see :mod:`zerotune.train.parallel`. Rank 0 writes the run folder and returns its path.

    Example:
        >>> run = zerotune.train("configs/digits_mlp.yaml", overrides=["train.epochs=2"], out="runs/x")
    """
    if resume is None:
        cfg = load_config(config, overrides)
        return run_training(cfg, build_from_scratch, root=Path(out or default_out(config, "run")),
                            overwrite=overwrite, log=log)
    run, cfg = open_to_resume(resume)
    if is_finetuning(cfg):
        raise ZerotuneError("a fine-tuning run: continue it with zerotune.resume(RUN) or `zerotune train --resume "
                            "RUN`, which start from its SOURCE again", path=run.root)
    return resume_run(run, cfg, build_from_scratch, log)


__all__ = ["train", "build_from_scratch"]
