"""Greedy generation speed on CPU: zerotune ``generate`` (KV cache) vs Hugging Face
``GPT2LMHeadModel.generate(use_cache=True, do_sample=False)`` on the same weights.

The zerotune model (the shape of ``configs/gpt_cpu_bench.yaml``, randomly initialised, or a
trained run with ``--run``) is exported with ``zerotune.interop.hf_decoder.export_hf_decoder``
and loaded by ``transformers`` with SDPA attention, so both hold the same weights; the script
asserts that both produce the same tokens. Batch 1, fp32, eager, the same threads; a real
20-token prompt from the pydoc validation shard; no end-of-text stop, so every call produces
exactly ``--new-tokens`` tokens. Tokens/s counts new tokens over the whole call (prefill
included). Repeats are interleaved (A, B, A, B, ...) and the median is reported.

    zerotune tokenizer train --input builtin:pydoc --kind char --vocab-size 512 --out runs/bench-tok
    zerotune prepare --input builtin:pydoc --tokenizer runs/bench-tok --out runs/bench-shards
    python bench/generation.py --prompt-tokens 20 --new-tokens 200 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to

from zerotune.config import load_config  # noqa: E402
from zerotune.data.shards import ShardDataset  # noqa: E402
from zerotune.generate import generate  # noqa: E402
from zerotune.interop.hf_decoder import export_hf_decoder  # noqa: E402
from zerotune.models.gpt import GPT, GPTConfig  # noqa: E402


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def zerotune_model(args) -> tuple[torch.nn.Module, GPTConfig, list[int]]:
    """The model (random init from the config, or a trained run) and a prompt from the val shard."""
    cfg = load_config(args.config)
    shards = cfg.data.train.partition(":")[2]
    val = ShardDataset(ROOT / shards if not Path(shards).is_absolute() else shards, "val")
    prompt = [int(t) for t in val.batch(0, 1, args.prompt_tokens, mode="sequential")[0][0]]
    if args.run:
        from zerotune.load import load_run

        model = load_run(args.run).model
    else:
        torch.manual_seed(0)
        model_cfg = cfg.model.model_copy(update={"vocab_size": val.vocab_size, "block_size": args.block_size})
        model = GPT(model_cfg)
    return model.eval(), model.config, prompt


def time_zerotune(model, prompt: list[int], new: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = generate(model, [prompt], max_new_tokens=new, temperature=0)[0]
    return time.perf_counter() - start, out


def time_hf(hf: GPT2LMHeadModel, prompt: list[int], new: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, use_cache=True, pad_token_id=0)
    return time.perf_counter() - start, out[0, len(prompt) :].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "gpt_cpu_bench.yaml"))
    p.add_argument("--run", help="a trained zerotune run folder (default: random weights of the config's shape)")
    p.add_argument("--block-size", type=int, default=256,
                   help="positions the random-init model holds (the config's 128 cannot hold 20 + 200)")
    p.add_argument("--prompt-tokens", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model, cfg, prompt = zerotune_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf_decoder(model, cfg, tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa", dtype=torch.float32).eval()
    print(f"machine: {torch.get_num_threads()} threads · {cpu_model()} · torch {torch.__version__} · "
          f"transformers {__import__('transformers').__version__}")
    print(f"model: GPT-2 layout, {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, "
          f"block {cfg.block_size}, vocab {cfg.vocab_size}; batch 1, greedy, "
          f"{len(prompt)}-token prompt + {args.new_tokens} new tokens × {args.repeats} repeats")

    # warm-up (first-call allocations, kernel selection), and the check that both give the same tokens
    _, ours = time_zerotune(model, prompt, args.new_tokens)
    _, theirs = time_hf(hf, prompt, args.new_tokens)
    assert len(ours) == len(theirs) == args.new_tokens
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    assert same is None, f"zerotune and Hugging Face diverge at new token {same}"
    print(f"same {args.new_tokens} tokens from both: {ours[:12]} ...")

    seconds: dict[str, list[float]] = {"zerotune": [], "hf": []}
    for r in range(args.repeats):
        t, out = time_zerotune(model, prompt, args.new_tokens)
        assert out == ours
        seconds["zerotune"].append(t)
        t, out = time_hf(hf, prompt, args.new_tokens)
        assert out == theirs
        seconds["hf"].append(t)
        print(f"repeat {r + 1}: zerotune {args.new_tokens / seconds['zerotune'][-1]:,.0f} tokens/s · "
              f"hf {args.new_tokens / seconds['hf'][-1]:,.0f} tokens/s")
    zt = args.new_tokens / statistics.median(seconds["zerotune"])
    hf_tps = args.new_tokens / statistics.median(seconds["hf"])
    print(f"zerotune generate (KV cache): {zt:,.0f} tokens/s (median of {args.repeats})")
    print(f"HF generate (use_cache=True): {hf_tps:,.0f} tokens/s (median of {args.repeats})")
    print(f"ratio zerotune / HF: {zt / hf_tps:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": seconds, "tokens_per_sec": {"zerotune": zt, "hf": hf_tps},
                                               "ratio": zt / hf_tps}, indent=2) + "\n")


if __name__ == "__main__":
    main()
