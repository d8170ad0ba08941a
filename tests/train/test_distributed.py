"""Distributed training on CPU: 2 processes (gloo) against one process, same global batch.

The reference is the single-process run of the same config. The 2-process runs use
grad_accum 3 and a batch size (51) whose slices are uneven (26/25, last batch 10/9 with an
empty micro-batch), so the split, the micro-batching and the count weighting are all exercised.
Tolerances: 1e-5 absolute on every weight after 26 Adam steps (measured differences ~1e-7,
from the order of float sums only).

The language-model runs (causal_lm under FSDP, masked_lm under DDP) use batches of 7 and 9 windows
(uneven shares) and 3 evaluation batches (rank 1 pads with a dummy forward).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from torch import nn

from tests.conftest import tiny_config
from tests.helpers import write_char_shards
from zerotune import cli, files
from zerotune.config import Config, load_config
from zerotune.data.shards import ShardDataset
from zerotune.errors import DistributedError, ZerotuneError
from zerotune.train import checkpoint as ckpt
from zerotune.train import launch, parallel
from zerotune.train.api import train
from zerotune.train.loop import seed_everything, train_loop
from zerotune.train.tasks import LanguageModelTask, SupervisedTask, make_task, share

CFG = tiny_config(epochs=1, batch_size=51, grad_clip=0.5, checkpoint_every=10, keep_last=10)  # 26 steps
DIST = {**CFG, "train": {**CFG["train"], "grad_accum": 3}}
TOL = {"atol": 1e-5, "rtol": 0}
quiet = lambda *a, **k: None


def weights(run: Path) -> dict[str, torch.Tensor]:
    return files.load_weights(run / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)  # the single-process names: no "module." prefixes
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], **TOL, msg=k)


def cut(run: Path, dest: Path, step: int) -> Path:
    """A copy of ``run`` as if it had stopped right after the checkpoint of ``step``."""
    shutil.copytree(run, dest)
    for folder in ckpt.step_checkpoints(dest / "checkpoints"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    (dest / "model.json").unlink()
    return dest


def lm_configs(shards: Path) -> dict[str, dict]:
    """causal_lm under FSDP and masked_lm under DDP: uneven shares, 3 evaluation batches; and
    causal_lm with dropout under DDP, checkpointed every 4 steps."""
    train = {"epochs": None, "max_steps": 8, "grad_accum": 2, "log_every": 4, "eval_every": 4, "progress": False,
             "metrics": []}
    data = {"train": f"shards:{shards}", "eval_batches": 3, "max_length": 16}
    return {
        "causal_lm": {"seed": 0, "task": "causal_lm", "data": data,
                      "model": {"arch": "gpt", "block_size": 16, "n_layer": 1, "n_head": 2, "d_model": 16,
                                "bias": False, "dropout": 0.0},  # no key bias: its gradient is 0 (docs)
                      "optim": {"name": "adamw", "lr": 0.01},
                      "train": {**train, "batch_size": 7, "strategy": "fsdp"}},
        "masked_lm": {"seed": 0, "task": "masked_lm", "data": data,
                      "model": {"arch": "bert", "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32,
                                "max_position": 16, "dropout": 0.0},
                      "optim": {"name": "adamw", "lr": 0.01},
                      "train": {**train, "batch_size": 9, "strategy": "ddp"}},
    } | {"dropout": {"seed": 0, "task": "causal_lm", "data": data,
                     "model": {"arch": "gpt", "block_size": 16, "n_layer": 1, "n_head": 2, "d_model": 16,
                               "dropout": 0.2},
                     "optim": {"name": "adamw", "lr": 0.01},
                     "train": {**train, "max_steps": 12, "batch_size": 7, "strategy": "ddp", "checkpoint_every": 4,
                               "keep_last": 3}}}


def fresh(cfg: dict) -> tuple[nn.Module, LanguageModelTask | SupervisedTask, Config]:
    """The model (seeded as ``train`` seeds it), task and resolved config of ``cfg``."""
    from zerotune.models import build_model
    from zerotune.train.tasks import resolve_vocab

    config = load_config(cfg)
    task = make_task(config, torch.device("cpu"))
    config = resolve_vocab(config, task.info)
    seed_everything(config.seed)
    return build_model(config.model, task.info), task, config


def run_loop(cfg: dict, par: parallel.Parallel, **kw) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """``train_loop`` on a fresh model, no run folder: the final weights (rank 0) and metrics records."""
    model, task, config = fresh(cfg)
    records: list[dict] = []
    train_loop(model, task, config, log=quiet, par=par, on_record=records.append, **kw)
    return par.model_state(model), records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Blocks(nn.Module):
    """A residual stack with an nn.ModuleList of blocks: FSDP shards each block, then the root."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(2))
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))  # (B, 32)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)  # (B, 10)


def train_blocks(par: parallel.Parallel) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    cfg = load_config(CFG)
    task = make_task(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = Blocks()
    train_loop(model, task, cfg, log=quiet, par=par)
    return model, par.model_state(model)


# ---------------------------------------------------------------- 2 processes (spawned)


def _worker(rank: int, root: Path, port: int) -> None:
    """Runs as each of 2 processes: FSDP run, 1→2 resume, block-sharded model, an existing --out,
    then rank 1 dies."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    result: dict = {}
    fsdp = {**DIST, "train": {**DIST["train"], "strategy": "fsdp"}}
    train(fsdp, out=root / "fsdp", log=quiet)
    train(resume=root / "single_cut", log=quiet)  # saved by 1 process (its config: strategy fsdp)
    train(image_config(root, in_memory=False), out=root / "files", log=quiet)  # DDP, each rank decodes its rows
    par = parallel.Parallel(rank, 2, "fsdp", torch.device("cpu"), activation_checkpointing=True)
    model, state = train_blocks(par)
    result["sharded"] = [isinstance(m, FSDPModule) for m in (model, model.blocks[0], model.blocks[1], model.inp)]
    if rank == 0:
        files.save_weights(root / "blocks_fsdp.safetensors", state)
    try:
        train(fsdp, out=root / "fsdp", log=quiet)  # exists, no overwrite: rank 0 refuses for everyone
    except ZerotuneError as e:
        result["exists"] = str(e)
    (root / f"rank{rank}.json").write_text(json.dumps(result))  # rank 1 will not get further

    real_batch = SupervisedTask.batch

    def die_at_3(self, step, *part):
        if step == 3 and rank == 1:
            os._exit(1)  # as if killed (out of memory, lost node)
        return real_batch(self, step, *part)

    SupervisedTask.batch = die_at_3
    try:
        train(DIST, out=root / "fail", log=quiet)
    except ZerotuneError as e:
        result["fail"] = {"type": type(e).__name__, "message": str(e), "exit_code": e.exit_code}
    (root / f"rank{rank}.json").write_text(json.dumps(result))
    cli.leave(0)  # as a torchrun worker does: gloo's threads can abort the interpreter's teardown


def _lm_worker(rank: int, root: Path, port: int) -> None:
    """Runs as each of 2 processes: sharded LM validation of a fresh model, LM training runs that
    record the rows each rank reads, then a run with dropout, checkpointed, and its resumption
    from step 4."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    result: dict = {}
    reads: list[int] = []
    real_batch = ShardDataset.batch

    def counted(self, *args, **kwargs):
        x, y = real_batch(self, *args, **kwargs)
        reads.append(len(x))
        return x, y

    ShardDataset.batch = counted
    cpu = torch.device("cpu")
    saved: dict[str, dict[str, torch.Tensor]] = {}
    configs = lm_configs(root / "shards")
    dropout = configs.pop("dropout")
    for name, cfg in configs.items():
        model, task, _ = fresh(cfg)
        forwards: list[int] = []
        model.register_forward_pre_hook(lambda m, args, seen=forwards: seen.append(len(args[0])))
        par = parallel.Parallel(rank, 2, "fsdp", cpu)
        result[f"{name}_val"] = task.evaluate(par.unwrap(par.wrap(model)), task.split("val"), par)
        result[f"{name}_forwards"] = forwards
        reads.clear()
        strategy = cfg["train"]["strategy"]
        saved[name], result[f"{name}_records"] = run_loop(cfg, parallel.Parallel(rank, 2, strategy, cpu))
        result[f"{name}_reads"] = list(reads)
    par = parallel.Parallel(rank, 2, "ddp", cpu)
    saved["dropout"], _ = run_loop(dropout, par, checkpoints=root / "dropout")
    dist.barrier()  # rank 0 has written the checkpoints
    saved["dropout_resumed"], _ = run_loop(dropout, par, resume=root / "dropout" / ckpt.step_name(4))
    if rank == 0:
        for name, state in saved.items():
            files.save_weights(root / f"{name}.safetensors", state)
    (root / f"lm_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    cli.leave(0)  # as a torchrun worker does: gloo's threads can abort the interpreter's teardown


@pytest.fixture(scope="module")
def lm_root(tmp_path_factory) -> Path:
    """A folder with a character tokenizer (tok/) and token shards (shards/)."""
    root = tmp_path_factory.mktemp("dist_lm")
    write_char_shards(root, "the cat sat on the mat and the dog sat on the log. " * 3, 40, 0.2)
    return root


@pytest.fixture(scope="module")
def lm_two(lm_root) -> Path:
    root = lm_root
    ctx = mp.start_processes(_lm_worker, args=(root, free_port()), nprocs=2, start_method="spawn", join=False)
    for p in ctx.processes:
        p.join(180)
    assert [p.exitcode for p in ctx.processes] == [0, 0]
    return root


def image_config(root: Path, in_memory: bool) -> dict:
    """DIST on 300 digits written as PNG files (root/img), in memory or read from the files."""
    return {**DIST, "data": {**DIST["data"], "train": f"images:{root / 'img'}", "in_memory": in_memory,
                             "num_workers": 1}, "train": {**DIST["train"], "grad_accum": 1}}


def write_digit_images(folder: Path, n: int = 300) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(n):
        label = folder / str(digits.target[i])
        label.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 15).astype("uint8")).save(label / f"{i:04d}.png")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: one process (the config asks for fsdp, which one process ignores); and the
    same for digit images held in memory."""
    root = tmp_path_factory.mktemp("dist")
    lines: list[str] = []
    train({**CFG, "train": {**CFG["train"], "strategy": "fsdp"}}, out=root / "single", log=lines.append)
    assert any("train.strategy fsdp has no effect" in ln for ln in lines)
    write_digit_images(root / "img")
    train(image_config(root, in_memory=True), out=root / "single_images", log=quiet)
    return root / "single"


@pytest.fixture(scope="module")
def two(single) -> Path:
    root = single.parent
    cut(single, root / "single_cut", 20)
    ctx = mp.start_processes(_worker, args=(root, free_port()), nprocs=2, start_method="spawn", join=False)
    for p in ctx.processes:
        p.join(180)
    assert ctx.processes[0].exitcode == 0
    assert ctx.processes[1].exitcode == 1  # died on purpose at step 3
    return root


def test_fsdp_matches_one_process(single, two):
    assert_same_weights(single, two / "fsdp")
    rows = [json.loads(ln) for ln in (two / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(ln) for ln in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref]  # one writer: no duplicated lines
    for r, s in zip(rows, ref, strict=True):  # train loss summed over processes, eval gathered
        for k in ("loss", "val_loss", "val_accuracy"):
            if k in s:
                assert r[k] == pytest.approx(s[k], abs=1e-5), (r["step"], k)


def test_images_read_from_files_on_two_processes_match_one_process_in_memory(single, two):
    assert_same_weights(two / "single_images", two / "files")


def test_checkpoint_of_one_process_resumes_on_two(single, two):
    assert_same_weights(single, two / "single_cut")


def test_checkpoint_of_two_processes_resumes_on_one(single, two, tmp_path):
    run = cut(two / "fsdp", tmp_path / "fsdp_cut", 10)
    train(resume=run, log=quiet)
    assert_same_weights(single, run)


def test_fsdp_shards_each_block_with_activation_checkpointing(two):
    assert json.loads((two / "rank1.json").read_text())["sharded"] == [True, True, True, False]
    _, one = train_blocks(parallel.Parallel())
    two_w = files.load_weights(two / "blocks_fsdp.safetensors")
    assert sorted(one) == sorted(two_w)
    for k in one:
        torch.testing.assert_close(two_w[k], one[k], **TOL, msg=k)


def test_rank_0_alone_checks_the_run_folder(two):
    for rank in (0, 1):
        message = json.loads((two / f"rank{rank}.json").read_text())["exists"]
        assert message == f"{two / 'fsdp'}: run folder already exists; pass --overwrite to replace it or --out to " \
                          "choose another"


def test_a_process_that_dies_stops_the_others_with_one_line(two):
    fail = json.loads((two / "rank0.json").read_text())["fail"]
    assert fail["type"] == "DistributedError" and fail["exit_code"] == 1
    assert fail["message"].startswith("rank 0: lost contact with another process of the run, which stopped or "
                                      "failed (")
    assert "\n" not in fail["message"]


@pytest.mark.parametrize("name", ["causal_lm", "masked_lm"])
def test_language_model_validation_is_split_across_processes(lm_two, name):
    """Each rank evaluates its own batches (0 and 2 / 1, then a one-window pad: the same number of
    forwards under FSDP); the all-reduced sums give the one-process numbers on both ranks."""
    ranks = [json.loads((lm_two / f"lm_rank{r}.json").read_text()) for r in (0, 1)]
    cfg = lm_configs(lm_two / "shards")[name]
    model, task, _ = fresh(cfg)
    batch = cfg["train"]["batch_size"]
    assert task.val.n_eval_batches(batch, task.block_size, 3) == 3
    assert [r[f"{name}_forwards"] for r in ranks] == [[batch, batch], [batch, 1]]
    assert ranks[0][f"{name}_val"] == ranks[1][f"{name}_val"]
    one = task.evaluate(model, task.split("val"))
    assert ranks[0][f"{name}_val"] == pytest.approx(one, rel=1e-12, abs=0)


@pytest.mark.parametrize("name", ["causal_lm", "masked_lm"])
def test_each_process_reads_only_its_share_of_the_language_model_batch(lm_two, name):
    cfg = lm_configs(lm_two / "shards")[name]
    batch, steps = cfg["train"]["batch_size"], cfg["train"]["max_steps"]
    ranks = [json.loads((lm_two / f"lm_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r[f"{name}_reads"] for r in ranks] == [[batch - batch // 2] * steps, [batch // 2] * steps]
    one, ref = run_loop(cfg, parallel.Parallel())
    two = files.load_weights(lm_two / f"{name}.safetensors")
    for k in one:
        if k.endswith("attn.key.bias"):
            # q·b_k is the same for every key of a query, so softmax cancels it: the exact gradient is 0 and
            # AdamW turns its float noise into steps of about lr, different on 1 and 2 processes
            continue
        torch.testing.assert_close(two[k], one[k], **TOL, msg=k)
    rows = ranks[0][f"{name}_records"]
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [4, 8]
    for r, s in zip(rows, ref, strict=True):
        for k in ("loss", "val_loss"):
            assert r[k] == pytest.approx(s[k], abs=1e-5), (r["step"], k)


def test_two_processes_with_dropout_resume_exactly_on_two(lm_two):
    state = torch.load(lm_two / "dropout" / ckpt.step_name(4) / ckpt.STATE, weights_only=True)
    a, b = (s["torch"] for s in state["rng_ranks"])
    assert not torch.equal(a, b)  # shares of 4 and 3 windows draw different numbers of dropout masks
    assert torch.equal(state["rng"]["torch"], a)
    whole = files.load_weights(lm_two / "dropout.safetensors")
    resumed = files.load_weights(lm_two / "dropout_resumed.safetensors")  # from step 4, on 2 processes
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=0, msg=k)


def test_resuming_on_another_number_of_processes_says_the_random_state_is_rank_0s(lm_two):
    model, task, config = fresh(lm_configs(lm_two / "shards")["dropout"])
    lines: list[str] = []
    train_loop(model, task, config, log=lines.append, resume=lm_two / "dropout" / ckpt.step_name(8))
    assert lines == ["the checkpoint holds the random state of 2 processes, this run has 1: every process "
                     "continues from rank 0's, so dropout draws differ from an uninterrupted run"]


# ---------------------------------------------------------------- torchrun through the command line


def test_cli_nproc_ddp_matches_one_process_and_resumes_on_one(single, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(DIST))
    out = tmp_path / "ddp"
    p = subprocess.run([sys.executable, "-m", "zerotune", "train", str(cfg), "--nproc", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("run folder:") == 1  # only rank 0 speaks
    assert "2 processes · ddp · gloo · global batch 51 = 2 × 26 per process · micro-batch 9" in p.stdout
    assert_same_weights(single, out)
    state = torch.load(ckpt.latest_checkpoint(out / "checkpoints") / ckpt.STATE, weights_only=True)
    ref = torch.load(ckpt.latest_checkpoint(single / "checkpoints") / ckpt.STATE, weights_only=True)
    assert state["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]  # single-process format
    run = cut(out, tmp_path / "ddp_cut", 20)
    train(resume=run, log=quiet)
    assert_same_weights(single, run)


# ---------------------------------------------------------------- errors


def test_a_process_that_cannot_join_gives_one_line(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(dist_timeout=1)))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    code = cli.main(["train", str(cfg), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: rank 0: could not join the 2 processes of the run at 127.0.0.1:")
    assert "train.dist_timeout=1s" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("env, fragment", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is outside 0..WORLD_SIZE-1"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK, WORLD_SIZE and LOCAL_RANK must be integers"),
])
def test_bad_torchrun_environment(tmp_path, monkeypatch, capsys, env, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config()))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: environment: ") and fragment in err[0], err


def test_bad_nproc_and_strategy(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config()))
    assert cli.main(["train", str(cfg), "--nproc", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --nproc: expected a positive number of processes, got 0"
    assert cli.main(["train", str(cfg), "--set", "train.strategy=zero3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {cfg}: train.strategy: expected one of ") and "'zero3'" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", str(cfg), "--nproc", "2"]) == 2
    assert "already started by torchrun; drop --nproc" in capsys.readouterr().err


def test_other_ranks_leave_shared_input_errors_to_rank_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == ""
    assert launch.should_report(DistributedError("rank 1: lost contact"))


# ---------------------------------------------------------------- pieces, one process


def test_a_share_of_a_batch_is_those_rows_of_the_whole_batch(lm_root, monkeypatch):
    """task.batch(step, rank, W) for each rank, stacked, is task.batch(step): the same windows,
    masks and augmentation; and a rank reads only its own windows from the shards."""
    from zerotune.config import ChatTemplate
    from zerotune.data.chat import SFTData
    from zerotune.data.tokenizer import load_tokenizer
    from zerotune.train.tasks import SFTTask

    cfg = load_config({**tiny_config(batch_size=7), "data": {"train": "builtin:digits", "augment": {
        "enabled": True, "hflip": True, "crop_padding": 1, "rotate": 10, "translate": 0.1, "scale": 0.1,
        "noise": 0.1}}})
    tasks = [make_task(cfg, torch.device("cpu"))]
    for name in ("causal_lm", "masked_lm"):
        tasks.append(fresh(lm_configs(lm_root / "shards")[name])[1])
    x = torch.randint(1, 50, (9, 12))
    lengths = torch.tensor([12, 3, 5, 8, 2, 7, 6, 4, 9])
    y = torch.where(torch.arange(12) < lengths[:, None], x, -100)
    tasks.append(SFTTask(SFTData(x, y, lengths, 9, 0), None, tokenizer=load_tokenizer(lm_root / "tok"),
                         template=ChatTemplate(), max_length=12, packing=False, batch_size=7, seed=0))
    reads: list[int] = []
    real = ShardDataset._windows
    monkeypatch.setattr(ShardDataset, "_windows", lambda self, starts, t: reads.append(len(starts)) or real(
        self, starts, t))
    for task in tasks:
        for step in (0, 1):
            whole = task.batch(step)
            for world in (2, 3):
                parts = [task.batch(step, r, world) for r in range(world)]
                for i in (0, 1):
                    torch.testing.assert_close(torch.cat([p[i] for p in parts]), whole[i], rtol=0, atol=0)
    assert reads == [7, 4, 3, 3, 2, 2] * 2 + [9, 5, 4, 3, 3, 3] * 2  # causal_lm (7 windows), masked_lm (9)


@pytest.mark.parametrize("n, batch, world, accum", [(51, 51, 2, 3), (19, 51, 2, 3), (1, 8, 2, 1), (5, 8, 4, 2),
                                                     (64, 64, 3, 1), (7, 7, 1, 2)])
def test_micro_batches_cover_the_global_batch_in_order(n, batch, world, accum):
    x, y = torch.arange(n * 2.0).reshape(n, 2), torch.arange(n)
    shares = [share(n, r, world) for r in range(world)]
    assert [len(y[s]) for s in shares] == [len(part) for part in y.tensor_split(world)]
    per_rank = [parallel.Parallel(rank=r, world_size=world).micro_batches(x[s], y[s], n, batch, accum)
                for r, s in enumerate(shares)]
    assert len({len(parts) for parts in per_rank}) == 1  # the same number of forwards on every rank
    micro = math.ceil(math.ceil(batch / world) / accum)
    assert all(len(ym) <= micro for parts in per_rank for _, ym in parts)
    sizes = [sum(len(ym) for _, ym in parts) for parts in per_rank]
    assert max(sizes) - min(sizes) <= 1  # near-equal, contiguous slices
    assert torch.equal(torch.cat([ym for parts in per_rank for _, ym in parts]), y)
    assert torch.equal(torch.cat([xm for parts in per_rank for xm, _ in parts]), x)


def test_optimizer_state_names_round_trip():
    model = Blocks()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    names = parallel.param_names(model, opt)
    assert names == [n for n, _ in model.named_parameters()]
    state = opt.state_dict()
    back = parallel.by_index(parallel.by_name(state, names), names)
    assert back["param_groups"] == state["param_groups"]
    for i, s in state["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(back["state"][i][k], v, rtol=0, atol=0)


def test_blocks_are_the_children_of_the_outermost_module_lists():
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stack = nn.Sequential(nn.ModuleList([nn.ModuleList([nn.Linear(1, 1)]), nn.Linear(1, 1)]))
            self.head = nn.Linear(1, 1)

    m = Nested()
    assert parallel.blocks(m) == [m.stack[0][0], m.stack[0][1]]
    assert parallel.blocks(nn.Linear(1, 1)) == []
    assert [launch.strategy_for(s, w) for s, w in [("auto", 1), ("fsdp", 1), ("auto", 2), ("fsdp", 8)]] == [
        "none", "none", "ddp", "fsdp"]


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_worker_leaves_with_its_exit_code_and_its_output_flushed(world):
    """`python -m zerotune` ends through cli.leave: a torchrun worker (WORLD_SIZE > 1) by os._exit
    after flushing, so gloo's threads cannot abort the interpreter's teardown; one process normally."""
    code = ("import sys; from zerotune.cli import leave; print('out', end=''); "
            "print('err', end='', file=sys.stderr); leave(3)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "WORLD_SIZE": world})
    assert (p.returncode, p.stdout, p.stderr) == (3, "out", "err")
