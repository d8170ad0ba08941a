"""Classic MLP training throughput: zerotune vs plain PyTorch loops vs Keras 3 (torch backend).

The learner's workload from the design page: an MLP 784→64→64→10 (relu), adam lr 1e-3,
cross-entropy, batch 32, one epoch over 60,000 random float32 examples of 10 classes (seeded),
on the CPU with 2 threads, all contenders in one process:

    zerotune     zerotune.train.fit.fit (the same train_loop as ``zerotune train``)
    hand loop    plain PyTorch: index the tensors with a randperm, zero_grad/forward/backward/step
    DataLoader   plain PyTorch: DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    hand loop, fused Adam   the hand loop with Adam(fused=True), as zerotune uses on CPU (reference)
    keras        Keras 3 with KERAS_BACKEND=torch: Sequential + compile + fit(verbose=0)

Each contender runs once as a warm-up (200 steps), then ``--runs`` timed epochs, round-robin so
that drifts in machine speed hit all contenders alike; the median is reported. A timed run
covers what a user waits for: building the optimizer, the loop or ``fit`` call and the epoch
(not building the model or the arrays).

    python bench/classic_throughput.py               # prints the table
    python bench/classic_throughput.py --markdown t.md   # also writes it as a Markdown table

Keras is optional (``pip install keras``, the ``bench`` extra); without it the Keras row is
skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # must be set before keras is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zerotune.models import build_model  # noqa: E402
from zerotune.models.mlp import MLPConfig  # noqa: E402
from zerotune.spec import DataInfo  # noqa: E402
from zerotune.train.fit import fit  # noqa: E402

BATCH, LR, FEATURES, CLASSES = 32, 1e-3, 784, 10


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, FEATURES), dtype=np.float32)  # (N, 784)
    y = rng.integers(0, CLASSES, n).astype(np.int64)  # (N,)
    return x, y


def torch_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES))


def zerotune_mlp() -> nn.Module:
    torch.manual_seed(0)
    info = DataInfo("tabular", [FEATURES], classes=[str(c) for c in range(CLASSES)])
    return build_model(MLPConfig(hidden=[64, 64], activation="relu"), info)


# ---------------------------------------------------------------- contenders: (x, y) → seconds


def run_zerotune(x: np.ndarray, y: np.ndarray) -> float:
    model = zerotune_mlp()
    start = time.perf_counter()
    fit(model, (x, y), optimizer="adam", lr=LR, epochs=1, batch_size=BATCH, metrics=[], device="cpu", verbose=0)
    return time.perf_counter() - start


def run_hand_loop(x: np.ndarray, y: np.ndarray, fused: bool = False) -> float:
    model = torch_mlp()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    start = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=fused)
    perm = torch.randperm(len(xt))
    for i in range(0, len(xt), BATCH):
        idx = perm[i : i + BATCH]
        opt.zero_grad()
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def run_hand_loop_fused(x: np.ndarray, y: np.ndarray) -> float:
    """The hand loop with ``Adam(fused=True)``, the optimizer kernel zerotune uses on CPU."""
    return run_hand_loop(x, y, fused=True)


def run_dataloader(x: np.ndarray, y: np.ndarray) -> float:
    model = torch_mlp()
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    start = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for xb, yb in torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True):
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def keras_runner() -> tuple[Callable[[np.ndarray, np.ndarray], float] | None, str]:
    """The Keras contender, or None and the reason it cannot run."""
    if os.environ["KERAS_BACKEND"] != "torch":
        return None, f"KERAS_BACKEND is {os.environ['KERAS_BACKEND']!r}, not 'torch'"
    try:
        import keras
    except ImportError as e:
        return None, f"keras is not installed ({e}); pip install keras"
    torch.set_num_threads(2)  # keep the thread count whatever importing keras did

    def run_keras(x: np.ndarray, y: np.ndarray) -> float:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(64, activation="relu"), keras.layers.Dense(CLASSES)])
        model.compile(optimizer=keras.optimizers.Adam(LR),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        start = time.perf_counter()
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=True, verbose=0)
        return time.perf_counter() - start

    return run_keras, f"keras {keras.__version__}"


# ---------------------------------------------------------------- report


def machine() -> dict[str, str]:
    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count())
    return {"nproc": nproc, "cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
            "threads": str(torch.get_num_threads()), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def table(results: dict[str, list[float]], cpu: dict[str, list[float]], n: int) -> list[str]:
    """Markdown rows: wall-clock medians and ratios, and the median process CPU time (all threads)."""
    rate = {name: n / statistics.median(times) for name, times in results.items()}
    hand, loader = rate["hand loop"], rate["DataLoader"]
    lines = ["| contender | median s/epoch | runs (s) | samples/s | vs hand loop | vs DataLoader | CPU s (median) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name, times in results.items():
        runs = ", ".join(f"{t:.2f}" for t in times)
        lines.append(f"| {name} | {statistics.median(times):.2f} | {runs} | {rate[name]:,.0f} | "
                     f"{rate[name] / hand:.2f}× | {rate[name] / loader:.2f}× | {statistics.median(cpu[name]):.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=60_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-keras", action="store_true", help="skip the Keras contender")
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = make_data(args.samples)
    contenders: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "zerotune fit": run_zerotune, "hand loop": run_hand_loop, "DataLoader": run_dataloader,
        "hand loop, fused Adam": run_hand_loop_fused}
    if args.no_keras:
        print("keras: skipped (--no-keras)")
    else:
        run_keras, note = keras_runner()
        print(f"keras: {note}" if run_keras else f"keras: skipped: {note}")
        if run_keras is not None:
            contenders["keras (torch backend)"] = run_keras
    torch.set_num_threads(args.threads)
    info = machine()
    print(" · ".join(f"{k} {v}" for k, v in info.items()))
    warm = 200 * BATCH
    for run in contenders.values():
        run(x[:warm], y[:warm])
    results: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    load_before = os.getloadavg()[0]
    for r in range(args.runs):
        for name, run in contenders.items():
            c0 = time.process_time()
            seconds = run(x, y)
            cpu[name].append(time.process_time() - c0)
            results[name].append(seconds)
            print(f"run {r + 1}/{args.runs} {name:>22}: {seconds:6.2f} s  {args.samples / seconds:9,.0f} samples/s  "
                  f"cpu {cpu[name][-1]:6.2f} s", flush=True)
    load = f"load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    lines = table(results, cpu, args.samples)
    print("\n".join(lines) + "\n" + load)
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n\n" + " · ".join(f"{k} {v}" for k, v in info.items())
                                 + f" · {load}\n")


if __name__ == "__main__":
    main()
