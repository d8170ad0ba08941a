"""Refusing what cannot fit in memory before training: the activation estimate of
``zerotune.train.memory.activation_bytes`` counts what autograd really keeps."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from tests.helpers import write_char_shards
from zerotune.config import load_config
from zerotune.errors import ZerotuneError
from zerotune.models import build_model
from zerotune.train import api, memory
from zerotune.train.tasks import make_task, resolve_vocab

CPU = torch.device("cpu")


def real_saved_bytes(model, task, rows: int) -> int:
    """What a real CPU forward and loss of ``rows`` zero examples saves for the backward pass,
    weights (and views of them) left out."""
    info = task.info
    x = torch.zeros(rows, *info.input_shape, dtype=torch.long if info.kind == "tokens" else torch.float32)
    y = torch.zeros(rows, *task.train.y.shape[1:], dtype=task.train.y.dtype) if info.kind != "tokens" else x
    weights = {id(p) for p in model.parameters()}
    saved = {}

    def pack(t):
        if id(t) not in weights and id(t._base) not in weights:
            saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.random.fork_rng(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        task.loss(model(x), y)
    return sum(saved.values())


def task_and_models(cfg):
    """The task of ``cfg`` and its model built twice: on the meta device and for real (CPU)."""
    cfg = load_config(cfg)
    task = make_task(cfg, "cpu")
    cfg = resolve_vocab(cfg, task.info)
    with torch.device("meta"):
        meta = build_model(cfg.model, task.info).train()
    return cfg, task, meta, build_model(cfg.model, task.info).train()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_char_shards(tmp_path_factory.mktemp("corpus"), "the cat sat on the mat. " * 6, 40, 0.1)


def lm_config(shards, task="causal_lm", **model):
    return {"seed": 0, "task": task, "data": {"train": f"shards:{shards}"},
            "model": ({"arch": "gpt", "block_size": 32, "n_layer": 2, "n_head": 2, "d_model": 32}
                      if task == "causal_lm" else {"arch": "bert"}) | {"dropout": 0.1} | model,
            "train": {"epochs": None, "max_steps": 5, "batch_size": 8, "progress": False, "metrics": []}}


@pytest.mark.parametrize("kind", ["mlp", "cnn", "gpt", "gpt-gqa-rope", "bert"])
def test_the_meta_estimate_is_what_a_real_forward_saves(kind, shards):
    """Exactly the bytes autograd keeps on the CPU, attention included: the fused kernel without
    attention dropout (gpt-gqa-rope, bert), the math path with it (gpt)."""
    cfg = {"mlp": tiny_config(), "cnn": {**tiny_config(), "model": {"arch": "cnn", "channels": [8, 16]}},
           "gpt": lm_config(shards), "gpt-gqa-rope": lm_config(shards, n_head=4, n_kv_heads=2, pos="rope", dropout=0.0),
           "bert": lm_config(shards, task="masked_lm", hidden=32, layers=2, heads=2, intermediate=64, max_position=32,
                                   dropout=0.0)}[kind]
    _, task, meta, real = task_and_models(cfg)
    estimate = memory.activation_bytes(meta, task, 6, CPU)
    assert estimate == real_saved_bytes(real, task, 6)
    assert memory.activation_bytes(real, task, 6, CPU) == estimate  # the real model, its weights swapped for meta
    assert memory.activation_bytes(meta, task, 12, CPU) == pytest.approx(2 * estimate, rel=0.02)  # linear in the batch


def test_an_rnn_is_estimated_from_its_cells():
    """The meta device runs an LSTM cell by cell and counts the gates of every step; the CPU's
    oneDNN kernel keeps a workspace whose size is its own. The estimate keeps at least the hidden
    state of every step and grows with the batch."""
    _, task, meta, _ = task_and_models({**tiny_config(), "model": {"arch": "rnn", "cell": "lstm", "hidden": 16}})
    estimate = memory.activation_bytes(meta, task, 48, CPU)
    assert estimate >= 48 * 8 * 16 * 4
    assert memory.activation_bytes(meta, task, 96, CPU) == pytest.approx(2 * estimate, rel=0.02)


def test_the_mlp_estimate_matches_hand_math():
    """digits (64 features) → Linear(64, 32) → ReLU → Linear(32, 10) → cross-entropy, B rows: the
    first Linear keeps its input x for its weight's gradient (B×64), ReLU its output (B×32, which
    the second Linear keeps too: one tensor, counted once), the loss its log-softmax (B×10) and the
    targets (B int64), plus a scalar or two of bookkeeping."""
    _, task, meta, _ = task_and_models(tiny_config())
    b = 48
    hand = b * (64 + 32 + 10) * 4 + b * 8
    assert hand <= memory.activation_bytes(meta, task, b, CPU) <= hand + 16


def test_a_language_model_batch_too_large_for_memory_is_refused_before_work(shards, tmp_path):
    cfg = lm_config(shards)
    cfg["train"]["batch_size"] = 10_000_000
    # ≥ 10⁷ windows × 32 tokens × (logits and layer outputs, ≥ 100 floats each): terabytes
    with pytest.raises(ZerotuneError, match=r"train.batch_size: a micro-batch of 10,000,000 examples keeps about "
                                            r"[\d.]+ (GiB) of activations .* lower train.batch_size, raise "
                                            r"train.grad_accum"):
        api.train(cfg, out=tmp_path / "r", log=lambda *a: None)
    assert not (tmp_path / "r").exists()
    # grad_accum splits the same batch into micro-batches that fit: the estimate follows it
    cfg["train"]["batch_size"] = 4
    assert (api.train(cfg, out=tmp_path / "r", log=lambda *a: None) / "model.json").exists()


def test_activations_that_do_not_fit_the_memory_there_is_are_refused(monkeypatch, tmp_path):
    cfg, task, _, _ = task_and_models(tiny_config(batch_size=64))
    monkeypatch.setattr(memory, "available_memory", lambda: 16 * 2_410 + 10_000)  # the weights fit, a batch not
    with pytest.raises(ZerotuneError, match="a micro-batch of 64 examples keeps about"):
        memory.check_fits(cfg, task, torch.device("cpu"))
    cfg = load_config(tiny_config(batch_size=64, grad_accum=8))
    monkeypatch.setattr(memory, "available_memory", lambda: 16 * 2_410 + 4_000)
    memory.check_fits(cfg, task, torch.device("cpu"))  # 8 rows a micro-batch: fits


def test_a_fine_tuning_batch_whose_activations_do_not_fit_is_refused(monkeypatch, tmp_path):
    """MiniLM with LoRA: the activations of a micro-batch are counted on its real modules with
    their weights swapped for meta tensors (the frozen base keeps no weight gradients)."""
    from zerotune.finetune.api import finetune

    cfg = {"seed": 0, "task": "classification", "data": {"train": "builtin:docstrings", "max_length": 32},
           "finetune": {"method": "lora"}, "train": {"epochs": 1, "batch_size": 16, "progress": False}}
    monkeypatch.setattr(memory, "available_memory", lambda: 2**20)
    with pytest.raises(ZerotuneError, match=r"train.batch_size: a micro-batch of 16 examples keeps about [\d.]+ MiB "
                                            r"of activations .* more than the 1.00 MiB this cpu has left"):
        finetune(cfg, "minilm", out=tmp_path / "r", log=lambda *a: None)
    assert not (tmp_path / "r").exists()


def test_a_bf16_run_is_counted_at_half_the_activation_bytes(monkeypatch):
    cfg, task, meta, _ = task_and_models(tiny_config(batch_size=64))
    rows, fp32, dtype = memory.activations_of(meta, cfg, task, CPU, 1)
    assert (rows, dtype) == (64, "fp32") and fp32 == memory.activation_bytes(meta, task, 64, CPU)
    bf16 = load_config(tiny_config(batch_size=64, precision="bf16"))
    assert memory.activations_of(meta, bf16, task, CPU, 1)[1:] == (fp32 // 2, "bf16")
    # on a GPU, precision auto is bf16 autocast; 2 processes halve each one's share of the batch
    assert memory.micro_batch(load_config(tiny_config(batch_size=64)), task, torch.device("cuda"), 2) == (32, "bf16")
