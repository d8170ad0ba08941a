"""Optimizers and learning-rate schedules.

Weight decay applies only to matrices of Linear/Conv layers (parameters with ≥ 2 dims that
do not belong to an embedding); biases, norm gains and embeddings are not decayed, as in
GPT-2/LLaMA training recipes and Keras' kernel-only regularisation.

Schedules are multipliers on ``optim.lr`` as a function of the optimizer step s, with linear
warmup over W steps (factor s/W) followed by, for total steps S and floor m = min_lr_ratio:

    constant  1
    step      gamma ** ((s - W) // step_size)
    cosine    m + (1 - m) · ½(1 + cos(π · (s - W) / (S - W)))
    linear    m + (1 - m) · (1 - (s - W) / (S - W))
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zerotune.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embedding_params else no_decay).append(p)
    if weight_decay == 0:  # one group: each optimizer step is one fused call instead of two
        return [{"params": decay + no_decay, "weight_decay": 0.0}]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters. Each group carries ``initial_lr`` (the schedule's base,
    as a scheduler would add it), so a saved state and a fresh optimizer have the same keys."""
    groups = [{**g, "initial_lr": cfg.lr} for g in param_groups(model, cfg.weight_decay)]
    # one fused kernel per step instead of ~10 ops per tensor: ~3× faster Adam steps on CPU as well
    fused = {"fused": True} if device is not None and device.type in ("cuda", "cpu") else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fused)
    return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.eps)


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """The schedule's multiplier on the base learning rate at optimizer step ``step``."""
    w = cfg.warmup_steps
    if step < w:
        return (step + 1) / w
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** ((step - w) // cfg.step_size)
    progress = min(1.0, (step - w) / max(1, total_steps - w))
    m = cfg.min_lr_ratio
    if cfg.name == "cosine":
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))
    return m + (1 - m) * (1 - progress)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int, start: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule from optimizer step ``start`` on (a resumed run: the learning rates are set for it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps), last_epoch=start - 1)


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """The config's learning rate, betas, eps, momentum and weight decay in place of the ones a loaded
    optimizer state brought back, so a resumed run follows its config.yaml (the moments stay)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = cfg.lr
        for key, value in (("betas", tuple(cfg.betas)), ("eps", cfg.eps), ("momentum", cfg.momentum),
                           ("nesterov", cfg.nesterov)):
            if key in group:
                group[key] = value
        if group["weight_decay"] > 0:  # the decayed group (see param_groups); the other stays at 0
            group["weight_decay"] = cfg.weight_decay
