import json

import pytest
import torch

from tests.helpers import write_char_shards
from zerotune import files
from zerotune.errors import ZerotuneError
from zerotune.evaluate.api import evaluate
from zerotune.generate import generate_text
from zerotune.train.api import train
from zerotune.train.tasks import LanguageModelTask

QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # the same short sentence over and over: a model can learn it exactly
    return write_char_shards(tmp_path_factory.mktemp("corpus"), "the cat sat on the mat. " * 6, 40, 0.1)


def lm_config(shards, **train_keys):
    return {
        "seed": 0, "task": "causal_lm",
        "data": {"train": f"shards:{shards}", "eval_batches": 2},
        "model": {"arch": "gpt", "block_size": 32, "n_layer": 2, "n_head": 2, "d_model": 32, "dropout": 0.0},
        "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
        "train": {"epochs": None, "max_steps": 150, "batch_size": 8, "log_every": 10, "eval_every": 50,
                  "progress": False, "metrics": []} | train_keys,
    }


def losses(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_on_a_repeated_corpus_falls_near_zero_and_logs_lm_fields(shards, tmp_path):
    run = train(lm_config(shards), out=tmp_path / "r", **QUIET)
    rows = losses(run)
    assert rows[0]["loss"] > 2.0
    assert rows[-1]["loss"] < 0.35  # only the digits of "doc N" and document starts stay unpredictable
    assert {"step", "loss", "lr", "tokens_per_sec", "mfu"} <= set(rows[0])
    result = evaluate(run)
    assert set(result) >= {"loss", "perplexity", "split", "n"}
    assert result["perplexity"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-6)
    assert (run / "tokenizer.json").exists()
    assert json.loads((run / "model.json").read_text())["model"]["vocab_size"] == result_vocab(shards)


def test_resume_continues_with_identical_losses(shards, tmp_path, monkeypatch):
    cfg = lm_config(shards, max_steps=40, checkpoint_every=10, eval_every=20)
    cfg["model"]["dropout"] = 0.1
    full = train(cfg, out=tmp_path / "full", **QUIET)
    real = LanguageModelTask.batch

    def crash(self, step):
        if step == 25:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(LanguageModelTask, "batch", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "cut", **QUIET)
    monkeypatch.setattr(LanguageModelTask, "batch", real)
    cut = train(resume=tmp_path / "cut", **QUIET)
    assert [r.get("loss") for r in losses(cut)] == [r.get("loss") for r in losses(full)]
    a, b = files.load_weights(full / "model.safetensors"), files.load_weights(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generation_is_deterministic_for_a_seed(shards, tmp_path):
    run = train(lm_config(shards, max_steps=100), out=tmp_path / "r", **QUIET)
    one = generate_text(run, ["the cat"], max_new_tokens=20, seed=3, top_k=5)
    two = generate_text(run, ["the cat"], max_new_tokens=20, seed=3, top_k=5)
    assert one == two and len(one[0]) > 0
    greedy = generate_text(run, ["the cat sat on the"], max_new_tokens=6, temperature=0)
    assert greedy[0].startswith(" mat")  # learnt the sentence


def test_vocab_mismatch_and_wrong_data_are_clear_errors(shards, tmp_path):
    cfg = lm_config(shards)
    cfg["model"]["vocab_size"] = 10
    with pytest.raises(ZerotuneError, match="model.vocab_size: 10 is smaller than the tokenizer's vocabulary"):
        train(cfg, out=tmp_path / "a", **QUIET)
    cfg = lm_config(shards)
    cfg["data"]["train"] = "builtin:digits"
    with pytest.raises(ZerotuneError, match="task causal_lm reads token shards"):
        train(cfg, out=tmp_path / "b", **QUIET)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def result_vocab(shards):
    from zerotune.data.shards import ShardDataset

    return ShardDataset(shards).vocab_size
