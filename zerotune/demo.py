"""``zerotune demo``: the offline end-to-end tour, written into ``runs/demo/``.

Classic part: train an MLP and a CNN on the bundled 8×8 digits, evaluate both on their
held-out test split, print a metrics table, write plots and a report.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from zerotune.errors import ZerotuneError

DIGITS = {"data": {"train": "builtin:digits", "test_split": 0.2, "val_split": 0.1}, "seed": 0}


def classic_configs(quick: bool) -> dict[str, dict]:
    epochs = 8 if quick else 30
    mlp = {**DIGITS, "model": {"arch": "mlp", "hidden": [128, 64], "dropout": 0.1},
           "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.01},
           "schedule": {"name": "cosine", "warmup_steps": 50},
           "train": {"epochs": epochs, "batch_size": 32, "metrics": ["accuracy", "f1"], "progress": False}}
    configs = {"digits_mlp": mlp}
    from zerotune.models import ARCHS

    if "cnn" in ARCHS:
        configs["digits_cnn"] = {
            **DIGITS, "model": {"arch": "cnn", "channels": [32, 64], "hidden": [128], "dropout": 0.1},
            "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.01},
            "schedule": {"name": "cosine", "warmup_steps": 50},
            "train": {"epochs": max(4, epochs // 2), "batch_size": 32, "metrics": ["accuracy", "f1"],
                      "progress": False}}
    return configs


def demo(out: str | Path = "runs/demo", quick: bool = False, log=print) -> dict[str, dict]:
    """Run the tour into ``out`` (replacing earlier demo runs there); return each run's test metrics."""
    from zerotune.evaluate import evaluate
    from zerotune.train.api import train

    out = Path(out)
    if out.exists():
        if not (out / ".zerotune-demo").exists():
            raise ZerotuneError("exists and was not made by zerotune demo; choose another --out", path=out)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ".zerotune-demo").write_text("made by zerotune demo; replaced by the next demo\n")
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    log("== classic deep learning: digits (8×8, 10 classes), offline ==")
    for name, cfg in classic_configs(quick).items():
        start = time.perf_counter()
        log(f"-- {name}")
        run = train(cfg, out=out / name, log=log)
        results[name] = evaluate(run) | {"seconds": time.perf_counter() - start}
    log("")
    log(f"{'run':<14}{'accuracy':>10}{'precision':>11}{'recall':>8}{'f1':>8}{'seconds':>9}")
    for name, r in results.items():
        log(f"{name:<14}{r['accuracy']:>10.4f}{r['precision']:>11.4f}{r['recall']:>8.4f}{r['f1']:>8.4f}"
            f"{r['seconds']:>9.1f}")
    write_summary(out, results)
    log(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; runs, plots and reports in {out}/")
    return results


def write_summary(out: Path, results: dict[str, dict]) -> None:
    lines = ["# zerotune demo", "", "| run | accuracy | precision | recall | f1 |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| [{name}]({name}/report.md) | {r['accuracy']:.4f} | {r['precision']:.4f} | "
                     f"{r['recall']:.4f} | {r['f1']:.4f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
