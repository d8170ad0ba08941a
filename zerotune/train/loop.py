"""The training loop: one function, read top to bottom.

For each optimizer step s (until train.epochs or train.max_steps, whichever comes first):

    x, y   = task.batch(s)                         the step's whole batch (pure function of seed, s)
    L      = Σ_micro task.loss(model(x_m), y_m) / |batch|   over train.grad_accum micro-batches
    ∇L     → non-finite check → clip to train.grad_clip → optimizer step → schedule step
    log every train.log_every steps; evaluate every train.eval_every steps (or each epoch),
    track the best value of early_stopping.metric, checkpoint, stop early on no improvement.

Because micro-batch losses are summed and divided by the full batch size, the update is the
same whatever train.grad_accum is (up to float rounding), and the same on N processes:
``par`` (a :class:`~zerotune.train.parallel.Parallel`) gives each process its slice of the
batch and sums across processes; with one process each of its calls is the plain operation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zerotune.config import Config, EarlyStopping
from zerotune.errors import Interrupted, RunFailed, ZerotuneError
from zerotune.files import load_state_dict_checked, write_failed, write_text
from zerotune.train import checkpoint as ckpt
from zerotune.train.optim import make_optimizer, make_scheduler, set_hyperparameters
from zerotune.train.parallel import Parallel
from zerotune.train.tasks import Task


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ZerotuneError("train.device: cuda was asked for but no CUDA device is available")
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and not (mps is not None and mps.is_available()):
        raise ZerotuneError("train.device: mps was asked for but no Apple GPU (MPS) is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16" and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class LoopState:
    """Counters saved in every checkpoint (with the optimizer, scheduler and RNG states)."""

    step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    skips: int = 0
    stopped_early: bool = False
    window_loss: float = 0.0  # train loss summed since the last log line
    window_steps: int = 0

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> LoopState:
        """The counters of a checkpoint (keys an older version saved and this one does not use are left out)."""
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


@dataclass(frozen=True)
class Watch:
    """Which validation number marks the best step (the ``best`` checkpoint), and when to stop:
    ``train.early_stopping``, else ``val_loss`` watched without ever stopping."""

    metric: str = "val_loss"
    mode: str = "min"
    min_delta: float = 0.0
    patience: float = math.inf  # evaluations without improvement before stopping
    restore_best: bool = False

    @classmethod
    def of(cls, early: EarlyStopping | None) -> Watch:
        if early is None:
            return cls()
        return cls(early.metric, early.mode, early.min_delta, early.patience, early.restore_best)

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta


class Progress:
    """How far the run is: a tqdm bar on a terminal; elsewhere (a log file, CI) one plain line every
    ``every`` seconds, so a redirected log holds no carriage-return updates."""

    SHOWN = ("loss", "val_loss", "val_accuracy", "samples_per_sec", "tokens_per_sec", "mfu")
    every = 30.0

    def __init__(self, total: int, initial: int, log) -> None:
        self.total, self.first, self.log = total, initial, log
        self.start = self.last = time.perf_counter()
        self.numbers: dict[str, float] = {}
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)

    def show(self, record: dict[str, Any]) -> None:
        """The latest numbers of a logged step, shown with the progress."""
        self.numbers |= {k: v for k, v in record.items() if k in self.SHOWN}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.numbers.items()})

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.perf_counter()
        if now - self.last >= self.every or step >= self.total:
            self.last = now
            rate = (step - self.first) / max(now - self.start, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else math.inf
            numbers = "".join(f" · {k} {v:.4g}" for k, v in self.numbers.items())
            self.log(f"step {step:,}/{self.total:,} · {rate:.3g} steps/s · ETA {eta:.0f} s{numbers}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """``metrics.jsonl`` (one object per step that logged or evaluated) and TensorBoard scalars."""

    def __init__(self, path: Path | None, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.path, self.writer = path, None
        if path is None:
            return
        if path.exists():  # resuming: drop lines past the checkpoint so no step appears twice
            keep = [ln for ln in path.read_text().splitlines() if _logged_step(ln) <= resume_step]
            write_text(path, "".join(ln + "\n" for ln in keep))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            try:
                purge = resume_step + 1 if resume_step else None
                self.writer = SummaryWriter(str(path.parent / "tb"), purge_step=purge)
            except OSError as e:
                raise write_failed(e, path.parent / "tb", "TensorBoard events") from e

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # disk full: one line naming the file; the checkpoints are untouched
            raise write_failed(e, self.path, "the file") from e
        if self.writer is not None:
            try:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.writer.add_scalar(k, v, record["step"])
            except OSError as e:
                raise write_failed(e, self.path.parent / "tb", "TensorBoard events") from e

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; a torn line (killed mid-write) sorts last and is dropped."""
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


@contextlib.contextmanager
def stop_signals():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (then it checkpoints)."""
    caught: list[int] = []
    handler = lambda signum, frame: caught.append(signum)
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield caught
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def grads_finite(params: list[nn.Parameter]) -> bool:
    """Whether every gradient is finite: one fused pass per (device, dtype) over all gradients.

    The kernel is the one ``GradScaler`` uses to find inf/NaN; it also multiplies each gradient
    by its third argument, here exactly 1. It is several times cheaper than a global norm, which
    the check needs only when clipping.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for (device, _), grads in groups.items():
        found, one = torch.zeros(1, device=device), torch.ones(1, device=device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
        except NotImplementedError:  # a backend without the kernel: the norm says it too
            with torch.no_grad():
                found = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        if found.item():
            return False
    return True


# config sections a checkpoint cannot continue with once changed (other keys apply from the resumed step on)
FIXED = {"task": (), "model": ("dropout", "attention_dropout"), "finetune": ()}


def check_resumable(saved: dict[str, Any] | None, cfg: Config, checkpoint: Path) -> None:
    """Refuse to resume with a config the checkpoint cannot honour: another task, model shape or layout,
    fine-tuning method or adapters, optimizer kind, or parameter groups (weight decay on or off).

    Raises:
        ZerotuneError: naming the first such key, its old and new values.
    """
    if saved is None:  # written before checkpoints kept their config
        return
    now = cfg.to_dict()
    changed = []
    for section, free in FIXED.items():
        old, new = saved.get(section), now.get(section)
        if not isinstance(old, dict) or not isinstance(new, dict):
            changed += [(section, old, new)] if old != new else []
            continue
        changed += [(f"{section}.{k}", old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                    if k not in free and old.get(k) != new.get(k)]
    old_optim, new_optim = saved.get("optim", {}), now["optim"]
    if old_optim.get("name", new_optim["name"]) != new_optim["name"]:
        changed.append(("optim.name", old_optim["name"], new_optim["name"]))
    if (old_optim.get("weight_decay", 0) > 0) != (new_optim["weight_decay"] > 0):  # one parameter group or two
        changed.append(("optim.weight_decay", old_optim.get("weight_decay"), new_optim["weight_decay"]))
    if changed:
        key, old, new = changed[0]
        raise ZerotuneError(f"{key}: the run's config.yaml says {new!r}, but the checkpoint was trained with "
                            f"{old!r}; put it back to resume, or start a new run", path=checkpoint)


def train_loop(model: nn.Module, task: Task, cfg: Config, *, checkpoints: Path | None = None,
               metrics_path: Path | None = None, device: torch.device | None = None,
               resume: Path | None = None, log=print, par: Parallel | None = None,
               on_record=None) -> LoopState:
    """Train ``model`` on ``task`` as ``cfg.train`` says. Returns the final loop state.

    With ``checkpoints`` set, checkpoints are written there (latest + best); with ``resume``
    (a checkpoint folder), the run continues exactly where that checkpoint left it. ``par`` is
    this process's place in a multi-process run (from ``launch.session``); under FSDP the
    model is sharded in place. ``on_record``, if given, is called with each metrics record.
    """
    t = cfg.train
    device = device or next(model.parameters()).device
    par = par or Parallel(device=device)
    steps_per_epoch = task.steps_per_epoch
    total = min(t.epochs * steps_per_epoch if t.epochs else math.inf, t.max_steps or math.inf)
    state = LoopState()
    if resume is not None:
        weights, saved = ckpt.load_checkpoint(resume, device)
        check_resumable(saved.get("config"), cfg, resume)  # before anything in the run is touched
        load_state_dict_checked(model, weights, resume)  # into the plain model, before sharding
        state = LoopState.from_saved(saved["loop"])
    model = par.wrap(model)
    optimizer = make_optimizer(model, cfg.optim, device)
    last_saved = None
    if resume is not None:
        par.load_optimizer_state(model, optimizer, saved["optimizer"])
        set_hyperparameters(optimizer, cfg.optim)  # an edited optim section applies from here on
        par.set_rng_state(saved, log)  # each process's own when saved by as many
        last_saved = state.step
    scheduler = make_scheduler(optimizer, cfg.schedule, int(total), start=state.step)
    forward = torch.compile(model) if t.compile else model
    watch = Watch.of(t.early_stopping)
    val = task.split("val")
    if t.early_stopping is not None and val is None:
        raise ZerotuneError("train.early_stopping needs a validation split: set data.val or data.val_split > 0")
    logger = MetricsLog(metrics_path, state.step, tensorboard=metrics_path is not None)
    bar = Progress(int(total), state.step, log) if t.progress and par.is_main else None

    def save(name: str | None = None) -> None:
        nonlocal last_saved
        if checkpoints is None:
            return
        weights, optim_state = par.model_state(model), par.optimizer_state(model, optimizer)  # FSDP: gathered
        rng_ranks = par.rng_states()  # several processes: each one's random state, gathered
        last_saved = state.step if name is None else last_saved
        if not par.is_main:
            return
        saved = {"optimizer": optim_state, "scheduler": scheduler.state_dict(),
                 "loop": state.__dict__, "rng": ckpt.rng_state(), "config": cfg.to_dict()}
        if rng_ranks is not None:
            saved["rng_ranks"] = rng_ranks
        ckpt.save_checkpoint(checkpoints, name or ckpt.step_name(state.step), weights, saved,
                             keep_last=t.keep_last if name is None else None)

    best_weights = None
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    window_samples, window_start = 0, time.perf_counter()
    try:
        with stop_signals() as caught:
            while state.step < total and not state.stopped_early:
                step = state.step
                # this process's share of the step's batch, as micro-batches; rows and n (examples or
                # target tokens) count the whole batch
                parts, rows, n = par.batch(task, step, t.batch_size, t.grad_accum)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = None
                seed_grad = torch.full((), par.grad_scale / n, device=device)  # backprop Σ·w/n without a division node
                try:
                    for j, (x_m, y_m) in enumerate(parts):
                        with par.grad_sync(model, last=j == len(parts) - 1):
                            with autocast_for(device, t.precision):
                                out = forward(x_m)
                            loss = task.loss(out, y_m)  # summed over the micro-batch
                            loss.backward(seed_grad)
                        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                except torch.OutOfMemoryError:
                    raise RunFailed(f"step {step}: out of memory on {device}; lower train.batch_size or raise "
                                    "train.grad_accum (same update, smaller micro-batches); the last good checkpoint "
                                    "is kept") from None
                loss_value = float(par.sum(loss_sum)) / n
                # clip_grad_norm_ also rescales every gradient; without clipping a non-finite check is enough
                if t.grad_clip or par.world_size > 1:
                    finite_grads = math.isfinite(float(par.clip_grad_norm(model, t.grad_clip or math.inf)))
                else:
                    finite_grads = grads_finite(params)
                if not (math.isfinite(loss_value) and finite_grads):
                    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    if t.on_nonfinite == "skip" and state.skips < t.max_skips:
                        state.skips += 1
                        log(f"warning: step {step}: non-finite {what}; update skipped ({state.skips}/{t.max_skips})")
                        optimizer.zero_grad(set_to_none=True)
                        state.step += 1
                        scheduler.step()
                        continue
                    raise RunFailed(
                        f"step {step}: the {what} is not finite (loss={loss_value}); the learning rate "
                        f"({scheduler.get_last_lr()[0]:.3g}) may be too high or the input may hold NaN/inf values; "
                        "the last good checkpoint is kept"
                    )
                optimizer.step()
                scheduler.step()
                state.step += 1
                state.window_loss += loss_value
                state.window_steps += 1
                window_samples += rows

                record: dict[str, Any] = {}
                save_step = bool(t.checkpoint_every) and state.step % t.checkpoint_every == 0
                end_of_epoch = state.step % steps_per_epoch == 0
                if state.step % t.log_every == 0 or state.step >= total:
                    elapsed = time.perf_counter() - window_start
                    record |= {"loss": state.window_loss / state.window_steps,
                               "lr": scheduler.get_last_lr()[0],
                               f"{task.unit}_per_sec": window_samples * task.units_per_example / max(elapsed, 1e-9)}
                    record |= task.extra_log(record, cfg)
                    if "mfu" in record:  # the throughput is all processes', the peak one device's
                        record["mfu"] /= par.world_size
                    state.window_loss, state.window_steps = 0.0, 0
                evaluate_now = (state.step % t.eval_every == 0) if t.eval_every else end_of_epoch
                if (evaluate_now or state.step >= total) and val is not None:
                    result = {f"val_{k}": v for k, v in task.evaluate(par.unwrap(model), val, par).items()}
                    record |= result
                    if watch.metric not in result:
                        raise ZerotuneError(f"train.early_stopping.metric: {watch.metric!r} is not computed; "
                                            f"choose from {', '.join(result)}")
                    if watch.improved(result[watch.metric], state.best_value):
                        state.best_value, state.best_step, state.bad_evals = result[watch.metric], state.step, 0
                        save("best")
                        if checkpoints is None and watch.restore_best:
                            best_weights = {k: v.detach().clone() for k, v in par.model_state(model, True).items()}
                    else:
                        state.bad_evals += 1
                        if state.bad_evals >= watch.patience:
                            state.stopped_early = True
                            log(f"early stopping at step {state.step}: {watch.metric} has not improved for "
                                f"{watch.patience} evaluations (best {state.best_value:.4g} at step {state.best_step})")
                    if not t.checkpoint_every:
                        save_step = True
                # the metrics line goes first: a checkpoint never runs ahead of metrics.jsonl
                if record:
                    record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), **record}
                    logger.write(record)
                    if on_record is not None:
                        on_record(record)
                    if bar is not None:
                        bar.show(record)
                if save_step:
                    save()
                if "loss" in record:  # the next window starts after this step's evaluation, checkpoint and log
                    window_samples, window_start = 0, time.perf_counter()
                if bar is not None:
                    bar.update(state.step)
                if par.any(bool(caught)):  # every process stops at the same step
                    save()
                    code = 128 + (caught[0] if caught else signal.SIGTERM)
                    then = (f"checkpoint saved; continue with: zerotune train --resume {checkpoints.parent}"
                            if checkpoints is not None else "nothing saved (no run folder)")
                    raise Interrupted(f"stopped by signal at step {state.step}; {then}", code)
        if last_saved != state.step:
            save()
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    if watch.restore_best and state.best_step is not None and state.best_step != state.step:
        weights = ckpt.load_checkpoint(checkpoints / "best", device)[0] if checkpoints is not None else best_weights
        if weights is not None:
            par.load_model_state(model, weights)
            log(f"restored the best weights (step {state.best_step}, {watch.metric} {state.best_value:.4g})")
    return state
