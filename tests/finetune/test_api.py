"""The finetune verb: MiniLM (builtin) with LoRA and freezing, a GPT run with LoRA on shards, digits transfer."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zerotune
from zerotune.errors import ZerotuneError
from zerotune.finetune.api import finetune
from zerotune.finetune.lora import lora_layers
from zerotune.interop.hf import minilm_folder
from zerotune.interop.hf_bert import load_hf_bert
from zerotune.load import load_run

H, I_, K = 384, 1536, 2  # MiniLM width, feed-forward width; two classes

POSITIVE = ["a lovely bright sunny morning", "what a great and happy day", "the best film i have seen",
            "wonderful kind people here", "i love this warm cozy place"]
NEGATIVE = ["a cold grey miserable night", "what an awful and sad day", "the worst film i have seen",
            "rude unpleasant people here", "i hate this noisy dirty place"]


def write_text_csv(path: Path, repeat: int = 2) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(repeat):
            w.writerows([(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE])
    return path


def text_config(csv_path: Path, **finetune_section) -> dict:
    cfg = {"seed": 0,
           "data": {"train": f"csv:{csv_path}", "max_length": 8, "test_split": 0.2, "val_split": 0.0},
           "optim": {"name": "adamw", "lr": 5e-3},
           "train": {"max_steps": 2, "batch_size": 4, "progress": False, "log_every": 1}}
    if finetune_section:
        cfg["finetune"] = finetune_section
    return cfg


@pytest.fixture(scope="module")
def minilm_weights() -> dict[str, torch.Tensor]:
    model, _ = load_hf_bert(minilm_folder())
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lora")
    data = write_text_csv(tmp / "reviews.csv")
    cfg = text_config(data, lora={"r": 4, "alpha": 8})
    return finetune(cfg, "minilm", method="lora", out=tmp / "run", log=lambda *_: None)


def test_lora_run_saves_small_adapter_and_counts_by_hand(lora_run):
    meta = json.loads((lora_run / "model.json").read_text())
    assert meta["base"] == "minilm" and meta["method"] == "lora"
    assert meta["lora"]["targets"] == ["query", "value"] and len(meta["lora"]["modules"]) == 12
    # 6 layers × (query, value) × r·(in + out), plus the new head H·K + K
    assert meta["trainable_parameters"] == 12 * 4 * (H + H) + H * K + K
    adapter = lora_run / "adapter.safetensors"
    assert not (lora_run / "model.safetensors").exists()
    assert adapter.stat().st_size < 0.01 * (minilm_folder() / "model.safetensors").stat().st_size
    tensors = load_file(adapter)
    assert set(tensors) == {f"{m}.lora_{ab}" for m in meta["lora"]["modules"] for ab in "AB"} | {"head.weight",
                                                                                                  "head.bias"}
    for name, t in tensors.items():  # B starts at zero: every B that trained has moved
        if name.endswith("lora_B"):
            assert t.abs().max() > 0, name
    for f in ("config.yaml", "tokenizer.json", "metrics.jsonl", "report.md"):
        assert (lora_run / f).is_file(), f


def test_a_lora_model_json_edited_to_another_rank_or_without_keys_is_one_line(lora_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    meta = json.loads((run / "model.json").read_text())
    for edit, message in [({"r": 2**30}, r"lora.r is 1073741824 but .*lora_A in adapter.safetensors has rank 4"),
                          ({"alpha": "big"}, r"lora.alpha: expected a number, got 'big'"),
                          ({"alpha": -1}, r"lora.alpha: input should be greater than 0")]:
        (run / "model.json").write_text(json.dumps({**meta, "lora": {**meta["lora"], **edit}}))
        with pytest.raises(ZerotuneError, match=rf"model.json: {message}"):
            load_run(run)
    del meta["lora"]["dropout"]
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ZerotuneError, match=r"model.json: lora.dropout: required key is missing"):
        load_run(run)


def test_lora_run_rebuilds_base_plus_adapters(lora_run, minilm_weights):
    loaded = load_run(lora_run)
    model = loaded.model
    assert len(lora_layers(model)) == 12
    adapter = load_file(lora_run / "adapter.safetensors")
    for name, t in model.state_dict().items():
        if name in adapter:
            torch.testing.assert_close(t, adapter[name], rtol=0, atol=0)
        elif name.startswith("body."):  # frozen base: exactly MiniLM's weights
            key = name.removeprefix("body.").replace(".base.", ".")
            torch.testing.assert_close(t, minilm_weights[key], rtol=0, atol=0)
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0]])
    assert model(ids).shape == (1, K)


def test_evaluate_and_predict_on_lora_run(lora_run, tmp_path):
    result = zerotune.evaluate(lora_run)
    assert result["n"] == 4 and 0 <= result["accuracy"] <= 1
    new = write_text_csv(tmp_path / "new.csv", repeat=1)
    out = zerotune.predict(lora_run, str(new), tmp_path / "pred.csv")
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 10 and {r["prediction"] for r in rows} <= {"neg", "pos"}


def test_freeze_train_last_block(tmp_path, minilm_weights):
    data = write_text_csv(tmp_path / "reviews.csv")
    run = finetune(text_config(data, train_last=1), "minilm", method="freeze", out=tmp_path / "run",
                   log=lambda *_: None)
    meta = json.loads((run / "model.json").read_text())
    layer = 4 * (H * H + H) + (H * I_ + I_) + (I_ * H + H) + 4 * H
    assert meta["trainable_parameters"] == layer + H * K + K
    weights = load_file(run / "model.safetensors")
    for name, ref in minilm_weights.items():
        mine = weights[f"body.{name}"]
        if name.startswith("layers.5."):
            assert not torch.equal(mine, ref), name  # trained
        else:
            torch.testing.assert_close(mine, ref, rtol=0, atol=0)  # frozen: unchanged


# ---------------------------------------------------------------- GPT: a run, then LoRA on shards


def make_gpt_source(tmp: Path) -> tuple[Path, Path]:
    """A tiny Hugging Face GPT-2 folder with a zerotune tokenizer, and token shards from the same tokenizer."""
    import transformers

    from zerotune.data.shards import prepare
    from zerotune.data.tokenizer import train_tokenizer

    corpus = tmp / "corpus.jsonl"
    words = "the cat sat on a mat and the dog ran to the park while birds sang".split()
    rng = random.Random(0)
    with open(corpus, "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) + "\n")
    tok_file = train_tokenizer(f"jsonl:{corpus}", 300, tmp / "tok", progress=False)
    shards = tmp / "shards"
    prepare(f"jsonl:{corpus}", tok_file.parent, shards, val_fraction=0.2, progress=False)
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    folder = tmp / "hf-gpt2"
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(folder)
    shutil.copyfile(tok_file, folder / "tokenizer.json")
    return folder, shards


@pytest.fixture(scope="module")
def gpt_source(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("transformers")
    return make_gpt_source(tmp_path_factory.mktemp("gpt"))


def lm_config(shards: Path) -> dict:
    return {"seed": 0, "task": "causal_lm", "data": {"train": f"shards:{shards}", "max_length": 16},
            "optim": {"name": "adamw", "lr": 3e-3},
            "train": {"max_steps": 3, "batch_size": 4, "progress": False, "log_every": 1}}


@pytest.fixture(scope="module")
def gpt_lora_run(gpt_source, tmp_path_factory) -> Path:
    folder, shards = gpt_source
    tmp = tmp_path_factory.mktemp("gptruns")
    base = finetune(lm_config(shards), folder, out=tmp / "full", log=lambda *_: None)  # a zerotune GPT run
    return finetune(lm_config(shards), base, method="lora", out=tmp / "lora", log=lambda *_: None)


def test_gpt_run_lora_on_shards_then_generate(gpt_lora_run):
    from zerotune.generate import generate

    meta = json.loads((gpt_lora_run / "model.json").read_text())
    assert meta["method"] == "lora" and meta["lora"]["modules"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert meta["trainable_parameters"] == 2 * 8 * (32 + 96)  # r·(in + out) per fused q/k/v projection
    loaded = load_run(gpt_lora_run)
    assert len(lora_layers(loaded.model)) == 2
    prompt = loaded.tokenizer.encode("the cat").ids
    out = generate(loaded.model, [prompt], max_new_tokens=5, temperature=0, seed=0)
    assert len(out[0]) == 5 and all(0 <= t < 300 for t in out[0])


@pytest.fixture(scope="module")
def gpt_run_source(gpt_source, tmp_path_factory) -> Path:
    """A tiny zerotune GPT run over the same shards: no dropout, block size 32."""
    _, shards = gpt_source
    cfg = {"seed": 0, "task": "causal_lm", "data": {"train": f"shards:{shards}"},
           "model": {"arch": "gpt", "block_size": 32, "n_layer": 1, "n_head": 2, "d_model": 16},
           "train": {"epochs": None, "max_steps": 1, "batch_size": 4, "progress": False}}
    return zerotune.train(cfg, out=tmp_path_factory.mktemp("gptrun") / "src", log=lambda *_: None)


def test_causal_lm_finetune_follows_the_data_section(gpt_source, gpt_run_source, tmp_path):
    """Windows of min(data.max_length, block size), drawn per data.sampling; data.eval_batches to evaluate."""
    from zerotune.data.shards import ShardDataset

    _, shards = gpt_source
    cfg = lm_config(shards)  # data.max_length 16 < block size 32; batch 4; 3 steps
    cfg["data"] |= {"sampling": "sequential", "eval_batches": 2}
    run = finetune(cfg, gpt_run_source, out=tmp_path / "run", log=lambda *_: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    @torch.no_grad()
    def summed_loss(model, x, y) -> float:
        return float(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum"))

    x, y = ShardDataset(shards, "train").batch(0, 4, 16, mode="sequential")  # the first 4 windows, in order
    assert rows[0]["step"] == 1  # the loss logged after step 1 is that of step 0's batch, before the update
    assert rows[0]["loss"] == pytest.approx(summed_loss(load_run(gpt_run_source).model, x, y) / y.numel(), rel=1e-5)

    val = ShardDataset(shards, "val")
    assert val.n_tokens > 3 * 4 * 16  # more than 2 batches of windows: the limit matters
    model = load_run(run).model
    batches = list(val.eval_batches(4, 16, 2))
    expected = sum(summed_loss(model, x, y) for x, y in batches) / (2 * 4 * 16)
    assert len(batches) == 2 and rows[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)
    every = list(val.eval_batches(4, 16))  # `zerotune evaluate` reads all of the val split, in the same windows
    expected = sum(summed_loss(model, x, y) for x, y in every) / sum(y.numel() for _, y in every)
    assert zerotune.evaluate(run)["loss"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- classic nets: digits transfer


def digits_cfg(classes: list[int], **extra) -> dict:
    return {"seed": 0, "data": {"train": "builtin:digits", "classes": classes, "val_split": 0.1},
            "model": {"arch": "cnn", "channels": [8], "hidden": [16]}, "optim": {"name": "adam", "lr": 0.01},
            "train": {"epochs": 2, "batch_size": 64, "progress": False, "log_every": 5, "keep_last": 2}} | extra


@pytest.fixture(scope="module")
def digits_source(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("digits")
    return zerotune.train(digits_cfg([0, 1, 2, 3, 4]), out=tmp / "src", log=lambda *_: None)


def test_digits_transfer_trains_only_the_new_head(digits_source, tmp_path):
    run = finetune(digits_cfg([5, 6, 7, 8, 9], finetune={"head_only": True}), digits_source, method="freeze",
                   out=tmp_path / "transfer", log=lambda *_: None)
    meta = json.loads((run / "model.json").read_text())
    assert meta["data_info"]["classes"] == ["5", "6", "7", "8", "9"]
    # the head MLP: flatten 8 channels × 4 × 4 → 16 → 5 (its last layer replaced for the new labels)
    assert meta["trainable_parameters"] == (128 * 16 + 16) + (16 * 5 + 5)
    before, after = load_file(digits_source / "model.safetensors"), load_file(run / "model.safetensors")
    for k in after:
        if k.startswith("head."):
            assert not torch.equal(after[k], before[k]), k  # trained
        else:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)  # frozen body
    assert zerotune.evaluate(run)["accuracy"] > 0.5  # frozen 0–4 features carry over to 5–9


def test_resume_finishes_like_an_uninterrupted_run(digits_source, tmp_path):
    cfg = digits_cfg([5, 6, 7, 8, 9], finetune={"freeze": ["features.*"]})
    cfg["train"] |= {"max_steps": 6, "checkpoint_every": 1, "epochs": None}
    whole = finetune(cfg, digits_source, method="freeze", out=tmp_path / "whole", log=lambda *_: None)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    (cut / "model.json").unlink()
    shutil.rmtree(cut / "checkpoints" / "step-000006")  # as if stopped after step 5
    finetune(resume=cut, log=lambda *_: None)
    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def cut_short(whole: Path, cut: Path) -> Path:
    """A copy of a finished run as if it had stopped one step before the end: no final model, the
    last checkpoint gone."""
    shutil.copytree(whole, cut)
    for name in ("model.json", "model.safetensors", "adapter.safetensors", "chat_template.json", "report.md"):
        (cut / name).unlink(missing_ok=True)
    steps = sorted((cut / "checkpoints").glob("step-*"))
    shutil.rmtree(steps[-1])
    return cut


def sft_config(tmp: Path) -> dict:
    rows = tmp / "sft.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"name {w}", "output": f"the {w}"}) + "\n"
                            for w in "cat dog mat park bird sun".split()))
    return {"seed": 0, "task": "sft", "data": {"train": f"jsonl:{rows}", "val_split": 0.2},
            "optim": {"name": "adamw", "lr": 3e-3},
            "train": {"max_steps": 4, "batch_size": 2, "progress": False, "log_every": 1}}


@pytest.mark.parametrize("case", ["lora", "qlora", "new head", "sft"])
def test_zerotune_resume_continues_a_fine_tuning_run_as_one(case, gpt_source, digits_source, tmp_path):
    folder, shards = gpt_source
    every = {"max_steps": 4, "checkpoint_every": 1, "epochs": None}
    if case == "qlora":
        pytest.importorskip("bitsandbytes")
    if case in ("lora", "qlora"):
        cfg, source, method, weights = lm_config(shards), folder, case, "adapter.safetensors"
        # 8-bit: bitsandbytes' 4-bit CPU kernel cannot repack layers narrower than its block of 64 (this GPT is 32 wide)
        cfg["finetune"] = {"qlora_bits": 8}
    elif case == "new head":  # the digits source knows 0–4; a new output layer for 5–9
        cfg, source, method, weights = digits_cfg([5, 6, 7, 8, 9]), digits_source, "full", "model.safetensors"
    else:
        cfg, source, method, weights = sft_config(tmp_path), folder, "lora", "adapter.safetensors"
    cfg["train"] |= every
    whole = finetune(cfg, source, method=method, out=tmp_path / "whole", log=lambda *_: None)
    cut = cut_short(whole, tmp_path / "cut")
    lines: list[str] = []
    assert zerotune.resume(cut, log=lines.append) == cut
    assert lines[0] == f"resuming {cut} from step-000003"
    a, b = load_file(whole / weights), load_file(cut / weights)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    before, after = (json.loads((r / "model.json").read_text()) for r in (whole, cut))
    assert {k: after[k] for k in ("method", "base", "step", "task")} == {k: before[k] for k in
                                                                         ("method", "base", "step", "task")}
    if case == "sft":
        assert (cut / "chat_template.json").read_text() == (whole / "chat_template.json").read_text()


def test_train_resume_on_the_command_line_continues_a_fine_tuning_run(gpt_source, tmp_path):
    from zerotune.cli import main

    folder, shards = gpt_source
    cfg = lm_config(shards)
    cfg["train"] |= {"max_steps": 4, "checkpoint_every": 1}
    whole = finetune(cfg, folder, method="lora", out=tmp_path / "whole", log=lambda *_: None)
    cut = cut_short(whole, tmp_path / "cut")
    with pytest.raises(ZerotuneError, match=r"cut: a fine-tuning run: continue it with zerotune.resume"):
        zerotune.train(resume=cut)  # the from-scratch verb would train a new model on it
    assert main(["train", "--resume", str(cut)]) == 0
    a, b = load_file(whole / "adapter.safetensors"), load_file(cut / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------- bad input


def test_bad_source_is_one_line(tmp_path):
    with pytest.raises(ZerotuneError, match=r"nowhere.*expected a zerotune run folder"):
        finetune({}, tmp_path / "nowhere")
    with pytest.raises(ZerotuneError, match="--method: expected one of"):
        finetune({}, "minilm", method="magic")


def test_wrong_family_is_one_line(digits_source, gpt_source):
    _, shards = gpt_source
    with pytest.raises(ZerotuneError, match=r"src: task causal_lm: needs a gpt model, but SOURCE is a cnn"):
        finetune(lm_config(shards), digits_source)


def test_missing_adapter_tensor_names_file_and_tensor(lora_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(lora_run, broken, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    tensors = load_file(broken / "adapter.safetensors")
    del tensors["body.layers.3.attn.value.lora_A"]
    save_file(tensors, broken / "adapter.safetensors")
    with pytest.raises(ZerotuneError, match=r"adapter.safetensors: missing adapter tensor "
                                            r"'body.layers.3.attn.value.lora_A'"):
        load_run(broken)


def test_gpt_sequence_classifier_pools_last_token(gpt_source, tmp_path):
    folder, _ = gpt_source
    with open(tmp_path / "pets.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([("the cat sat on a mat", "cat"), ("the dog ran to the park", "dog")] * 10)
    cfg = text_config(tmp_path / "pets.csv")
    run = finetune(cfg, folder, method="lora", out=tmp_path / "run", log=lambda *_: None)
    meta = json.loads((run / "model.json").read_text())
    assert meta["head"] == {"pooling": "last"}
    assert meta["trainable_parameters"] == 2 * 8 * (32 + 96) + 32 * 2 + 2  # adapters + the new head
    loaded = load_run(run)
    ids = torch.tensor([loaded.tokenizer.encode("the cat sat").ids + [0] * 5])  # right padding, pad id 0
    with torch.no_grad():
        logits = loaded.model(ids)
        hidden = loaded.model.body(ids)  # (1, 8, 32): the decoder's final-norm states
    n_real = len(loaded.tokenizer.encode("the cat sat").ids)
    expected = loaded.model.head(hidden[:, n_real - 1])  # the last real token, by hand
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert zerotune.evaluate(run)["n"] == 4
    from zerotune.interop.export import export

    with pytest.raises(ZerotuneError, match="--format hf: a GPT sequence classifier has no Hugging Face"):
        export(run, "hf", tmp_path / "hf")


def test_an_sft_run_exported_to_hugging_face_carries_its_chat_template(gpt_source, tmp_path):
    """transformers' apply_chat_template on the export gives the ids zerotune's template gives."""
    transformers = pytest.importorskip("transformers")
    from zerotune.data.chat import chat_prompt_ids, load_chat_template
    from zerotune.data.tokenizer import load_tokenizer

    folder, _ = gpt_source
    cfg = sft_config(tmp_path)
    cfg["train"] |= {"max_steps": 1}
    cfg["sft"] = {"template": {"default_system": "be brief"}}
    run = finetune(cfg, folder, method="lora", out=tmp_path / "sft", log=lambda *_: None)
    out = zerotune.export(run, "hf", tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    chat = [{"role": "user", "content": "name cat"}, {"role": "assistant", "content": "the cat"},
            {"role": "user", "content": "name dog"}]
    ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == chat_prompt_ids(chat, load_tokenizer(run / "tokenizer.json"), load_chat_template(run))
    assert hf.eos_token == "<|end|>"
