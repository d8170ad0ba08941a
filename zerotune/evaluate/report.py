"""Training report: loss/metric/lr curves (plots/loss.png), test metrics and report.md."""

from __future__ import annotations

import json

from zerotune.run import Run


def read_metrics(run: Run) -> list[dict]:
    if not run.metrics.is_file():
        return []
    return [json.loads(ln) for ln in run.metrics.read_text().splitlines() if ln.strip()]


def plot_training(run: Run) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    metric = next((k for r in val for k in r if k.startswith("val_") and k != "val_loss"), None)
    run.plots.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 3 if metric else 2, figsize=(13 if metric else 9, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    if metric:
        axes[1].plot([r["step"] for r in val if metric in r], [r[metric] for r in val if metric in r], "o-")
        axes[1].set(title=metric, xlabel="step")
    axes[-1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[-1].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    fig.savefig(run.plots / "loss.png", dpi=100)
    plt.close(fig)


def write_training_report(run: Run, cfg, task, model, log=print) -> dict:
    """Evaluate on the test split (if any), plot the curves, write report.md; return test metrics."""
    test = task.final_metrics(model)
    plot_training(run)
    lines = [f"# {run.root.name}", "", f"- task: {cfg.task}", f"- model: {cfg.model.arch}",
             f"- data: {cfg.data.train}", ""]
    if test:
        split = "Validation split" if cfg.task == "causal_lm" else "Test split"
        lines += [f"## {split}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in test.items()]
        log(("val: " if cfg.task == "causal_lm" else "test: ") + "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
    lines += ["", "![curves](plots/loss.png)", ""]
    run.report.write_text("\n".join(lines))
    return test
