"""The command line: parse arguments, call one library function per verb, nothing else.

Errors in input (config, data, checkpoint, arguments) print one line on stderr and exit 2;
``--debug`` shows the traceback instead. Anything else that goes wrong is one line too
(``error: internal error in VERB: ...``, exit 1): no traceback without ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from zerotune.errors import ZerotuneError


def whole(low: int, high: int = 2**63 - 1):
    """An argparse type: a whole number in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {value}")
        return value
    return parse


SEED = whole(0, 2**32 - 1)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ZerotuneError line, not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ZerotuneError(f"{self.prog}: {message} (see --help)")


def _train(a: argparse.Namespace) -> int:
    from zerotune.train.api import train
    from zerotune.train.launch import env_rank

    if a.nproc is not None and a.nproc != 1:
        return _launch(a)
    if a.resume:
        from zerotune.finetune.api import resume

        if a.config or a.set:
            raise ZerotuneError("--resume continues a run with its own config.yaml; do not pass CONFIG or --set")
        resume(a.resume)  # a fine-tuning run continues as one
        return 0
    if not a.config:
        raise ZerotuneError("zerotune train: give a CONFIG file, or --resume RUN")
    run = train(a.config, out=a.out, overwrite=a.overwrite, overrides=a.set)
    if env_rank() == 0:
        print(f"run folder: {run}")
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """The command line as given, less ``--nproc N`` (or ``--nproc=N``, or a prefix argparse accepts)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag, eq, _ = arg.partition("=")
        if len(flag) > 2 and "--nproc".startswith(flag):
            skip = not eq
            continue
        out.append(arg)
    return out


def _launch(a: argparse.Namespace) -> int:
    """The same command as ``a.nproc`` processes, through torchrun (see docs/distributed.md): every
    argument is passed through as it was given."""
    from zerotune.train.launch import launch

    return launch(a.nproc, without_nproc(a.argv))


def _finetune(a: argparse.Namespace) -> int:
    from zerotune.finetune.api import finetune
    from zerotune.train.launch import env_rank

    if a.nproc is not None and a.nproc != 1:
        return _launch(a)
    if a.resume:
        if a.config or a.set or a.source:
            raise ZerotuneError("--resume continues a run with its own config.yaml; "
                                "do not pass CONFIG, --from or --set")
        finetune(resume=a.resume)
        return 0
    if not a.config:
        raise ZerotuneError("zerotune finetune: give a CONFIG file and --from SOURCE, or --resume RUN")
    run = finetune(a.config, a.source, method=a.method, out=a.out, overwrite=a.overwrite, overrides=a.set)
    if env_rank() == 0:
        print(f"run folder: {run}")
    return 0


def _export(a: argparse.Namespace) -> int:
    from zerotune.interop.export import export

    print(f"exported: {export(a.run, format=a.format, out=a.out, overwrite=a.overwrite)}")
    return 0


def _prune(a: argparse.Namespace) -> int:
    from zerotune.compress.api import prune

    prune(a.run, amount=a.amount, scope=a.scope, out=a.out, overwrite=a.overwrite,
          include_embeddings=a.include_embeddings, data=a.data)
    return 0


def _quantize(a: argparse.Namespace) -> int:
    from zerotune.compress.api import quantize

    quantize(a.run, bits=a.bits, out=a.out, overwrite=a.overwrite, data=a.data)
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from zerotune.evaluate.api import evaluate

    result = evaluate(a.run, data=a.data, split=a.split, output=a.output, overwrite=a.overwrite)
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if isinstance(v, float):
                print(f"{k:>16}  {v:.4f}")
            elif not isinstance(v, (list, dict)):
                print(f"{k:>16}  {v}")
        print(f"written: {a.output or Path(a.run) / 'eval.json'}")
    return 0


def _predict(a: argparse.Namespace) -> int:
    from zerotune.evaluate.predict import predict

    print(f"predictions: {predict(a.run, a.input, a.output, overwrite=a.overwrite, top_k=a.top_k, format=a.format)}")
    return 0


def _demo(a: argparse.Namespace) -> int:
    from zerotune.demo import demo

    demo(out=a.out, quick=a.quick)
    return 0


def _download(a: argparse.Namespace) -> int:
    from zerotune.data.download import DATASETS, download

    files = download(a.name, a.dest, mirror=a.mirror, overwrite=a.overwrite)
    print(f"{len(files)} files verified in {a.dest}; use the data spec {DATASETS[a.name].spec.format(dest=a.dest)}")
    return 0


def _tokenizer_train(a: argparse.Namespace) -> int:
    from zerotune.data.tokenizer import train_tokenizer

    if a.vocab_size is None and a.kind != "char":
        raise ZerotuneError(f"--vocab-size: required for a {a.kind} tokenizer (only --kind char takes the corpus's "
                            "alphabet)")
    path = train_tokenizer(a.input, a.vocab_size, a.out, kind=a.kind, text_field=a.text_field, overwrite=a.overwrite)
    print(f"tokenizer: {path}")
    return 0


def _prepare(a: argparse.Namespace) -> int:
    from zerotune.data.shards import prepare

    counts = prepare(a.input, a.tokenizer, a.out, val_fraction=a.val_fraction, seed=a.seed, min_chars=a.min_chars,
                     max_chars=a.max_chars, split_chars=a.split_chars, text_field=a.text_field,
                     overwrite=a.overwrite)
    print("  ".join(f"{k} {v:,}" for k, v in counts.items() if isinstance(v, int)))
    print(f"shards: {a.out}  (train with data.train=shards:{a.out})")
    return 0


def _generate(a: argparse.Namespace) -> int:
    from zerotune.generate import generate_text

    if (a.prompt is None) == (a.prompts is None):
        raise ZerotuneError("zerotune generate: give exactly one of --prompt TEXT or --prompts FILE")
    kwargs = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  repetition_penalty=a.repetition_penalty, seed=a.seed)
    if a.prompt is not None:
        generate_text(a.run, [a.prompt], stream=lambda s: print(s, end="", flush=True), **kwargs)
        print()
        return 0
    from zerotune.files import read_text

    path = Path(a.prompts)
    prompts = [line for line in read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise ZerotuneError("no prompts (one per line) in the file", path=path)
    for prompt, text in zip(prompts, generate_text(a.run, prompts, **kwargs), strict=True):
        print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
    return 0


def _serve(a: argparse.Namespace) -> int:
    from zerotune.serve.api import serve

    key = a.api_key or os.environ.get("ZEROTUNE_API_KEY") or None
    serve(a.run, host=a.host, port=a.port, max_batch=a.max_batch, max_queue=a.max_queue, api_key=key,
          device=a.device, name=a.name, threads=a.threads)
    return 0


def _chat(a: argparse.Namespace) -> int:
    from zerotune.serve.api import chat

    chat(a.run, system=a.system, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
         top_p=a.top_p, repetition_penalty=a.repetition_penalty, seed=a.seed, device=a.device)
    return 0


def _inspect(a: argparse.Namespace) -> int:
    from zerotune.inspect import inspect_target

    print(inspect_target(a.target, overrides=a.set, batch_size=a.batch_size, as_json=a.json, source=a.source))
    return 0


def _compressed_run_args(s: argparse.ArgumentParser, default_out: str) -> None:
    """The options prune and quantize share: comparison data and the new run folder."""
    s.add_argument("--data", metavar="SPEC", help="compare on this data spec instead of the run's held-out split")
    s.add_argument("--out", help=f"the new run folder (default {default_out})")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def add_sampling(s: argparse.ArgumentParser, temperature: float, top_p: float | None, seed_help: str) -> None:
    """The sampling flags of the verbs that generate text (checked by ``zerotune.generate.check_sampling``)."""
    s.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    s.add_argument("--top-k", type=whole(1), default=None)
    s.add_argument("--top-p", type=float, default=top_p)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=SEED, default=None, help=seed_help)


def build_parser() -> Parser:
    p = Parser(prog="zerotune", description="Develop neural networks and language models from scratch "
               "and fine-tune them.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)

    s = sub.add_parser("demo", help="the offline end-to-end tour (writes runs/demo/)")
    s.add_argument("--out", default="runs/demo", help="folder for the demo runs (replaced each time)")
    s.add_argument("--quick", action="store_true", help="a shorter tour (fewer steps)")
    s.set_defaults(fn=_demo)

    s = sub.add_parser("train", help="train a model from a config, or resume a run",
                       description="Train from a YAML config into a run folder. Example: "
                       "zerotune train configs/digits_mlp.yaml --set train.epochs=5 --out runs/mlp")
    s.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    s.add_argument("--out", help="run folder (default runs/<config name>)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    s.add_argument("--resume", metavar="RUN", help="continue RUN from its latest good checkpoint")
    s.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine "
                   "(starts torchrun; one per GPU, or CPU processes); see docs/distributed.md")
    s.set_defaults(fn=_train)

    s = sub.add_parser("finetune", help="fine-tune a pretrained model (a run, a Hugging Face folder, minilm)",
                       description="Example: zerotune finetune configs/minilm_classify.yaml --from minilm "
                       "--method lora. SOURCE is a zerotune run folder, a Hugging Face model folder "
                       "(gpt2, llama, mistral, qwen2, bert) or the builtin name minilm.")
    s.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    s.add_argument("--from", dest="source", metavar="SOURCE", help="the pretrained model")
    s.add_argument("--method", choices=["full", "freeze", "lora", "qlora"],
                   help="default: the config's finetune.method, else full")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    s.add_argument("--out", help="run folder (default runs/<config name>)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    s.add_argument("--resume", metavar="RUN", help="continue a fine-tuning run from its latest good checkpoint")
    s.add_argument("--nproc", type=int, metavar="N", help="fine-tune with N processes on this machine "
                   "(starts torchrun; one per GPU, or CPU processes); see docs/distributed.md")
    s.set_defaults(fn=_finetune)

    s = sub.add_parser("export", help="write a run's model as a Hugging Face folder, zerotune safetensors or ONNX",
                       description="Example: zerotune export runs/minilm_classify --format hf --out exported/. "
                       "LoRA adapters are merged first. --format onnx writes model.onnx taking raw inputs "
                       "(normalisation in the graph), with model.json and labels.json.")
    s.add_argument("run", help="run folder")
    s.add_argument("--format", default="hf", choices=["hf", "safetensors", "onnx"])
    s.add_argument("--out", help="folder to write (default RUN/export-FORMAT)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    s.set_defaults(fn=_export)

    s = sub.add_parser("prune", help="zero the smallest weights of a run (magnitude pruning) into a new run",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Zero the fraction --amount of the Linear/Conv weights with the smallest |w| "
                       "(not biases, norms,\nembeddings or a language model's output head) and write a new run "
                       "that every verb opens.\nLoRA runs are merged first. Prints the metrics of the source and "
                       "the pruned model on the\nrun's held-out split (language models: val perplexity) and writes "
                       "them to DIR/compress.json.",
                       epilog="examples:\n"
                       "  zerotune prune runs/digits_mlp --amount 0.5\n"
                       "  zerotune prune runs/digits_mlp --amount 0.8 --scope global --out runs/mlp-80\n"
                       "  zerotune prune runs/pydoc_gpt_tiny --amount 0.3 --overwrite")
    s.add_argument("run", help="run folder (only read)")
    s.add_argument("--amount", type=float, required=True, help="fraction of the weights to zero, in [0, 1)")
    s.add_argument("--scope", default="layer", choices=["layer", "global"],
                   help="layer: that fraction of each weight tensor (default); global: one threshold over all")
    s.add_argument("--include-embeddings", action="store_true",
                   help="also prune the embeddings and a language model's output head")
    _compressed_run_args(s, "RUN-pruned")
    s.set_defaults(fn=_prune)

    s = sub.add_parser("quantize", help="store a run's weights in int8 (weight-only) as a new run",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Quantize the Linear/Conv weights (not biases, norms, embeddings or a language "
                       "model's output\nhead) to int8, symmetric, one scale per output channel: "
                       "q = round(w / s), s = max|w_row| / 127.\n"
                       "The new run stores int8 weights plus float scales (about 4x smaller for those tensors); every\n"
                       "verb opens it by dequantizing (w = q * s), so compute runs in float after loading. LoRA runs\n"
                       "are merged first. Prints the file sizes and the metrics of the source and the int8 model on\n"
                       "the run's held-out split (language models: val perplexity); writes them to DIR/compress.json.",
                       epilog="examples:\n"
                       "  zerotune quantize runs/digits_mlp\n"
                       "  zerotune quantize runs/pydoc_gpt_tiny --out runs/gpt-int8\n"
                       "  zerotune generate runs/gpt-int8 --prompt 'The with statement' --max-new-tokens 40")
    s.add_argument("run", help="run folder (only read)")
    s.add_argument("--bits", type=int, default=8, help="bits per weight (only 8 is supported)")
    _compressed_run_args(s, "RUN-int8")
    s.set_defaults(fn=_quantize)

    s = sub.add_parser("evaluate", help="metrics of a trained run on its test split or other data",
                       description="Writes RUN/eval.json and RUN/plots/confusion_matrix.png (or --output FILE and "
                                   "FILE_confusion_matrix.png beside it); existing ones only with --overwrite.",
                       epilog="examples:\n"
                              "  zerotune evaluate runs/digits_mlp --json\n"
                              "  zerotune evaluate runs/digits_mlp --data csv:new.csv --output runs/new_eval.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run", help="run folder")
    s.add_argument("--data", metavar="SPEC", help="evaluate on this data spec instead of the run's own split")
    s.add_argument("--split", default="test", choices=["test", "val", "train"], help="the run's split (default test)")
    s.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    s.add_argument("--output", metavar="FILE", help="where the metrics go (default RUN/eval.json)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing metrics file and plot")
    s.set_defaults(fn=_evaluate)

    s = sub.add_parser("predict", help="predictions of a classifier/regressor as CSV or JSONL",
                       description="One row per example: id (the file, or the row), prediction, probability, the "
                                   "next classes with --top-k, and the true label where the input has one.",
                       epilog="examples:\n"
                              "  zerotune predict runs/digits_mlp --input builtin:digits --output preds.csv\n"
                              "  zerotune predict runs/cnn --input photos/*.png --top-k 3 --format jsonl\n"
                              "  zerotune predict runs/minilm_classify --input notes.txt   # one text per line",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run", help="run folder")
    s.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="image files, a folder (of images, or of class sub-folders), a quoted glob, a "
                        ".csv/.jsonl/.npz file, a .txt file of text lines, or a data spec")
    s.add_argument("--output", help="file to write (default RUN/predictions.csv or .jsonl)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    s.add_argument("--top-k", type=whole(1, 2**31), default=1, help="also list the next K-1 most probable classes")
    s.add_argument("--format", choices=["csv", "jsonl"], help="csv (default) or jsonl (default for a .jsonl --output)")
    s.set_defaults(fn=_predict)

    s = sub.add_parser("generate", help="sample text from a trained decoder (KV cache, streaming)",
                       description="Example: zerotune generate runs/pydoc_gpt_tiny --prompt 'The with statement' "
                       "--max-new-tokens 60 --temperature 0.8 --top-k 40 --seed 0")
    s.add_argument("run", help="run folder of a gpt model")
    s.add_argument("--prompt", help="the prompt text (the prompt, then the completion, stream to stdout)")
    s.add_argument("--prompts", metavar="FILE", help="one prompt per line; prints one JSON object per prompt")
    s.add_argument("--max-new-tokens", type=whole(0), default=100)
    add_sampling(s, temperature=1.0, top_p=None, seed_help="fixes the sample")
    s.set_defaults(fn=_generate)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching and a chat page",
                       description="Example: zerotune serve runs/gpt_sft --port 8000, then open "
                       "http://127.0.0.1:8000/ or point an OpenAI client at http://127.0.0.1:8000/v1")
    s.add_argument("run", help="run folder of a gpt model (pretrained, SFT, LoRA or int8)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "0.0.0.0 for the network)")
    s.add_argument("--port", type=whole(0, 65535), default=8000, help="TCP port (0: a free one, printed)")
    s.add_argument("--max-batch", type=whole(1), default=8, help="sequences generated together (rows of the batch)")
    s.add_argument("--max-queue", type=whole(0), default=64, help="sequences that may wait; beyond it: HTTP 429")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $ZEROTUNE_API_KEY)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    s.add_argument("--name", help="the model's name in the API (default: the run folder's name)")
    s.add_argument("--threads", type=whole(1), help="CPU threads for the model (default: torch's)")
    s.set_defaults(fn=_serve)

    s = sub.add_parser("chat", help="talk to a decoder run in the terminal (streaming, multi-turn)",
                       description="Example: zerotune chat runs/gpt_sft --temperature 0. Type a message and Enter; "
                       "/reset starts over, /exit or Ctrl-D ends. Reads lines from a pipe too.")
    s.add_argument("run", help="run folder of a gpt model")
    s.add_argument("--system", help="a system message to start the conversation with")
    s.add_argument("--max-new-tokens", type=whole(1), default=None, help="per reply (default: the rest of the context)")
    add_sampling(s, temperature=0.8, top_p=1.0, seed_help="fixes the replies (turn i uses seed + i)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    s.set_defaults(fn=_chat)

    s = sub.add_parser("inspect", help="parameters, FLOPs, layer table and memory of a config or run",
                       description="Example: zerotune inspect configs/gpt2_124m.yaml --batch-size 8")
    s.add_argument("target", help="a YAML config or a run folder")
    s.add_argument("--from", dest="source", metavar="SOURCE", help="a fine-tuning recipe's model to adapt (default: "
                   "its finetune.source)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    s.add_argument("--batch-size", type=whole(1, 2**31), default=None,
                   help="for the memory estimate (default train.batch_size)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_inspect)

    s = sub.add_parser("data", help="data sets: download")
    dsub = s.add_subparsers(dest="data_verb", metavar="ACTION", parser_class=Parser, required=True)
    d = dsub.add_parser("download", help="fetch mnist, fashion-mnist or cifar10 with checksum verification",
                        description="Example: zerotune data download mnist data/mnist, then data.train=idx:data/mnist")
    d.add_argument("name", choices=["mnist", "fashion-mnist", "cifar10"])
    d.add_argument("dest", help="folder to put the files in")
    d.add_argument("--mirror", help="base URL to fetch from instead (also $ZEROTUNE_DATA_MIRROR)")
    d.add_argument("--overwrite", action="store_true",
                   help="download again a file of the same name that does not match the published checksum")
    d.set_defaults(fn=_download)

    s = sub.add_parser("tokenizer", help="tokenizers: train")
    tsub = s.add_subparsers(dest="tok_verb", metavar="ACTION", parser_class=Parser, required=True)
    t = tsub.add_parser("train", help="train a tokenizer (Hugging Face tokenizers) and save DIR/tokenizer.json",
                        description="Example: zerotune tokenizer train --input builtin:pydoc --vocab-size 2048 "
                        "--out runs/tok")
    t.add_argument("--input", required=True, metavar="SPEC",
                   help="text:FILE|DIR, jsonl:FILE, builtin:pydoc or builtin:stdlib")
    t.add_argument("--vocab-size", type=whole(1, 2**24), help="tokens in all, special ones included (required "
                   "but for --kind char, which keeps the corpus's alphabet)")
    t.add_argument("--kind", default="bytelevel-bpe", choices=["bytelevel-bpe", "bpe", "wordpiece", "char"])
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--text-field", default="text", help="JSONL field holding the text")
    t.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer.json")
    t.set_defaults(fn=_tokenizer_train)

    s = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped token shards for pretraining",
                       description="Example: zerotune prepare --input builtin:pydoc --tokenizer runs/tok "
                       "--out runs/pydoc-shards --split-chars 1000 --val-fraction 0.1")
    s.add_argument("--input", required=True, metavar="SPEC", help="text:FILE|DIR, jsonl:FILE, builtin:pydoc|stdlib")
    s.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer.json or its folder")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--val-fraction", type=float, default=0.01, help="expected fraction of documents held out")
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--min-chars", type=whole(0), default=1, help="drop documents shorter than this")
    s.add_argument("--max-chars", type=whole(1), default=None, help="drop documents longer than this")
    s.add_argument("--split-chars", type=whole(1, 2**31), default=None, metavar="N",
                   help="cut longer documents into pieces of at most N characters at paragraph breaks, each a "
                        "document (for a corpus of few long documents: many to hold out)")
    s.add_argument("--text-field", default="text")
    s.add_argument("--overwrite", action="store_true", help="replace existing shards")
    s.set_defaults(fn=_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(argv)
        if not getattr(args, "fn", None):
            raise ZerotuneError("zerotune: give a verb, e.g. zerotune train CONFIG (see zerotune --help)")
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
            return args.fn(args)
    except ZerotuneError as e:
        if debug:
            raise
        from zerotune.train.launch import should_report

        if should_report(e):  # with several processes, rank 0 speaks for all about shared inputs
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, I/O error outside the writers that already say so: exit 1
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the net under every clear message: no traceback reaches a user without --debug
        if debug:
            raise
        from zerotune.files import first_line

        verb = next((a for a in argv if not a.startswith("-")), "zerotune")
        print(f"error: internal error in {verb}: {type(e).__name__}: {first_line(e)}; rerun with --debug for the "
              "traceback", file=sys.stderr)
        return 1


def leave(code: int) -> NoReturn:
    """End the process with ``code``. A torchrun worker (WORLD_SIZE > 1) flushes its output and
    ends with ``os._exit``: the interpreter's own teardown can destroy gloo's threads while they
    are still joinable, which aborts a process whose run succeeded ("terminate called without an
    active exception", SIGABRT). Every file zerotune writes is closed before this point."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    leave(main())
