"""Fine-tuning on 2 CPU processes (gloo) against one process, same global batch.

The SOURCE is a tiny GPT run trained here on token shards (character tokenizer); each method
fine-tunes it as a causal LM on the same shards for 6 AdamW steps, without dropout. The global
batch of 7 windows splits 4/3 across the 2 processes, and train.grad_accum 2 cuts each slice into
micro-batches of 2, so the split, the micro-batching and the count weighting are all exercised.
Tolerance: 1e-5 absolute on every saved tensor (measured differences below 1e-6, from the order
of float sums only).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

import zerotune
from tests.helpers import write_char_shards
from tests.train.test_distributed import cut, free_port
from zerotune import cli, files
from zerotune.errors import ZerotuneError
from zerotune.finetune.api import finetune
from zerotune.run import ADAPTER

TOL = {"atol": 1e-5, "rtol": 0}
LORA = {"lora": {"r": 2, "alpha": 4}}
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None  # qlora's optional dependency
quiet = lambda *a, **k: None


def make_source(root: Path) -> tuple[Path, Path]:
    """Token shards and a tiny GPT run trained on them for one step (the SOURCE)."""
    write_char_shards(root, "the cat sat on the mat. " * 4, 20, 0.1)
    # d_model 64: bitsandbytes' CPU kernels (qlora) need layer widths in multiples of 64. No biases: the
    # key bias has a true gradient of zero, and Adam magnifies the rounding in it (docs/distributed.md)
    cfg = {"seed": 0, "task": "causal_lm", "data": {"train": f"shards:{root / 'shards'}"},
           "model": {"arch": "gpt", "block_size": 16, "n_layer": 2, "n_head": 2, "d_model": 64, "bias": False},
           "train": {"epochs": None, "max_steps": 1, "batch_size": 4, "progress": False}}
    return zerotune.train(cfg, out=root / "src", log=quiet), root / "shards"


def ft_config(shards: Path, strategy: str = "auto", **finetune_section) -> dict:
    return {"seed": 0, "task": "causal_lm",
            "data": {"train": f"shards:{shards}", "max_length": 8, "eval_batches": 1},
            "optim": {"name": "adamw", "lr": 3e-3},
            "train": {"epochs": None, "max_steps": 6, "batch_size": 7, "grad_accum": 2, "strategy": strategy,
                      "log_every": 1, "eval_every": 3, "checkpoint_every": 2, "keep_last": 5, "progress": False},
            **({"finetune": finetune_section} if finetune_section else {})}


def assert_same(a: Path, b: Path, name: str) -> None:
    wa, wb = files.load_weights(a / name), files.load_weights(b / name)
    assert sorted(wa) == sorted(wb)  # the single-process names: no "module." prefixes
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], **TOL, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The references: each method on one process."""
    root = tmp_path_factory.mktemp("ftdist")
    src, shards = make_source(root)
    finetune(ft_config(shards), src, method="full", out=root / "full", log=quiet)
    finetune(ft_config(shards, train_last=1), src, method="freeze", out=root / "freeze", log=quiet)
    finetune(ft_config(shards, **LORA), src, method="lora", out=root / "lora", log=quiet)
    if HAS_BNB:
        finetune(ft_config(shards, **LORA), src, method="qlora", out=root / "qlora", log=quiet)
    cut(root / "full", root / "full_cut", 2)
    return root


# ---------------------------------------------------------------- 2 processes (spawned)


def _worker(rank: int, root: Path, port: int) -> None:
    """Runs as each of 2 processes: full, freeze, QLoRA (DDP), LoRA (FSDP2), a 1→2 resume, QLoRA under FSDP."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    src, shards = root / "src", root / "shards"
    finetune(ft_config(shards), src, method="full", out=root / "two_full", log=quiet)
    finetune(ft_config(shards, train_last=1), src, method="freeze", out=root / "two_freeze", log=quiet)
    finetune(ft_config(shards, "fsdp", **LORA), src, method="lora", out=root / "two_lora_fsdp", log=quiet)
    if HAS_BNB:
        finetune(ft_config(shards, **LORA), src, method="qlora", out=root / "two_qlora_ddp", log=quiet)
    finetune(resume=root / "full_cut", log=quiet)  # saved by 1 process
    result = {}
    try:
        finetune(ft_config(shards, "fsdp", **LORA), src, method="qlora", out=root / "two_qlora", log=quiet)
    except ZerotuneError as e:
        result["qlora_fsdp"] = {"message": str(e), "exit_code": e.exit_code}
    (root / f"rank{rank}.json").write_text(json.dumps(result))
    cli.leave(0)  # as a torchrun worker does: gloo's threads can abort the interpreter's teardown


@pytest.fixture(scope="module")
def two(single) -> Path:
    ctx = mp.start_processes(_worker, args=(single, free_port()), nprocs=2, start_method="spawn", join=False)
    for p in ctx.processes:
        p.join(180)
    assert [p.exitcode for p in ctx.processes] == [0, 0]
    return single


def test_ddp_full_matches_one_process(two):
    assert_same(two / "full", two / "two_full", "model.safetensors")
    rows = (two / "two_full" / "metrics.jsonl").read_text().splitlines()
    ref = (two / "full" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [json.loads(r)["step"] for r in ref]  # one writer


def test_ddp_freeze_matches_one_process(two):
    assert_same(two / "freeze", two / "two_freeze", "model.safetensors")
    before, after = files.load_weights(two / "src" / "model.safetensors"), files.load_weights(
        two / "two_freeze" / "model.safetensors")
    for k in before:  # train_last 1: block 0 and the embeddings stay as they were
        if k.startswith(("blocks.0.", "tok_emb", "pos_emb")):
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)


def test_fsdp_lora_matches_one_process(two):
    assert_same(two / "lora", two / "two_lora_fsdp", ADAPTER)


@pytest.mark.skipif(not HAS_BNB, reason="qlora needs bitsandbytes")
def test_ddp_qlora_matches_one_process(two):
    assert_same(two / "qlora", two / "two_qlora_ddp", ADAPTER)


def test_run_of_one_process_resumes_on_two(two):
    assert_same(two / "full", two / "full_cut", "model.safetensors")


def test_run_of_two_processes_resumes_on_one(two, tmp_path):
    run = cut(two / "two_full", tmp_path / "two_cut", 4)
    finetune(resume=run, log=quiet)
    assert_same(two / "full", run, "model.safetensors")


def test_qlora_under_fsdp_is_one_line(two):
    for rank in (0, 1):
        result = json.loads((two / f"rank{rank}.json").read_text())["qlora_fsdp"]
        assert result == {"message": "train.strategy: fsdp cannot shard the quantized weights of a qlora run; "
                                     "use train.strategy ddp (or auto), or method lora", "exit_code": 2}
    assert not (two / "two_qlora").exists()


# ---------------------------------------------------------------- torchrun through the command line


def test_cli_nproc_lora_matches_one_process(single, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(ft_config(single / "shards", **LORA)))
    out = tmp_path / "lora"
    repo = str(Path(__file__).parents[2])  # the processes import this zerotune, not an installed one
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-m", "zerotune", "finetune", str(cfg), "--from", str(single / "src"),
                        "--method", "lora", "--nproc", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("run folder:") == 1  # only rank 0 speaks
    assert "2 processes · ddp · gloo · global batch 7 = 2 × 4 per process · micro-batch 2" in p.stdout
    assert_same(single / "lora", out, ADAPTER)


def test_finetune_help_shows_nproc(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    assert "--nproc N" in capsys.readouterr().out


def test_finetune_nproc_is_checked(capsys):
    assert cli.main(["finetune", "c.yaml", "--from", "minilm", "--nproc", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --nproc: expected a positive number of processes, got 0"
