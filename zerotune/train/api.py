"""The train verb: a config in, a run folder out (or an existing run resumed), from scratch.

The model is built from the config (``model.arch``, see :data:`zerotune.models.ARCHS`) for the
data the task reads; the run skeleton (:mod:`zerotune.train.runner`) does the rest.
"""

from __future__ import annotations

from pathlib import Path

from zerotune.config import Config, load_config, training_overrides
from zerotune.errors import ZerotuneError
from zerotune.models import build_model
from zerotune.train.memory import check_fits
from zerotune.train.parallel import Parallel
from zerotune.train.runner import Setup, default_out, is_finetuning, open_to_resume, resume_run, run_training
from zerotune.train.tasks import make_task, resolve_vocab


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
        cfg = load_config(config, training_overrides(overrides, log))
        return run_training(cfg, build_from_scratch, root=Path(out or default_out(config, "run")),
                            overwrite=overwrite, log=log)
    run, cfg = open_to_resume(resume)
    if is_finetuning(cfg):
        raise ZerotuneError("a fine-tuning run: continue it with zerotune.resume(RUN) or `zerotune train --resume "
                            "RUN`, which start from its SOURCE again", path=run.root)
    return resume_run(run, cfg, build_from_scratch, log)


__all__ = ["train", "build_from_scratch"]
