"""Training from image files (data.in_memory: false) vs from memory: what the DataLoader path costs.

Writes an image folder (``--images`` 32×32 RGB PNGs in 10 classes, seeded noise), then trains
the same small CNN (``configs/digits_cnn.yaml``'s model, batch 64, no validation, one epoch)
with ``zerotune.train``:

    memory      data.in_memory: true (decoded once, then batched by index)
    files, 0    data.in_memory: false, data.num_workers: 0 (decoded in the training process)
    files, W    data.in_memory: false, data.num_workers: W for each --workers value

Reported: the whole call's wall time (loading, normalisation statistics, the epoch) and the
epoch's samples/s from the run's metrics.jsonl. Contenders alternate over ``--repeats`` rounds
and the median is reported, after one untimed warm-up run. The final weights of every contender are compared with the
in-memory run's: they are equal, because the batches are.

    python bench/image_files.py --images 6000 --workers 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import zerotune


def write_folder(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for k in range(10):
        (root / f"class{k}").mkdir(parents=True)
    for i in range(n):
        k = i % 10
        a = rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)
        a[4 * k : 4 * k + 4] = 255  # a bright band whose row says the class
        Image.fromarray(a).save(root / f"class{k}" / f"{i:06d}.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_folder(root / "img", args.images)
        base = [f"data.train=images:{root / 'img'}", "data.val_split=0", "data.test_split=0", "train.epochs=1",
                "train.batch_size=64", "train.progress=false", "data.augment.enabled=false",
                f"train.num_threads={args.threads}", "train.log_every=1000000"]
        contenders = {"memory": ["data.in_memory=true"]}
        for w in [0, *args.workers]:
            contenders[f"files, {w} worker{'s' * (w != 1)}"] = ["data.in_memory=false", f"data.num_workers={w}"]
        wall = {name: [] for name in contenders}
        rate = {name: [] for name in contenders}
        weights = {}
        zerotune.train("configs/digits_cnn.yaml", out=root / "runs" / "warm-up",  # imports and first-call costs
                       overrides=base + ["data.in_memory=true", "train.max_steps=5"], log=lambda *a: None)
        for r in range(args.repeats):
            for name, extra in contenders.items():
                out = root / "runs" / f"{r}-{name.replace(', ', '-').replace(' ', '')}"
                start = time.perf_counter()
                run = zerotune.train("configs/digits_cnn.yaml", out=out, overrides=base + extra, log=lambda *a: None)
                wall[name].append(time.perf_counter() - start)
                last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
                rate[name].append(last["samples_per_sec"])
                weights[name] = load_file(run / "model.safetensors")
        ref = weights["memory"]
        print(f"{args.images} images 32×32 RGB, batch 64, one epoch, {args.threads} threads")
        print("| contender | whole call (s, median) | epoch samples/s (median) | weights equal the in-memory run's |")
        print("|---|---:|---:|---|")
        for name in contenders:
            same = all(torch.equal(weights[name][k], ref[k]) for k in ref)
            print(f"| {name} | {statistics.median(wall[name]):.1f} | {statistics.median(rate[name]):,.0f} | "
                  f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
