"""A BERT-style encoder trained from scratch with the masked_lm task."""

import json

import pytest
import torch

from zerotune.data.shards import prepare
from zerotune.data.tokenizer import train_tokenizer
from zerotune.errors import ZerotuneError
from zerotune.evaluate.api import evaluate
from zerotune.train.api import train
from zerotune.train.tasks import MaskedLanguageModelTask


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm")
    docs = root / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"{i}.txt").write_text("the cat sat on the mat and the dog sat on the log. " * 5 + f"number {i}.")
    train_tokenizer(f"text:{docs}", 64, root / "tok", kind="char", progress=False)
    prepare(f"text:{docs}", root / "tok", root / "shards", val_fraction=0.1, progress=False)
    return root / "shards"


def config(shards, steps=120):
    return {"seed": 0, "task": "masked_lm",  # 300 steps: past the unigram plateau of MLM from scratch
            "data": {"train": f"shards:{shards}", "max_length": 32, "eval_batches": 2},
            "model": {"arch": "bert", "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64,
                      "max_position": 32, "dropout": 0.0},
            "optim": {"name": "adamw", "lr": 0.003},
            "train": {"epochs": None, "max_steps": steps, "batch_size": 16, "log_every": 20, "eval_every": 60,
                      "metrics": [], "progress": False}}


def test_masking_follows_the_bert_rule_and_is_a_function_of_the_step(shards):
    task = MaskedLanguageModelTask(str(shards), batch_size=64, block_size=32, seed=0, sampling="random",
                                   eval_batches=1)
    x1, y1 = task.batch(3)
    x2, y2 = task.batch(3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    chosen = y1 != -100
    assert 0.10 < chosen.float().mean() < 0.20  # 15 % of 2,048 tokens, binomial sd ≈ 0.8 %
    masked = (x1 == task.mask_id) & chosen
    assert 0.7 < masked.sum() / chosen.sum() < 0.9  # 80 % of the chosen become the mask token
    assert task.count(y1) == int(chosen.sum())


def test_encoder_learns_from_context_and_evaluates(shards, tmp_path):
    from zerotune.data.shards import ShardDataset

    run = train(config(shards, steps=300), out=tmp_path / "r", log=lambda *a: None)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2
    result = evaluate(run)
    assert {"loss", "perplexity", "accuracy"} <= set(result)
    # better than always guessing the most frequent token of the val text: the model uses context
    val = torch.cat([x.flatten() for x, _ in ShardDataset(shards, "val").eval_batches(16, 32)])
    baseline = torch.bincount(val).max().item() / len(val)
    assert result["accuracy"] > baseline + 0.1


def test_masked_lm_needs_a_bert_and_shards(shards, tmp_path):
    cfg = config(shards)
    cfg["model"] = {"arch": "gpt", "block_size": 32, "n_layer": 1, "n_head": 2, "d_model": 16}
    with pytest.raises(ZerotuneError, match="task masked_lm trains an encoder"):
        train(cfg, out=tmp_path / "a", log=lambda *a: None)
