"""The run skeleton every training verb shares: a config and a recipe in, a finished run folder out.

    run_training(cfg, build, root=RUN)   join the processes → build task and model (the data is checked
                                         before any folder is touched) → make the run folder (config.yaml,
                                         tokenizer.json) → train_loop → gather the model on rank 0 →
                                         weights + model.json → report.md
    resume_run(run, cfg, build)          the same from the run's latest good checkpoint (nothing to do
                                         when it has finished)

A verb (``zerotune train``, ``zerotune finetune``) differs only in its ``build``: how it turns the
config into a :class:`Setup` (the task, the model, how to save it and what model.json records).
Started by torchrun, each process runs the same call; rank 0 alone writes the run folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zerotune.config import Config, load_config
from zerotune.data.base import spec_path
from zerotune.data.tokenizer import save_tokenizer
from zerotune.errors import ZerotuneError
from zerotune.evaluate.report import write_training_report
from zerotune.files import write_text
from zerotune.run import Run, create_run, open_run, open_shared_run, read_model_json, save_model
from zerotune.train import checkpoint as ckpt
from zerotune.train.launch import main_only, session
from zerotune.train.loop import pick_device, seed_everything, train_loop
from zerotune.train.parallel import Parallel
from zerotune.train.tasks import Task


@dataclass
class Setup:
    """What a verb builds for one run, before any folder is touched."""

    cfg: Config  # as config.yaml keeps it (data paths and the model config resolved)
    task: Task
    model: nn.Module  # on the device, its trainable parameters chosen
    rebuild: Callable[[], nn.Module]  # a fresh copy on the device: under FSDP rank 0 gathers the weights into it
    headline: str  # logged before training
    meta: dict[str, Any] = field(default_factory=dict)  # what this verb adds to model.json
    save: Callable[[Run, nn.Module, dict[str, Any]], None] = save_model  # weights, then model.json (last)
    tokenizer: Any = None  # saved as RUN/tokenizer.json in a new run


# build(cfg, par, root, resuming) -> Setup
Build = Callable[[Config, Parallel, Path, bool], Setup]


def run_training(cfg: Config, build: Build, *, root: Path, overwrite: bool = False, resuming: bool = False,
                 start: Path | None = None, log=print) -> Path:
    """Train the run at ``root`` (new, or ``resuming`` from checkpoint ``start``) as ``build`` sets it up."""
    log = main_only(log)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    with session(cfg.train, pick_device(cfg.train.device), log) as par:
        seed_everything(cfg.seed)
        setup = build(cfg, par, root, resuming)  # reads and checks the data
        if not resuming:
            inputs = input_paths(cfg)  # as given: the data, the tokenizer, the SOURCE
            par.on_main(lambda: _new_run(root, overwrite, setup, inputs))  # the others wait, then open it
        run = Run(root) if par.is_main else open_shared_run(root, par.rank)
        log(setup.headline)
        state = train_loop(setup.model, setup.task, setup.cfg, checkpoints=run.checkpoints,
                           metrics_path=run.metrics if par.is_main else None, device=par.device, resume=start,
                           log=log, par=par)
        model = par.gathered_model(setup.model, setup.rebuild)
        if not par.is_main:
            return root
    cfg, task = setup.cfg, setup.task
    meta = {"format": "zerotune", "version": 1, "task": cfg.task, "model": cfg.model.model_dump(mode="json"),
            "data_info": task.info.to_dict(), **task.model_meta(), "seed": cfg.seed, "step": state.step,
            "best_step": state.best_step, **setup.meta, "finished": True}
    setup.save(run, model, meta)
    write_training_report(run, cfg, task, model, log=log)
    return root


def resume_run(run: Run, cfg: Config, build: Build, log=print) -> Path:
    """Continue ``run`` (``cfg``: its config.yaml) from its latest good checkpoint, or from step 0 when it
    has none yet; a run that has finished is left as it is."""
    if run.model_json.is_file() and read_model_json(run).get("finished"):
        main_only(log)(f"{run.root}: the run already finished; nothing to do")
        return run.root
    start = ckpt.latest_checkpoint(run.checkpoints)
    if start is None and (ckpt.step_checkpoints(run.checkpoints) or (run.checkpoints / "best").is_dir()):
        best = run.checkpoints / "best"
        kept = ("; best/ verifies: copy it to checkpoints/step-NNNNNN (its step) to resume from it"
                if best.is_dir() and ckpt.verify(best) is None else "")
        raise ZerotuneError(f"every step checkpoint is damaged{kept}; nothing was changed (starting again at step 0 "
                            "would replace metrics.jsonl)", path=run.checkpoints)
    main_only(log)(f"resuming {run.root} from {start.name}" if start
                   else f"{run.root}: no checkpoint yet; starting from step 0")
    return run_training(cfg, build, root=run.root, resuming=True, start=start, log=log)


def open_to_resume(path: str | Path) -> tuple[Run, Config]:
    """A run folder to continue and its config (config.yaml)."""
    run = open_run(path)
    return run, load_config(run.config)


def is_finetuning(cfg: Config) -> bool:
    """Whether a run's config was made by ``zerotune finetune`` (it names the SOURCE to start from)."""
    return cfg.finetune is not None and cfg.finetune.source is not None


def input_paths(cfg: Config) -> list[Path]:
    """The files and folders a run reads, which its run folder may not be, hold or lie inside."""
    paths = [spec_path(s) for s in (cfg.data.train, cfg.data.val, cfg.data.test)]
    paths += [Path(cfg.data.tokenizer) if cfg.data.tokenizer else None]
    if is_finetuning(cfg) and Path(cfg.finetune.source).exists():
        paths.append(Path(cfg.finetune.source))
    return [p for p in paths if p is not None]


def _new_run(root: Path, overwrite: bool, setup: Setup, inputs: list[Path]) -> None:
    run = create_run(root, overwrite, inputs)
    if setup.tokenizer is not None:
        save_tokenizer(setup.tokenizer, run.tokenizer)
    write_text(run.config, setup.cfg.to_yaml())


def default_out(config: Any, fallback: str) -> Path:
    """``runs/<config file name>``, or ``runs/<fallback>`` for a config given as a mapping."""
    name = Path(config).stem if isinstance(config, (str, Path)) else fallback
    return Path("runs") / name
