"""``zerotune.evaluate``: metrics for a trained run (predictions: :mod:`zerotune.evaluate.predict`).

Without ``data``, ``evaluate`` uses the run's held-out test split, rebuilt exactly from the
run's own config: ``data.test``, else the source's own test files (IDX t10k, CIFAR
test_batch), else the seeded ``data.test_split`` of the train pool.

The loss is the task's own training loss (``train.loss``, ``train.label_smoothing``), so
``eval.json``'s ``loss`` on the val split is the ``val_loss`` of ``metrics.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zerotune.config import Config, load_config
from zerotune.data.base import Split, spec_path
from zerotune.data.sources import load_source
from zerotune.data.splits import Data, load_data
from zerotune.errors import ZerotuneError
from zerotune.evaluate import metrics as M
from zerotune.evaluate.plots import plot_confusion_matrix
from zerotune.files import check_output_file, write_json
from zerotune.load import LoadedRun, load_run, model_inputs
from zerotune.run import open_run
from zerotune.train.tasks import SupervisedTask, make_sft_task, shard_task, supervised_task

CLASSIFICATION_METRICS = ["accuracy", "precision", "recall", "f1", "top5_accuracy", "auroc"]
REGRESSION_METRICS = ["mse", "mae", "r2"]
SPLITS = ("test", "val", "train")


def _run_config(loaded: LoadedRun) -> Config:
    """The run's config, with text encoded by the run's own tokenizer (its vocabulary, not a new one)."""
    cfg = load_config(loaded.run.config)
    if loaded.run.tokenizer.is_file():
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenizer": str(loaded.run.tokenizer)})})
    return cfg


def _external_split(loaded: LoadedRun, cfg: Config, spec: str) -> Split:
    """Load ``spec`` and bring it into the run's space: same normalisation, labels by name."""
    source = load_source(spec, cfg.data)
    split = source.test if source.test is not None else source.train
    info = loaded.info
    if list(source.info.input_shape) != list(info.input_shape) and info.kind != "tokens":
        raise ZerotuneError(f"data spec {spec!r}: examples have shape {source.info.input_shape}, "
                            f"the model expects {info.input_shape}")
    y = split.y
    if info.target == "classification" and source.info.target != "classification":
        raise ZerotuneError(f"data spec {spec!r}: its labels are real numbers, but the model is a classifier")
    if info.target == "classification":
        names = {c: i for i, c in enumerate(info.classes)}
        unknown = [c for c in source.info.classes if c not in names]
        if unknown:
            raise ZerotuneError(f"data spec {spec!r}: labels {unknown[:5]} are not among the model's classes")
        y = torch.tensor([names[c] for c in source.info.classes], dtype=torch.long)[y]
    pre = loaded.preprocess
    return Split(pre.x(split.x), pre.y(y.float()) if info.target == "regression" else y)


def _split_of(task: SupervisedTask, split: str, loaded: LoadedRun) -> Split:
    examples = task.split(split)
    if examples is None:
        raise ZerotuneError(f"the run has no {split} split (set data.{split} or data.{split}_split in its config)",
                            path=loaded.run.root)
    return examples


def evaluate(run: str | Path, data: str | None = None, split: str = "test", plots: bool = True,
             output: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate a run; write the metrics as JSON (and the confusion matrix plot) and return them.

    Classification: loss, accuracy, precision, recall, f1 (macro), top-5 accuracy, AUROC, per-class
    scores and the confusion matrix. Regression: loss, mse, mae, r2. Language models: loss and
    perplexity on the val split of their shards. Always ``split`` and ``n``.

    ``output`` defaults to ``RUN/eval.json``, with the plot in ``RUN/plots/confusion_matrix.png``;
    elsewhere the plot is ``NAME_confusion_matrix.png`` beside it. Existing ones are replaced only
    with ``overwrite`` (an earlier evaluation is not lost by a second one on other data).

    Example:
        >>> zerotune.evaluate("runs/digits_mlp")["accuracy"]
        >>> zerotune.evaluate("runs/digits_mlp", data="csv:new.csv", output="new_eval.json")   # the run's normalisation
    """
    if split not in SPLITS:
        raise ZerotuneError(f"--split: expected test, val or train, got {split!r}")
    source = open_run(run)
    output = Path(output) if output is not None else source.eval_json
    plot = None
    if plots:
        plot = (source.plots / "confusion_matrix.png" if output == source.eval_json
                else output.with_name(f"{output.stem}_confusion_matrix.png"))
    inputs = [*model_inputs(source), *filter(None, [spec_path(data) if data else None])]
    for path in filter(None, [output, plot]):
        check_output_file(path, overwrite=overwrite, inputs=inputs)
    loaded = load_run(run)
    result = measure(loaded, data, split, plot)
    write_json(output, result)
    return result


def measure(loaded: LoadedRun, data: str | None = None, split: str = "test",
            plot: Path | None = None) -> dict[str, Any]:
    """The metrics :func:`evaluate` reports, for a loaded run, without writing them (a classifier's
    confusion matrix plot to ``plot`` if given)."""
    task = loaded.meta["task"]
    if task in ("causal_lm", "masked_lm"):
        return evaluate_language_model(loaded, data)
    if task == "sft":
        return evaluate_instructions(loaded, data)
    if task not in ("classification", "regression"):
        raise ZerotuneError(f"evaluate for task {task!r} is not available in this version")
    cfg = _run_config(loaded)
    if data:
        examples = _external_split(loaded, cfg, data)
        held = supervised_task(cfg, Data(examples, None, examples, loaded.info, loaded.preprocess), "cpu")
    else:
        held = supervised_task(cfg, load_data(cfg.data, cfg.task, cfg.seed), "cpu")
        examples = _split_of(held, split, loaded)
    out = held.outputs(loaded.model, examples.x)
    result: dict[str, Any] = {"split": data or split, "n": len(examples)}
    if loaded.info.target != "classification":
        return result | held.score(out, examples.y, REGRESSION_METRICS)
    y = examples.y
    names = [m for m in CLASSIFICATION_METRICS if not (m == "auroc" and len(torch.unique(y)) < 2)]
    result |= held.score(out, y, names)
    result["per_class"] = M.per_class(out, y, loaded.info.classes)
    cm = M.confusion_matrix(out, y)
    result["confusion_matrix"] = cm.tolist()
    if plot is not None:
        plot_confusion_matrix(cm, loaded.info.classes, plot)
    return result


def evaluate_language_model(loaded: LoadedRun, data: str | None = None) -> dict[str, Any]:
    """Mean next-token loss (nats per token) and perplexity on the val split of the run's shards
    (or of ``data``, a ``shards:DIR``)."""
    cfg = load_config(loaded.run.config)
    spec = data or cfg.data.train
    kind, _, folder = spec.partition(":")
    if kind != "shards":
        raise ZerotuneError(f"--data: a language model is evaluated on token shards (shards:DIR), got {spec!r}")
    task = shard_task(cfg, "cpu", folder=folder, sampling="sequential", eval_batches=10**9)  # all of the val split
    val = task.split("val")
    if val is None:
        raise ZerotuneError("the shards have no val split to evaluate on", path=folder)
    if task.info.vocab_size > loaded.info.vocab_size:
        raise ZerotuneError(f"the shards' vocabulary ({task.info.vocab_size}) is larger than the model's "
                            f"({loaded.info.vocab_size}); they were made with another tokenizer", path=folder)
    return {"split": f"{spec} (val)", "n": val.n_tokens} | task.evaluate(loaded.model, val)


def evaluate_instructions(loaded: LoadedRun, data: str | None = None) -> dict[str, Any]:
    """An instruction-tuned run: loss (nats per answer token), perplexity and token accuracy on its
    held-out instructions (``data.val`` or the seeded ``data.val_split``), or on all of ``data``."""
    cfg = load_config(loaded.run.config)
    if data:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": data, "val": data})})
    task = make_sft_task(cfg, loaded.tokenizer, "cpu")
    val = task.split("val")
    if val is None:
        raise ZerotuneError("the run has no held-out instructions (set data.val or data.val_split)",
                            path=loaded.run.root)
    return {"split": f"{data} (all)" if data else "val"} | task.evaluate(loaded.model, val)
