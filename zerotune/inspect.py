"""Look inside a model: a layer table, parameter counts, FLOPs per sample and memory.

FLOPs are counted, not estimated: one forward pass of a batch of 1 runs under
``torch.utils.flop_counter.FlopCounterMode``, which adds up the matrix products and
convolutions that actually execute (a Linear F→O is 2·F·O, a conv 2·C_in·K²·C_out per output
pixel; elementwise ops are not counted). Fused recurrent kernels (LSTM on CPU, cuDNN RNNs)
have no built-in formula, so :data:`RNN_FLOP_FORMULAS` supplies one: each token runs every
input-to-hidden and hidden-to-hidden matrix once, 2·N·Σ numel(W).

Example:
    >>> report = inspect_model(model, example_input(info))
    >>> print(format_report(report))
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.flop_counter import FlopCounterMode

from zerotune.config import FinetuneConfig, load_config
from zerotune.data.shards import ShardDataset
from zerotune.data.sources import load_source
from zerotune.data.tokenizer import load_tokenizer
from zerotune.errors import ZerotuneError
from zerotune.finetune.api import build_finetuned
from zerotune.load import load_run, source_name
from zerotune.models import build_model
from zerotune.models.gpt import flops_per_token, kv_cache_bytes_per_token, memory_estimate, num_params
from zerotune.spec import DataInfo
from zerotune.train.parallel import Parallel
from zerotune.train.tasks import resolve_vocab
from zerotune.units import human

aten = torch.ops.aten


def _tokens(input_shape: list[int]) -> int:
    # (T, B, F), (B, T, F) or packed (N, F): every row but the feature dim is one token step
    return math.prod(input_shape[:-1])


def _mkldnn_rnn_layer_flop(input_shape, w_ih_shape, w_hh_shape, *args, out_shape=None, **kwargs) -> int:
    """One layer, one direction (how CPU LSTMs run): 2·N·(numel W_ih + numel W_hh)."""
    return 2 * _tokens(input_shape) * (math.prod(w_ih_shape) + math.prod(w_hh_shape))


def _cudnn_rnn_flop(input_shape, weight_shapes, *args, out_shape=None, **kwargs) -> int:
    """All layers and directions at once: every 2-D weight is applied once per token."""
    return 2 * _tokens(input_shape) * sum(math.prod(s) for s in weight_shapes if len(s) == 2)


RNN_FLOP_FORMULAS = {
    aten.mkldnn_rnn_layer: _mkldnn_rnn_layer_flop,
    aten._cudnn_rnn: _cudnn_rnn_flop,
}


@dataclass
class LayerRow:
    """One row of the layer table: a module that owns parameters or has no children."""

    name: str
    type: str
    output_shape: list[int] | str | None  # None: not called in the forward pass
    params: int  # parameters owned directly by this module
    flops: int  # forward FLOPs per sample inside this module (children included)


@dataclass
class InspectReport:
    rows: list[LayerRow] = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    flops_per_sample: int = 0  # forward pass of one example
    param_bytes: int = 0
    buffer_bytes: int = 0  # BatchNorm running statistics and the like
    # weights + a gradient and Adam's two moments per trainable weight, activations not included
    train_state_bytes: int = 0
    input_shape: list[int] = field(default_factory=list)
    input_dtype: str = ""

    def to_dict(self) -> dict:
        return {
            "rows": [row.__dict__ for row in self.rows],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "flops_per_sample": self.flops_per_sample,
            "param_bytes": self.param_bytes,
            "buffer_bytes": self.buffer_bytes,
            "train_state_bytes": self.train_state_bytes,
            "input_shape": self.input_shape,
            "input_dtype": self.input_dtype,
        }


def example_input(info: DataInfo, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random input of the shape and dtype a model built for ``info`` expects.

    Images, tabular and sequence data give standard-normal floats ``(batch, *input_shape)``;
    token data gives ids ``(batch, T)`` drawn from the vocabulary, never the padding id.

    Raises:
        ZerotuneError: unknown data kind, or token data without a vocab_size.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *[int(s) for s in info.input_shape])
    if info.kind in ("image", "tabular", "sequence"):
        return torch.randn(shape, generator=g)
    if info.kind == "tokens":
        if not info.vocab_size or info.vocab_size < (2 if info.pad_id is not None else 1):
            raise ZerotuneError(f"data info: token data needs a vocab_size, got {info.vocab_size!r}")
        if info.pad_id is None:
            return torch.randint(0, info.vocab_size, shape, generator=g)
        ids = torch.randint(0, info.vocab_size - 1, shape, generator=g)
        return ids + (ids >= info.pad_id).long()  # skip over the padding id
    raise ZerotuneError(
        f"data info: unknown data kind {info.kind!r}; expected image, tabular, sequence or tokens"
    )


def _shape_of(out: object) -> list[int] | str | None:
    if isinstance(out, PackedSequence):
        return f"packed {list(out.data.shape)}"
    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, (tuple, list)) and out:
        return _shape_of(out[0])
    return None


def _unique(tensors) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)  # tied weights count once
    return list(seen.values())


def inspect_model(model: nn.Module, example: torch.Tensor) -> InspectReport:
    """Run ``example[:1]`` through ``model`` once (eval mode, no grad) and describe the model.

    The example is moved to the model's device. The model's train/eval mode is restored
    afterwards; its weights and buffers are not changed.
    """
    first = next(model.parameters(), None)
    example = example[:1] if first is None else example[:1].to(first.device)
    rows: dict[str, LayerRow] = {}
    handles = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own == 0 and any(True for _ in module.children()):
            continue  # a pure container; its children have rows
        row = LayerRow(name or "(model)", type(module).__name__, None, own, 0)
        rows[name] = row

        def hook(mod, args, out, row=row):
            if row.output_shape is None:
                row.output_shape = _shape_of(out)

        handles.append(module.register_forward_hook(hook))

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=RNN_FLOP_FORMULAS)
    try:
        with torch.no_grad(), counter:
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    by_module = counter.get_flop_counts()
    root = type(model).__name__
    for name, row in rows.items():
        key = f"{root}.{name}" if name else root
        row.flops = int(sum(by_module.get(key, {}).values()))

    params = _unique(model.parameters())
    buffers = _unique(model.buffers())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    trainable_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return InspectReport(
        rows=list(rows.values()),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        flops_per_sample=int(counter.get_total_flops()),
        param_bytes=param_bytes,
        buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
        train_state_bytes=param_bytes + 3 * trainable_bytes,
        input_shape=list(example.shape[1:]),
        input_dtype=str(example.dtype).removeprefix("torch."),
    )


def format_report(report: InspectReport) -> str:
    """The report as a plain-text table followed by the totals."""
    header = ("layer", "type", "output shape", "params", "FLOPs")
    body = []
    for r in report.rows:
        shape = "-" if r.output_shape is None else str(r.output_shape)
        body.append((r.name, r.type, shape, f"{r.params:,}", human(r.flops) if r.flops else "-"))
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:3], widths[:3], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[3:], widths[3:], strict=True)]
        return "  ".join(left + right).rstrip()

    rule = "-" * len(line(header))
    trainable, frozen = report.trainable_params, report.total_params - report.trainable_params
    lines = [line(header), rule, *(line(row) for row in body), rule]
    lines += [
        f"input             {report.input_shape} {report.input_dtype} per example",
        f"parameters        {report.total_params:,} ({trainable:,} trainable, {frozen:,} frozen)",
        f"FLOPs / example   {report.flops_per_sample:,} ({human(report.flops_per_sample)}, forward)",
        f"parameter memory  {human(report.param_bytes, 'B')}",
        f"buffer memory     {human(report.buffer_bytes, 'B')}",
        f"training state    {human(report.train_state_bytes, 'B')} (weights, grads, Adam moments)",
    ]
    return "\n".join(lines)


# what idx: and cifar: folders hold, for a recipe inspected before its data is downloaded
STANDARD = {"idx": DataInfo("image", [1, 28, 28], classes=[str(i) for i in range(10)]),
            "cifar": DataInfo("image", [3, 32, 32], classes=[str(i) for i in range(10)])}
ASSUMED_VOCAB = 2048  # counted with, and said so, when a language model's vocabulary is not known yet


def _info_for(cfg) -> tuple[DataInfo, list[str]]:
    """The data description a config's model is built for, reading as little data as possible, and notes
    on what had to be assumed because the data is not there yet."""
    kind, _, arg = cfg.data.train.partition(":")
    if cfg.task in ("causal_lm", "masked_lm", "sft"):
        vocab, notes = getattr(cfg.model, "vocab_size", None), []
        if vocab is None and kind == "shards" and (Path(arg) / "index.json").is_file():
            vocab = ShardDataset(arg, "train").vocab_size
        if vocab is None and cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
            vocab = load_tokenizer(cfg.data.tokenizer).get_vocab_size()
        if vocab is None:
            vocab = ASSUMED_VOCAB
            missing = cfg.data.tokenizer if cfg.task == "sft" else cfg.data.train
            notes.append(f"note: {missing} is not there yet, so the vocabulary is unknown: counted with "
                         f"vocab_size {ASSUMED_VOCAB:,} (prepare the data, or set model.vocab_size, for the real "
                         "count)")
        if cfg.task == "masked_lm":
            return DataInfo("tokens", [min(cfg.data.max_length, cfg.model.max_position)], target="masked_lm",
                            vocab_size=vocab), notes
        return DataInfo("tokens", [cfg.model.block_size], target="causal_lm", vocab_size=vocab), notes
    try:
        info = load_source(cfg.data.train, cfg.data).info
    except ZerotuneError:
        if kind not in STANDARD or Path(arg).exists():
            raise
        info = DataInfo(**STANDARD[kind].to_dict())
        return info, [f"note: {arg} is not there yet: inspected for the standard {kind} shape {info.input_shape}"]
    if cfg.task == "regression":
        info.target, info.classes = "regression", []
    return info, []


def gpt_lines(cfg, batch: int, precision: str) -> list[str]:
    mem = memory_estimate(cfg, batch, cfg.block_size, precision)
    el = 4 if precision == "fp32" else 2
    return [
        f"parameters (no embeddings)  {num_params(cfg):,}   with embeddings {num_params(cfg, embeddings=True):,}",
        f"FLOPs / token (training)    {human(flops_per_token(cfg, cfg.block_size))} "
        "(6·N + 12·L·T·d; N without embeddings)",
        f"KV cache / token            {human(kv_cache_bytes_per_token(cfg, el), 'B')} ({precision})",
        f"memory, batch {batch} × {cfg.block_size} tokens, {precision}: "
        f"weights {human(mem['params'], 'B')} · grads {human(mem['grads'], 'B')} · "
        f"AdamW {human(mem['optimizer'], 'B')} · activations {human(mem['activations'], 'B')} · "
        f"training total ≈ {human(mem['train_total'], 'B')} · inference with full KV cache ≈ "
        f"{human(mem['inference_total'], 'B')}",
    ]


def inspect(target: str | Path, overrides: list[str] | None = None, batch_size: int | None = None,
            source: str | None = None) -> dict:
    """``zerotune.inspect``: what a config or a run folder builds, as a dict.

    Keys: ``rows`` (the layer table: name, type, output_shape, params, flops), ``total_params``,
    ``trainable_params``, ``flops_per_sample``, ``param_bytes``, ``buffer_bytes``, ``train_state_bytes``,
    ``input_shape``, ``input_dtype``, ``estimates`` (for a GPT: FLOPs per token, KV cache, memory) and
    ``notes`` (what was assumed because the data is not there yet). A fine-tuning recipe is inspected
    as the model it trains (``source``, else its ``finetune.source``).

    Example:
        >>> zerotune.inspect("configs/digits_mlp.yaml")["total_params"]
        17226
    """
    report, extra, notes = _inspected(str(target), overrides, batch_size, source)
    return report.to_dict() | {"estimates": extra, "notes": notes}


def inspect_target(target: str, overrides: list[str] | None = None, batch_size: int | None = None,
                   as_json: bool = False, source: str | None = None) -> str:
    """``zerotune inspect CONFIG|RUN``: the layer table, parameter count, FLOPs and memory as text (or JSON)."""
    if as_json:
        return json.dumps(inspect(target, overrides, batch_size, source))
    report, extra, notes = _inspected(target, overrides, batch_size, source)
    return "\n".join([*notes, format_report(report), *extra])


def _inspected(target: str, overrides: list[str] | None, batch_size: int | None,
               source: str | None) -> tuple[InspectReport, list[str], list[str]]:
    """The report, the GPT estimates and the notes for :func:`inspect`.

    A fine-tuning recipe (a ``finetune`` section) is inspected as the model it trains: ``source`` (else the
    recipe's ``finetune.source``) with the task's head and the method's trainable parameters.
    """
    path = Path(target)
    notes: list[str] = []
    if path.is_dir():
        loaded = load_run(path)
        cfg = load_config(loaded.run.config)
        model, info = loaded.model, loaded.info
    else:
        cfg = load_config(path, overrides)
        source = source or (cfg.finetune.source if cfg.finetune is not None else None)
        if source is not None:
            model, cfg, info = _finetuned(cfg, source)
        elif cfg.finetune is not None:
            raise ZerotuneError("--from: a fine-tuning recipe is the model it adapts; give it (a run folder, a "
                                "Hugging Face folder or minilm)", path=path)
        else:
            info, notes = _info_for(cfg)
            cfg = resolve_vocab(cfg, info)
            model = build_model(cfg.model, info)
    if info.kind == "tokens" and cfg.model.arch == "gpt":
        info = DataInfo(info.kind, [min(info.input_shape[0], 64)], info.target, info.classes, info.vocab_size,
                        info.pad_id)  # a short sequence is enough for the per-layer table
    report = inspect_model(model, example_input(info))
    batch = batch_size or cfg.train.batch_size
    precision = "bf16" if cfg.train.precision == "bf16" else "fp32"
    extra = gpt_lines(cfg.model, batch, precision) if cfg.model.arch == "gpt" else []
    return report, extra, notes


def _finetuned(cfg, source: str):
    """The model, config and data description ``zerotune finetune`` would train (its own recipe, so both
    agree; nothing is written)."""
    ft = (cfg.finetune or FinetuneConfig()).model_copy(update={"source": source_name(source)})
    cfg = cfg.model_copy(update={"finetune": ft})
    with tempfile.TemporaryDirectory() as tmp:
        setup = build_finetuned(cfg, Parallel(), Path(tmp) / "run", False)
    return setup.model, setup.cfg, setup.task.info
