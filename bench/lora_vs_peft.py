"""zerotune LoRA vs Hugging Face transformers + peft LoRA: one training step, same model, same settings.

Both sides train the same randomly initialised GPT-2-shaped decoder (saved once as a Hugging
Face folder; zerotune loads it with its own reader, so both start from identical weights and
the first losses must agree), fp32, eager mode (no torch.compile), 2 CPU threads, LoRA r=8,
α=16, no dropout, on the attention input and output projections (zerotune ``attn.qkv`` /
``attn.proj``, Hugging Face ``c_attn`` / ``attn.c_proj``), AdamW on the adapters only. One step
is forward → cross-entropy → backward → optimizer step on a fixed batch. zerotune attends with
``F.scaled_dot_product_attention``; the Hugging Face model runs with
``attn_implementation="eager"`` (``--hf-attn sdpa`` switches it to its SDPA path).

    step time   both models in one process, their steps interleaved (zerotune, peft, zerotune,
                ...), so a change in machine load hits both alike; the median over --steps
                timed steps of each, after --warmup untimed ones
    peak memory each side in its own subprocess, so neither sees the other's allocations: the
                process's resident-set high-water mark (Linux VmHWM) during the steps,
                minus its resident set just before them (the extra memory training needs:
                activations, gradients, optimizer state); the high-water mark is reset
                through /proc/self/clear_refs right before the first step, so model loading
                does not count. The absolute high-water mark is printed too.

Usage:
    python bench/lora_vs_peft.py [--steps 20] [--warmup 3] [--batch 8] [--seq 128] [--hf-attn eager|sdpa]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the zerotune of this checkout, not an installed one
SHAPE = {"vocab_size": 4096, "n_positions": 256, "n_embd": 256, "n_layer": 4, "n_head": 4}
RANK, ALPHA = 8, 16


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def make_folder(folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)


def build_zerotune(folder: Path):
    from zerotune.finetune.lora import apply_lora, mark_only_lora_as_trainable
    from zerotune.interop.hf_decoder import load_hf_decoder

    model, _ = load_hf_decoder(folder)
    apply_lora(model, ["attn.qkv", "attn.proj"], r=RANK, alpha=ALPHA)
    mark_only_lora_as_trainable(model)
    return model.train(), lambda x: model(x)


def build_peft(folder: Path, attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(folder, attn_implementation=attn)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["c_attn", "attn.c_proj"],
                     fan_in_fan_out=True, bias="none")
    model = get_peft_model(base, cfg)
    return model.train(), lambda x: model(input_ids=x).logits


class Trainer:
    """One side: its model, AdamW on the trainable parameters, the fixed batch; ``step()`` times one step."""

    def __init__(self, side: str, folder: Path, batch: int, seq: int, attn: str) -> None:
        import torch

        self.model, self.forward = build_zerotune(folder) if side == "zerotune" else build_peft(folder, attn)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-3)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=g)  # (B, T)
        self.y = torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=g)  # (B, T)
        self.losses: list[float] = []

    def step(self) -> float:
        import torch.nn.functional as F

        t0 = time.perf_counter()
        loss = F.cross_entropy(self.forward(self.x).flatten(0, 1), self.y.flatten())  # (B·T, V) vs (B·T,)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        dt = time.perf_counter() - t0
        self.losses.append(loss.item())
        return dt


def run_side(side: str, folder: Path, steps: int, warmup: int, batch: int, seq: int, attn: str) -> dict:
    """Peak memory of one side's training steps (run in a subprocess of its own)."""
    import torch

    torch.set_num_threads(2)
    trainer = Trainer(side, folder, batch, seq, attn)
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak()
    for _ in range(warmup + steps):
        trainer.step()
    peak = _status_kb("VmHWM")
    return {"side": side, "first_loss": trainer.losses[0], "peak_extra_mb": (peak - rss_before) / 1024,
            "peak_mb": peak / 1024, "peak_reset": reset, "trainable": sum(p.numel() for p in trainer.trainable)}


def interleaved_step_ms(folder: Path, steps: int, warmup: int, batch: int, seq: int, attn: str) -> dict[str, float]:
    """Median step time of each side, the two sides' steps alternating in this one process."""
    import torch

    torch.set_num_threads(2)
    trainers = {side: Trainer(side, folder, batch, seq, attn) for side in ("zerotune", "peft")}
    times: dict[str, list[float]] = {side: [] for side in trainers}
    for i in range(warmup + steps):
        for side, trainer in trainers.items():
            dt = trainer.step()
            if i >= warmup:
                times[side].append(dt)
    return {side: 1000 * statistics.median(t) for side, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hf-attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--side", choices=["zerotune", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        result = run_side(args.side, Path(args.folder), args.steps, args.warmup, args.batch, args.seq, args.hf_attn)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-bench"
        make_folder(folder)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": "2"}
        results = {}
        for side in ("zerotune", "peft"):
            cmd = [sys.executable, __file__, "--side", side, "--folder", str(folder), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--hf-attn", args.hf_attn]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            results[side] = json.loads(out.strip().splitlines()[-1])
        step_ms = interleaved_step_ms(folder, args.steps, args.warmup, args.batch, args.seq, args.hf_attn)
    z, p = results["zerotune"], results["peft"]
    z["step_ms"], p["step_ms"] = step_ms["zerotune"], step_ms["peft"]
    shape = ", ".join(f"{k}={v}" for k, v in SHAPE.items())
    print(f"GPT-2 shape ({shape}), batch {args.batch} × {args.seq} tokens, fp32, eager mode, 2 threads, "
          f"LoRA r={RANK} α={ALPHA} on attention; zerotune SDPA vs Hugging Face {args.hf_attn} attention; "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up")
    print(f"trainable parameters: zerotune {z['trainable']:,} · peft {p['trainable']:,}; "
          f"first loss: zerotune {z['first_loss']:.5f} · peft {p['first_loss']:.5f}")
    print()
    print("| | zerotune | transformers + peft | ratio (zerotune / peft) |")
    print("|---|---:|---:|---:|")
    print(f"| step time (ms, median) | {z['step_ms']:.1f} | {p['step_ms']:.1f} | {z['step_ms'] / p['step_ms']:.2f}× |")
    print(f"| peak extra memory during training (MB) | {z['peak_extra_mb']:.1f} | {p['peak_extra_mb']:.1f} | "
          f"{z['peak_extra_mb'] / max(p['peak_extra_mb'], 1e-9):.2f}× |")
    print(f"| process peak RSS (MB) | {z['peak_mb']:.1f} | {p['peak_mb']:.1f} | {z['peak_mb'] / p['peak_mb']:.2f}× |")
    if not (z["peak_reset"] and p["peak_reset"]):
        print("note: /proc/self/clear_refs was not writable; peaks include model loading")


if __name__ == "__main__":
    main()
