"""The one loop on W processes (torchrun + DDP or FSDP2): what a process does at each step.

:class:`Parallel` is this process's place in the run (rank, world size, strategy, device) and
the few operations the loop needs: its share of the batch, the gradient reduction, the sums and
gathers of evaluation, full state dicts. With one process each is the plain operation. Joining
the processes and starting them is :mod:`zerotune.train.launch`.

``train.batch_size`` B is the global batch. Step s uses exactly the single-process batch
``task.batch(s)`` = (x₁ … x_n), n ≤ B, split contiguously into W near-equal slices S_r; rank r
builds only S_r (``task.batch(s, r, W)``: it reads, augments or masks no other row), cuts it into
its train.grad_accum micro-batches and back-propagates

    W · L_r,     L_r = Σ_{i ∈ S_r} loss_i / N

where N = Σ_r task.count(S_r), the examples (or target tokens) of the whole batch, is all-reduced.

DDP and FSDP average gradients over the W ranks, so every rank ends the step with

    (1/W) Σ_r W ∇L_r = ∇ (Σ_i loss_i / N)

the single-process gradient, a partial last batch weighted by its own count N. The optimizer
step is then the single-process step, up to float rounding from the order of the sums.

Strategies (``train.strategy``; ``auto`` = ddp when W > 1, plain when W = 1):

    ddp   DistributedDataParallel: a full copy of weights, gradients and optimizer state on each
          rank; BatchNorm becomes SyncBatchNorm on CUDA.
    fsdp  FSDP2 ``fully_shard`` on every block of each ``nn.ModuleList`` of blocks, then on the
          root: weights, gradients and optimizer state are split W ways and all-gathered per block
          (bf16 compute / fp32 reduction on CUDA).

Rank 0 alone writes the run folder (metrics, checkpoints, final model). Evaluation runs on a
slice of the validation set per rank: a supervised task's outputs are gathered, a language
model's sums of loss and tokens are all-reduced, so every rank sees the same numbers and makes
the same early-stopping decision. Checkpoints hold full, unsharded tensors with the
single-process names, so a run saved by W processes resumes on any other number; they also hold
each rank's random state, restored when the run resumes on as many processes.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.train.checkpoint import rng_state, set_rng_state

EVAL_BATCH = 1024


@dataclass
class Parallel:
    """Where this process stands in the run, and the few operations the loop needs from it.

    With ``world_size == 1`` every method is the plain single-process operation, so the loop has
    one code path.
    """

    rank: int = 0
    world_size: int = 1
    strategy: str = "none"  # none | ddp | fsdp
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    activation_checkpointing: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_scale(self) -> float:
        """Factor on each rank's loss that turns DDP/FSDP's gradient average into the sum."""
        return float(self.world_size)

    # ------------------------------------------------ model

    def wrap(self, model: nn.Module) -> nn.Module:
        """Activation checkpointing, then DDP or FSDP2 as the strategy says (identity otherwise)."""
        if self.activation_checkpointing:
            from torch.distributed._composable import checkpoint

            for block in blocks(model):
                checkpoint(block)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                warnings.warn("BatchNorm statistics are per process: PyTorch's SyncBatchNorm needs CUDA", stacklevel=2)
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            kw = {}
            if self.device.type == "cuda":
                kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in blocks(model):
                fully_shard(block, **kw)
            fully_shard(model, **kw)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain module inside a DDP wrapper (FSDP2 shards the module in place)."""
        from torch.nn.parallel import DistributedDataParallel

        return model.module if isinstance(model, DistributedDataParallel) else model

    def gathered_model(self, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
        """After training: a plain, unsharded model on rank 0 (None elsewhere). Collective."""
        if self.strategy != "fsdp":
            return self.unwrap(model) if self.is_main else None
        weights = self.model_state(model)
        if not self.is_main:
            return None
        plain = build()
        plain.load_state_dict(weights)
        return plain

    # ------------------------------------------------ one step

    def batch(self, task, step: int, batch_size: int,
              grad_accum: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int, int]:
        """This rank's micro-batches of step ``step``, the rows of the whole step's batch, and its
        count n (examples or target tokens, the loss normaliser; at least 1).

        Each rank builds only its share (``task.batch(step, rank, W)``); rows and n are summed
        over the ranks (one small all-reduce).
        """
        if self.world_size == 1:
            x, y = task.batch(step)
            rows, n = len(y), task.count(y)
        else:
            x, y = task.batch(step, self.rank, self.world_size)
            counts = torch.tensor([len(y), task.count(y)], device=self._comm_device)
            dist.all_reduce(counts)
            rows, n = counts.tolist()
        return self.micro_batches(x, y, rows, batch_size, grad_accum), rows, max(1, n)

    def micro_batches(self, x: torch.Tensor, y: torch.Tensor, rows: int, batch_size: int,
                      grad_accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share (x, y) of a step's batch of ``rows`` rows, as micro-batches.

        Every rank gets the same number of micro-batches (a short share ends with empty ones),
        because DDP synchronises on the last one and FSDP gathers weights in every forward.
        """
        w = self.world_size
        micro = math.ceil(math.ceil(batch_size / w) / grad_accum)
        k = math.ceil(math.ceil(rows / w) / micro)
        return [(x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro]) for i in range(k)]

    def grad_sync(self, model: nn.Module, last: bool):
        """DDP: skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.strategy == "ddp" and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of ``value`` over ranks (a copy, on the communication device; the value itself with one process)."""
        if self.world_size == 1:
            return value
        value = value.detach().to(self._comm_device, copy=True)
        dist.all_reduce(value)
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (so all ranks stop at the same step)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to a global gradient norm and return that norm (a plain tensor on every rank)."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if self.strategy == "fsdp":
            from torch.distributed.tensor import DTensor

            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
        return norm

    # ------------------------------------------------ state dicts (single-process names and format)

    def model_state(self, model: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
        """Full weights with single-process names. FSDP gathers them (collective): on CPU on
        rank 0 only (others get {}) unless ``everywhere``."""
        if self.strategy != "fsdp":
            return self.unwrap(model).state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))

    def load_model_state(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Load full weights (every rank passes the same ones)."""
        if self.strategy != "fsdp":
            self.unwrap(model).load_state_dict(weights)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` as one process would write it. FSDP: gathered (collective),
        on rank 0 only (others get {})."""
        if self.strategy != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        by_name = get_optimizer_state_dict(model, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return by_index(by_name, param_names(model, optimizer)) if self.is_main else {}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a single-process ``optimizer.state_dict()`` (every rank passes the same one)."""
        if self.strategy != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, by_name(state, param_names(model, optimizer)),
                                 options=StateDictOptions(full_state_dict=True))

    # ------------------------------------------------ random states

    def rng_states(self) -> list[dict[str, Any]] | None:
        """Every rank's random state (:func:`checkpoint.rng_state`), gathered on rank 0; None on the
        other ranks and with one process. Collective."""
        if self.world_size == 1:
            return None
        states = [None] * self.world_size if self.is_main else None
        dist.gather_object(rng_state(), states, dst=0)
        return states

    def set_rng_state(self, saved: dict[str, Any], log: Callable[..., Any]) -> None:
        """Restore a checkpoint's random state: each rank its own when the checkpoint was saved by
        as many ranks (``saved["rng_ranks"]``), else rank 0's (``saved["rng"]``) on every rank."""
        ranks = saved.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world_size:
            set_rng_state(ranks[self.rank])
            return
        set_rng_state(saved["rng"])
        had = len(ranks) if ranks is not None else 1
        if had != self.world_size:
            log(f"the checkpoint holds the random state of {had} process{'es' if had > 1 else ''}, this run has "
                f"{self.world_size}: every process continues from rank 0's, so dropout draws differ from an "
                "uninterrupted run")

    # ------------------------------------------------ evaluation and coordination

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Model outputs (N, ...) for all of ``x``, in batches of EVAL_BATCH: with several processes
        each runs its slice, then the slices are gathered."""
        if self.world_size == 1:
            outs = [model(x[i : i + EVAL_BATCH].to(self.device)).float() for i in range(0, len(x), EVAL_BATCH)]
            return torch.cat(outs) if outs else torch.empty(0)
        sizes = [len(part) for part in torch.arange(len(x)).tensor_split(self.world_size)]
        if not sizes[0]:
            return torch.empty(0)
        local = x.tensor_split(self.world_size)[self.rank]
        k = math.ceil(sizes[0] / EVAL_BATCH)  # the same number of forwards on every rank (FSDP)
        out = torch.cat([model(local[i * EVAL_BATCH : (i + 1) * EVAL_BATCH].to(self.device)).float()
                         for i in range(k)])  # (n_r, ...)
        padded = out.new_zeros((sizes[0], *out.shape[1:]))  # (max n_r, ...): all_gather needs equal shapes
        padded[: len(out)] = out
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])  # (n, ...)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 while the others wait; its ZerotuneError is raised on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except ZerotuneError as e:
                error = e
        if self.world_size > 1:
            box = [str(error) if error is not None else None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and error is None:
                raise ZerotuneError(box[0])
        if error is not None:
            raise error
        return result

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a model: the children of each outermost ``nn.ModuleList``."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            else:
                visit(child)

    visit(model)
    return found


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the indices of ``optimizer.state_dict()``)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Optimizer state keyed by parameter name → keyed by index, as ``optimizer.state_dict()``."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`by_index`."""
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
