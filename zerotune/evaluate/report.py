"""The training report: the curves (``plots/loss.png``), the held-out metrics and ``report.md``."""

from __future__ import annotations

from typing import Any

from torch import nn

from zerotune.evaluate.plots import plot_training
from zerotune.files import iter_jsonl, write_text
from zerotune.run import Run


def read_metrics(run: Run) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, in order (none before the first log step)."""
    return [record for _, record in iter_jsonl(run.metrics)] if run.metrics.is_file() else []


def write_training_report(run: Run, cfg, task, model: nn.Module, log=print) -> dict[str, float]:
    """Evaluate the task's held-out split (test, or val for language models), plot the curves, write
    report.md; return the metrics."""
    data = task.split(task.final_split)
    metrics = task.evaluate(model, data) if data is not None else {}
    plot_training(read_metrics(run), run.plots / "loss.png")
    lines = [f"# {run.root.name}", "", f"- task: {cfg.task}", f"- model: {cfg.model.arch}"]
    if cfg.finetune is not None and cfg.finetune.source is not None:
        lines += [f"- fine-tuned from: {cfg.finetune.source}", f"- method: {cfg.finetune.method}"]
    lines += [f"- data: {cfg.data.train}", ""]
    if metrics:
        test = task.final_split == "test"
        lines += [f"## {'Test' if test else 'Validation'} split", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
        log(("test: " if test else "val: ") + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    lines += ["", "![curves](plots/loss.png)", ""]
    write_text(run.report, "\n".join(lines))
    return metrics
