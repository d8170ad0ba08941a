"""How long ``zerotune --help`` and ``zerotune train --help`` take to start, against ``import torch``.

    python bench/cli_startup.py [--repeats 15] [--before DIR]

Each command runs ``--repeats`` times, one after the other, in fresh interpreters (the wall time of
the whole process); the median and the minimum are printed. ``--before DIR`` also times a checkout
of an earlier commit (``git worktree add DIR COMMIT``), imported from DIR through PYTHONPATH, in
the same run. Run it on an idle machine: the numbers are a few hundred milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str], env: dict[str, str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, env=env, cwd="/", check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--before", type=Path, help="a checkout of an earlier commit to time in the same run")
    args = ap.parse_args()
    py = sys.executable
    here = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases = [("python -c 'import torch' (floor)", [py, "-c", "import torch"], here)]
    trees = [("this checkout", here)]
    if args.before:
        trees.insert(0, (f"before ({args.before})", {**os.environ, "PYTHONPATH": str(args.before.resolve())}))
    for label, env in trees:
        probe = subprocess.run([py, "-c", "import zerotune; print(zerotune.__file__)"], env=env, cwd="/",
                               capture_output=True, text=True, check=True).stdout.strip()
        print(f"{label}: zerotune from {probe}")
        cases += [(f"zerotune --help, {label}", [py, "-m", "zerotune", "--help"], env),
                  (f"zerotune train --help, {label}", [py, "-m", "zerotune", "train", "--help"], env)]
    print(f"{'command':<52}{'median s':>10}{'min s':>8}")
    for label, argv, env in cases:
        t = timed(argv, env, args.repeats)
        print(f"{label:<52}{statistics.median(t):>10.3f}{min(t):>8.3f}")


if __name__ == "__main__":
    main()
