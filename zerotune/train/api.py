"""The train verb: a config in, a run folder out (or an existing run resumed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zerotune.config import Config, load_config
from zerotune.data.base import DataInfo
from zerotune.errors import ZerotuneError
from zerotune.run import Run, create_run, open_run, open_shared_run, read_model_json, save_model
from zerotune.train import checkpoint as ckpt
from zerotune.train.checkpoint import atomic_write_text
from zerotune.train.loop import pick_device, seed_everything, train_loop


def make_task(cfg: Config, device: torch.device):
    """Load the data and build the task object the loop trains on."""
    if cfg.task in ("classification", "regression"):
        from zerotune.data import load_data
        from zerotune.train.tasks import SupervisedTask

        data = load_data(cfg.data, cfg.task, cfg.seed)
        return SupervisedTask(data, batch_size=cfg.train.batch_size, seed=cfg.seed, loss=cfg.train.loss,
                              label_smoothing=cfg.train.label_smoothing, metrics=cfg.train.metrics,
                              augment=cfg.data.augment, device=device, num_workers=cfg.data.num_workers)
    if cfg.task in ("causal_lm", "masked_lm"):
        return shard_task(cfg, device)
    raise ZerotuneError(f"task {cfg.task!r} is trained with `zerotune finetune` or is not available")


def shard_task(cfg: Config, device: torch.device | str, *, folder: str | None = None, sampling: str | None = None,
               eval_batches: int | None = None):
    """The causal_lm or masked_lm task over token shards: ``folder``, else data.train's ``shards:DIR``.

    Windows are ``model.block_size`` tokens for a decoder trained from scratch, ``min(data.max_length,
    model.block_size)`` for a fine-tuned one (a config with a ``finetune`` section: the block size is
    the SOURCE's, often longer than the data needs) and ``min(data.max_length, model.max_position)``
    for a masked-LM encoder; ``sampling``/``eval_batches`` default to the config's ``data`` section.
    """
    from zerotune.train.tasks import LanguageModelTask, MaskedLanguageModelTask

    if folder is None:
        kind, _, folder = cfg.data.train.partition(":")
        if kind != "shards":
            raise ZerotuneError(f"data.train: task {cfg.task} reads token shards, got {cfg.data.train!r}; "
                                "make them with `zerotune prepare` and set data.train=shards:DIR")
    if cfg.task == "masked_lm":
        if cfg.model.arch != "bert":
            raise ZerotuneError(f"model.arch: task masked_lm trains an encoder (bert), got {cfg.model.arch!r}")
        make, block = MaskedLanguageModelTask, min(cfg.data.max_length, cfg.model.max_position)
    else:
        block = getattr(cfg.model, "block_size", None)
        if block is None:
            raise ZerotuneError(f"model.arch: task causal_lm needs a decoder (gpt), got {cfg.model.arch!r}")
        if cfg.finetune is not None:
            block = min(cfg.data.max_length, block)
        make = LanguageModelTask
    return make(folder, batch_size=cfg.train.batch_size, block_size=block, seed=cfg.seed,
                sampling=sampling or cfg.data.sampling, eval_batches=eval_batches or cfg.data.eval_batches,
                model_cfg=cfg.model, device=device)


def resolve_vocab(cfg: Config, info: DataInfo) -> Config:
    """A decoder/encoder whose ``model.vocab_size`` is unset takes the tokenizer's; a smaller one is an error."""
    if not hasattr(cfg.model, "vocab_size") or info.vocab_size is None:
        return cfg
    if cfg.model.vocab_size is None:
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": info.vocab_size})})
    if cfg.model.vocab_size < info.vocab_size:
        raise ZerotuneError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                            f"({info.vocab_size}); leave it unset to take the tokenizer's")
    return cfg


def default_out(config: Any) -> Path:
    name = Path(config).stem if isinstance(config, (str, Path)) else "run"
    return Path("runs") / name


def train(config: str | Path | dict | Config | None = None, *, out: str | Path | None = None,
          overwrite: bool = False, resume: str | Path | None = None, overrides: list[str] | dict | None = None,
          log=print) -> Path:
    """Train from a config (a YAML path, a mapping or a Config) into a run folder; return its path.

    Args:
        config: the config; ignored with ``resume``.
        out: the run folder (default ``runs/<config name>``); an existing one needs ``overwrite``.
        resume: a run folder to continue from its latest good checkpoint (its own config.yaml).
        overrides: ``["train.epochs=3", ...]`` or ``{"train.epochs": 3}``.

    Started by torchrun (or inside an initialised process group), each process runs this same
    call: see :mod:`zerotune.train.distributed`. Rank 0 writes the run folder and returns its path.

    Example:
        >>> run = zerotune.train("configs/digits_mlp.yaml", overrides=["train.epochs=2"], out="runs/x")
    """
    from zerotune.models import build_model
    from zerotune.train import distributed

    log = distributed.main_only(log)

    if resume is not None:
        run = open_run(resume)
        cfg = load_config(run.config)
        if run.model_json.is_file() and read_model_json(run).get("finished"):
            log(f"{run.root}: the run already finished; nothing to do")
            return run.root
        start = ckpt.latest_checkpoint(run.checkpoints)
        log(f"resuming {run.root} from {start.name}" if start
            else f"{run.root}: no checkpoint yet; starting from step 0")
    else:
        cfg = load_config(config, overrides)
        start, run = None, None
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    with distributed.session(cfg.train, pick_device(cfg.train.device), log) as par:
        device = par.device
        seed_everything(cfg.seed)
        task = make_task(cfg, device)  # validates the data before any folder is touched
        cfg = resolve_vocab(cfg, task.info)
        if hasattr(task, "model_cfg"):
            task.model_cfg = cfg.model  # with the vocabulary resolved, for the FLOPs count
        model = build_model(cfg.model, task.info).to(device)
        if run is None:
            root = Path(out or default_out(config))
            par.on_main(lambda: _new_run(root, overwrite, cfg))  # the others wait, then open it
            run = Run(root) if par.is_main else open_shared_run(root)
        if par.is_main and task.tokenizer is not None and hasattr(task.tokenizer, "save"):
            task.tokenizer.save(str(run.tokenizer))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{cfg.model.arch}: {n_params:,} parameters · {task.describe()} · device {device}")
        state = train_loop(model, task, cfg, checkpoints=run.checkpoints,
                           metrics_path=run.metrics if par.is_main else None, device=device, resume=start, log=log,
                           par=par)
        model = par.gathered_model(model, lambda: build_model(cfg.model, task.info).to(device))
        if not par.is_main:
            return run.root
    meta = {"format": "zerotune", "version": 1, "task": cfg.task, "model": cfg.model.model_dump(mode="json"),
            "data_info": task.info.to_dict(), **task.model_meta(), "seed": cfg.seed,
            "step": state.step, "best_step": state.best_step, "finished": True}
    save_model(run, model, meta)
    _finish(run, cfg, task, model, log)
    return run.root


def _new_run(root: Path, overwrite: bool, cfg: Config) -> None:
    run = create_run(root, overwrite)
    atomic_write_text(run.config, cfg.to_yaml())


def _finish(run: Run, cfg: Config, task, model, log) -> None:
    """After training: test metrics, plots and the report (the evaluation module owns these)."""
    from zerotune.evaluate.report import write_training_report

    write_training_report(run, cfg, task, model, log=log)


def resume(run: str | Path, log=print) -> Path:
    return train(resume=run, log=log)


__all__ = ["train", "resume", "make_task"]
