"""The finetune verb: a pretrained model (SOURCE) and a config in, a run folder out; and ``resume``.

SOURCE is a zerotune run folder, a Hugging Face folder or ``minilm`` (:mod:`zerotune.load`). The
model trained is SOURCE with the head the config's task asks for, its trainable parameters
chosen by the method (:mod:`zerotune.finetune.adapt`). Text data is tokenised with the SOURCE's
own tokenizer, cut and padded to ``data.max_length``; it is saved as ``RUN/tokenizer.json`` and
``data.tokenizer`` points there. Token shards are read as training reads them
(:func:`zerotune.train.tasks.shard_task`: ``data.sampling``, ``data.eval_batches``), in windows of
``min(data.max_length, the SOURCE's block size)``.

The run folder is the one ``train`` writes (:mod:`zerotune.train.runner`). Full and freeze runs
save the whole model; LoRA runs save only ``adapter.safetensors`` (adapters + new head) and
``model.json`` names the base (``base``: the SOURCE, ``method``, ``lora``), from which
:func:`zerotune.load.load_run` rebuilds the model. An instruction-tuned run also keeps its chat
template (``chat_template.json``), which generation uses.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from zerotune.config import Config, FinetuneConfig, load_config, training_overrides
from zerotune.data.chat import save_chat_template
from zerotune.data.tokenizer import save_tokenizer
from zerotune.errors import ZerotuneError
from zerotune.files import save_weights
from zerotune.finetune import freeze as F
from zerotune.finetune import lora as L
from zerotune.finetune.adapt import LORA_METHODS, METHODS, Pretrained, adapted_model, check_family, check_strategy
from zerotune.load import load_source_model, source_name
from zerotune.models.heads import SequenceClassifier
from zerotune.run import Run, save_model, write_model_json
from zerotune.train.api import build_from_scratch
from zerotune.train.memory import check_activations_fit
from zerotune.train.parallel import Parallel
from zerotune.train.runner import Setup, default_out, is_finetuning, open_to_resume, resume_run, run_training
from zerotune.train.tasks import Task, make_task


def _with_tokenizer(cfg: Config, path: Path) -> Config:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenizer": str(path)})})


def finetune_task(cfg: Config, pre: Pretrained, device) -> Task:
    """The task for ``cfg.task``, its data checked against the SOURCE."""
    task = make_task(cfg, device, tokenizer=pre.tokenizer)
    if cfg.task == "causal_lm" and task.info.vocab_size > pre.config.vocab_size:
        raise ZerotuneError(f"data.train: the shards' vocabulary ({task.info.vocab_size}) is larger than the "
                            f"model's ({pre.config.vocab_size}); prepare them with the SOURCE's tokenizer")
    return task


def build_finetuned(cfg: Config, par: Parallel, root: Path, resuming: bool) -> Setup:
    """SOURCE (``finetune.source``) with the task's head, adapted by ``finetune.method``."""
    ft, device = cfg.finetune, par.device
    check_strategy(ft.method, par.strategy)
    pre = load_source_model(ft.source)
    check_family(pre.family, cfg.task, ft.source)
    cfg = cfg.model_copy(update={"model": pre.config})
    text = pre.tokenizer is not None and cfg.task in ("classification", "regression")
    with tempfile.TemporaryDirectory() as tmp:
        if text:  # the data is encoded with the SOURCE's tokenizer (in the run folder once there is one)
            path = Run(root).tokenizer if resuming else Path(tmp) / "tokenizer.json"
            if not resuming:
                save_tokenizer(pre.tokenizer, path)
            cfg = _with_tokenizer(cfg, path)
        task = finetune_task(cfg, pre, device)  # validates the data before any folder is touched
    model, lora = adapted_model(pre, cfg.task, task.info, ft)
    model = model.to(device)
    check_activations_fit(model, cfg, task, device, par.world_size)
    if text and not resuming:
        cfg = _with_tokenizer(cfg, Run(root).tokenizer.resolve())
    trainable, total = F.trainable_count(model), sum(p.numel() for p in model.parameters())
    meta = {"base": ft.source, "method": ft.method, "trainable_parameters": trainable, "parameters": total, **lora}
    if ft.method == "qlora":
        meta["qlora_bits"] = ft.qlora_bits
    if isinstance(model, SequenceClassifier):
        meta["head"] = {"pooling": model.pooling}

    def save(run: Run, model, meta: dict) -> None:
        if cfg.task == "sft":  # generation formats prompts the same way
            save_chat_template(task.template, run.root)
        if ft.method in LORA_METHODS:  # the adapters and the new head; model.json names the base
            save_weights(run.adapter, L.lora_state_dict(model, also=lora["lora"]["also"]), metadata={"format": "pt"})
            write_model_json(run, meta)
        else:
            save_model(run, model, meta)

    def rebuild():  # under FSDP, rank 0 gathers the weights into a fresh copy
        return adapted_model(load_source_model(ft.source), cfg.task, task.info, ft)[0].to(device)

    headline = (f"finetune {ft.method} · {pre.family} from {ft.source}: {trainable:,} of {total:,} parameters "
                f"train · {task.describe()} · device {device}")
    return Setup(cfg, task, model, rebuild, headline, meta, save, tokenizer=pre.tokenizer)


def finetune(config: str | Path | dict | Config | None = None, source: str | Path | None = None, *,
             method: str | None = None, out: str | Path | None = None, overwrite: bool = False,
             resume: str | Path | None = None, overrides: list[str] | dict | None = None, log=print) -> Path:
    """Fine-tune SOURCE on the config's task and data into a run folder; return its path.

    Args:
        config: the config (a YAML path, a mapping or a Config); ignored with ``resume``.
        source: a zerotune run folder, a Hugging Face model folder or ``minilm``; default the config's
            ``finetune.source``.
        method: ``full``, ``freeze``, ``lora`` or ``qlora``; default ``finetune.method`` (else ``full``).
        out: the run folder (default ``runs/<config name>``); an existing one needs ``overwrite``.
        resume: a fine-tuning run folder to continue (its config.yaml holds the config and SOURCE).
        overrides: ``["train.max_steps=50", ...]`` or a mapping.

    Started by torchrun (or inside an initialised process group), each process runs this same
    call, as :func:`zerotune.train.api.train` does. Rank 0 writes the run folder and returns its path.

    Example:
        >>> run = finetune("configs/minilm_classify.yaml", "minilm", method="lora", out="runs/minilm-lora")
    """
    if resume is not None:
        run, cfg = open_to_resume(resume)
        if not is_finetuning(cfg):
            raise ZerotuneError("not a fine-tuning run (finetune.source is missing from config.yaml); "
                                "continue it with: zerotune train --resume", path=run.config)
        return resume_run(run, cfg, build_finetuned, log)
    cfg = load_config(config, training_overrides(overrides, log))
    source = source or (cfg.finetune.source if cfg.finetune is not None else None)  # the recipe may name it
    if source is None:
        raise ZerotuneError("--from: give the model to fine-tune (a run folder, a Hugging Face folder or minilm)")
    ft = (cfg.finetune or FinetuneConfig()).model_copy(update={"source": source_name(source)})
    if method is not None:
        if method not in METHODS:
            raise ZerotuneError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
        ft = ft.model_copy(update={"method": method})
    cfg = cfg.model_copy(update={"finetune": FinetuneConfig.model_validate(ft.model_dump())})
    return run_training(cfg, build_finetuned, root=Path(out or default_out(config, "finetune")),
                        overwrite=overwrite, log=log)


def resume(run: str | Path, log=print) -> Path:
    """Continue any run folder from its latest good checkpoint: a fine-tuning run (LoRA, QLoRA, a new
    head, SFT) as a fine-tuning run, from its SOURCE again; a run trained from scratch as ``train``
    does. A finished run is left as it is.

    Example:
        >>> zerotune.resume("runs/minilm-lora")
    """
    folder, cfg = open_to_resume(run)
    return resume_run(folder, cfg, build_finetuned if is_finetuning(cfg) else build_from_scratch, log)


__all__ = ["finetune", "resume", "build_finetuned", "finetune_task"]
