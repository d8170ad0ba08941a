"""Processes of a multi-process run: joining and leaving the process group (``session``),
starting N processes on this machine (``launch``), and which process speaks for the run.

    zerotune train CONFIG --nproc 4                        starts torchrun on this machine
    torchrun --nproc-per-node 4 -m zerotune train CONFIG   the same by hand (and across machines)

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set) each process joins
the process group itself: NCCL on CUDA (process r drives cuda:LOCAL_RANK), gloo on CPU. What a
process does at each step is :class:`zerotune.train.parallel.Parallel`; docs/distributed.md tells
the whole story.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from zerotune.config import TrainConfig
from zerotune.errors import DistributedError, ZerotuneError
from zerotune.train.parallel import Parallel

# Communication failures surface as RuntimeError (gloo) or DistError (NCCL, stores); these words
# tell them apart from a RuntimeError raised by the model itself.
_COMM_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe")


def env_rank() -> int:
    """This process's rank: the joined process group's, else torchrun's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0  # reported by session() as a bad environment


def should_report(error: BaseException) -> bool:
    """Whether this process prints ``error``: rank 0 always; others only for their own failures."""
    return env_rank() == 0 or isinstance(error, DistributedError)


def main_only(log: Callable[..., Any]) -> Callable[..., Any]:
    """``log`` on rank 0, a no-op elsewhere."""
    return log if env_rank() == 0 else (lambda *a, **k: None)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if text.startswith("[") and "] " in text:  # drop gloo's "[/path/pair.cc:553] " source location
        text = text.split("] ", 1)[1]
    return text.split(". This is typically", 1)[0]  # gloo's advice sentence and emoji


def is_comm_failure(error: BaseException) -> bool:
    if dist.is_available() and isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _COMM_MARKERS)


def _world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from a joined process group or torchrun's variables."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank))
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    raw = {k: os.environ.get(k) for k in names}
    if raw["WORLD_SIZE"] in (None, "", "1"):
        return 0, 1, 0
    try:
        rank, world = int(raw["RANK"] or ""), int(raw["WORLD_SIZE"] or "")
        local = int(raw["LOCAL_RANK"] or rank)
    except ValueError:
        raise DistributedError(f"environment: RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {raw}",
                               exit_code=2) from None
    if not 0 <= rank < world:
        raise DistributedError(f"environment: RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})",
                               exit_code=2)
    return rank, world, local


def strategy_for(name: str, world_size: int) -> str:
    """The strategy actually used: none on one process; ``auto`` → ddp on several."""
    if world_size == 1:
        return "none"
    return "ddp" if name == "auto" else name


@contextlib.contextmanager
def session(train: TrainConfig, device: torch.device, log: Callable[..., Any] = print) -> Iterator[Parallel]:
    """Join the run's process group when started by torchrun, and leave it at the end.

    Uses a process group that is already initialised (and leaves it so). On one process this
    yields a single-process :class:`Parallel`. A process that cannot join within
    ``train.dist_timeout`` seconds, or that loses contact with the others, raises
    :class:`DistributedError` (one line).
    """
    rank, world, local = _world()
    par = Parallel(rank, world, strategy_for(train.strategy, world), device, train.activation_checkpointing)
    if world == 1:
        if train.strategy != "auto":
            log(f"one process: train.strategy {train.strategy} has no effect (start several with --nproc or torchrun)")
        yield par
        return
    if device.type == "mps":
        raise ZerotuneError("train.device: mps cannot be shared by several processes; use cuda or cpu")
    if device.type == "cuda":
        par.device = torch.device("cuda", local)
        torch.cuda.set_device(par.device)
    owned = not dist.is_initialized()
    backend = "nccl" if par.device.type == "cuda" else "gloo"
    if owned:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=train.dist_timeout),
                                    device_id=par.device if backend == "nccl" else None)
        except (dist.DistError, ValueError) as e:
            raise DistributedError(f"rank {rank}: could not join the {world} processes of the run at {where} "
                                   f"within train.dist_timeout={train.dist_timeout}s ({_first_line(e)})") from None
    try:
        per = math.ceil(train.batch_size / world)
        log(f"{world} processes · {par.strategy} · {dist.get_backend()} · global batch {train.batch_size} "
            f"= {world} × {per} per process · micro-batch {math.ceil(per / train.grad_accum)} "
            f"(train.grad_accum {train.grad_accum})")
        try:
            yield par
        except RuntimeError as e:
            if not is_comm_failure(e):
                raise
            raise DistributedError(f"rank {rank}: lost contact with another process of the run, which stopped "
                                   f"or failed ({_first_line(e)})") from None
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- launching


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``zerotune <argv>`` as ``nproc`` processes on this machine through torchrun.

    Equivalent to ``torchrun --standalone --nproc-per-node NPROC -m zerotune ARGV``. Each
    process prints its own errors; the return value is the exit code of the first that failed
    (a process killed by a signal raises :class:`DistributedError` naming it).
    """
    if nproc < 1:
        raise ZerotuneError(f"--nproc: expected a positive number of processes, got {nproc}")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ZerotuneError("--nproc: this process was already started by torchrun; drop --nproc")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun warns when it picks one thread per process; split the cores evenly instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module", "zerotune",
                                         *argv])
    # the launcher's own notes and failure summary: each process reports for itself
    quiet = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("torch.distributed")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode > 0:  # the process printed its own error line
            return failure.exitcode
        sig = -failure.exitcode  # killed by a signal, so it could not say anything itself
        raise DistributedError(f"process {rank} of {nproc} was killed by {signal.Signals(sig).name}",
                               exit_code=128 + sig) from None
    except SignalException as e:
        return 128 + int(e.sigval)
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    return 0
