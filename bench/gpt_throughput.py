"""GPT training throughput on CPU: zerotune's training loop vs a plain PyTorch loop over
Hugging Face ``GPT2LMHeadModel`` of the same shape.

Both contenders run in this one process with the same threads, fp32, eager mode, SDPA
attention, the same initial weights, the same batches (one ``ShardDataset``), AdamW with the
same learning rate, betas, weight decay groups and gradient clipping. zerotune runs through
``zerotune.train.loop.train_loop`` (the loop ``zerotune train`` uses) and its tokens/s come
from the ``metrics.jsonl`` it writes; the Hugging Face loop is timed around the same work
(batch, forward, loss, backward, clip, AdamW step). Repeats are interleaved (A, B, A, B, ...)
so that other load on the machine affects both alike; the median of the repeats is reported.

Make the data first (seconds), then run:

    zerotune tokenizer train --input builtin:pydoc --kind char --vocab-size 512 --out runs/bench-tok
    zerotune prepare --input builtin:pydoc --tokenizer runs/bench-tok --out runs/bench-shards
    python bench/gpt_throughput.py --steps 50 --warmup 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to

from zerotune.config import load_config  # noqa: E402
from zerotune.interop.hf_decoder import export_hf_decoder  # noqa: E402
from zerotune.models import build_model  # noqa: E402
from zerotune.train.loop import train_loop  # noqa: E402
from zerotune.train.optim import param_groups  # noqa: E402
from zerotune.train.tasks import make_task, resolve_vocab  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def hf_model_like(model, cfg) -> GPT2LMHeadModel:
    """``GPT2LMHeadModel`` with the zerotune model's shape and weights, SDPA attention, no dropout."""
    with tempfile.TemporaryDirectory() as tmp:
        export_hf_decoder(model, cfg, tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa", dtype=torch.float32)
    assert isinstance(hf.config, GPT2Config) and hf.config.n_embd == cfg.d_model
    return hf


class _Timed:
    """The task, with the clock read when the first timed step asks for its batch."""

    def __init__(self, task, warmup: int) -> None:
        self._task, self._warmup, self.start = task, warmup, None

    def __getattr__(self, name: str):
        return getattr(self._task, name)

    def batch(self, step: int):
        if step == self._warmup:
            self.start = time.perf_counter()
        return self._task.batch(step)


def run_zerotune(model, task, cfg, steps: int, warmup: int, log_every: int) -> dict:
    """Train ``warmup + steps`` steps with the real loop; tokens/s over the steps after warm-up.

    The wall clock runs from the first timed step's batch until ``train_loop`` returns, so it
    holds everything the loop does (logging, metrics.jsonl, TensorBoard); the loop's own
    figure from metrics.jsonl (compute only between log lines) is reported beside it.
    """
    timed = _Timed(task, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        train_loop(model, timed, cfg, checkpoints=None, metrics_path=metrics, log=lambda *_: None)
        seconds = time.perf_counter() - timed.start
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    tokens = steps * cfg.train.batch_size * task.block_size
    per_window = log_every * cfg.train.batch_size * task.block_size
    windows = [r for r in records if "tokens_per_sec" in r and r["step"] > warmup]
    logged = per_window * len(windows) / sum(per_window / r["tokens_per_sec"] for r in windows)
    first = next(r for r in records if "loss" in r)  # mean loss of steps 1…log_every
    return {"tokens_per_sec": tokens / seconds, "metrics_tokens_per_sec": logged, "first_loss": first["loss"]}


def run_hf(hf: GPT2LMHeadModel, task, cfg, steps: int, warmup: int, log_every: int) -> dict:
    """A plain PyTorch loop over the same batches with the same optimizer settings."""
    o = cfg.optim
    # the same decay groups as zerotune (matrices decay; biases, norms and embeddings do not)
    optimizer = torch.optim.AdamW(param_groups(hf, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    hf.train()
    losses, start = [], None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        x, y = task.batch(step)  # (B, T), (B, T)
        optimizer.zero_grad(set_to_none=True)
        logits = hf(input_ids=x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.train.grad_clip or math.inf)
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    return {"tokens_per_sec": steps * x.numel() / seconds, "first_loss": sum(losses[:log_every]) / log_every}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "gpt_cpu_bench.yaml"))
    p.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10, help="zerotune's metrics window (divides steps and warmup)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.steps % args.log_every or args.warmup % args.log_every:
        p.error("--steps and --warmup must be multiples of --log-every")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config, [f"train.max_steps={args.warmup + args.steps}", f"train.log_every={args.log_every}",
                                    "train.progress=false", "train.eval_every=0", f"train.num_threads={args.threads}"])
    if not (cfg.model.dropout == 0 and cfg.train.grad_accum == 1 and cfg.train.precision == "fp32"):
        raise SystemExit("the benchmark compares fp32 without dropout or accumulation")
    task = make_task(cfg, torch.device("cpu"))
    task.val = None  # no evaluation after the last step: it is not training throughput
    cfg = resolve_vocab(cfg, task.info)
    task.model_cfg = cfg.model  # for the MFU column, as the train verb does
    init = build_model(cfg.model, task.info)
    init_state = {k: v.clone() for k, v in init.state_dict().items()}
    hf_init = {k: v.clone() for k, v in hf_model_like(init, cfg.model).state_dict().items()}
    n_params = sum(q.numel() for q in init.parameters())
    print(f"machine: {torch.get_num_threads()} threads · {cpu_model()} · torch {torch.__version__} · "
          f"transformers {__import__('transformers').__version__}")
    print(f"model: GPT-2 layout, {cfg.model.n_layer} layers, {cfg.model.n_head} heads, d_model {cfg.model.d_model}, "
          f"block {cfg.model.block_size}, vocab {cfg.model.vocab_size}, {n_params:,} parameters; "
          f"batch {cfg.train.batch_size}; {args.warmup} warm-up + {args.steps} timed steps × {args.repeats} repeats")

    results: dict[str, list[dict]] = {"zerotune": [], "hf": []}
    for r in range(args.repeats):
        model = build_model(cfg.model, task.info)
        model.load_state_dict(init_state)
        results["zerotune"].append(run_zerotune(model, task, cfg, args.steps, args.warmup, args.log_every))
        hf = hf_model_like(model, cfg.model)  # shape only; weights reset below
        hf.load_state_dict(hf_init)
        results["hf"].append(run_hf(hf, task, cfg, args.steps, args.warmup, args.log_every))
        print(f"repeat {r + 1}: zerotune {results['zerotune'][-1]['tokens_per_sec']:,.0f} tokens/s · "
              f"hf {results['hf'][-1]['tokens_per_sec']:,.0f} tokens/s")
    zt = statistics.median(x["tokens_per_sec"] for x in results["zerotune"])
    hf_tps = statistics.median(x["tokens_per_sec"] for x in results["hf"])
    # same weights, batches and optimizer: the first logged window's mean loss must agree
    loss_zt, loss_hf = results["zerotune"][0]["first_loss"], results["hf"][0]["first_loss"]
    print(f"mean loss of steps 1-{args.log_every}: zerotune {loss_zt:.5f} · hf {loss_hf:.5f}")
    assert abs(loss_zt - loss_hf) < 1e-3, "the two loops did not train the same model on the same batches"
    print(f"zerotune train_loop: {zt:,.0f} tokens/s (median of {args.repeats})")
    print(f"HF GPT2LMHeadModel + plain loop: {hf_tps:,.0f} tokens/s (median of {args.repeats})")
    print(f"ratio zerotune / HF: {zt / hf_tps:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"zerotune": results["zerotune"], "hf": results["hf"],
                                               "median": {"zerotune": zt, "hf": hf_tps}, "ratio": zt / hf_tps},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
