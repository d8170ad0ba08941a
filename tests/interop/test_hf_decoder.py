"""Hugging Face decoder interop: logits parity both ways against transformers, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from zerotune.errors import ZerotuneError  # noqa: E402
from zerotune.generate import generate  # noqa: E402
from zerotune.interop.hf_decoder import (  # noqa: E402
    export_hf_decoder,
    hf_special_ids,
    load_hf_decoder,
    read_hf_decoder_config,
)
from zerotune.models.gpt import GPT, GPTConfig  # noqa: E402

TOL = dict(rtol=0, atol=1e-4)  # fp32, max abs logit difference
LLAMA = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
HF_CASES = {
    "gpt2": (transformers.GPT2Config, dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
    "llama-gqa-untied": (
        transformers.LlamaConfig,
        dict(LLAMA, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    ),
    "llama-llama3-tied-bias": (
        transformers.LlamaConfig,
        dict(LLAMA, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
             rope_parameters=LLAMA3),
    ),
    "llama-linear-headdim": (
        transformers.LlamaConfig, dict(LLAMA, num_key_value_heads=2, head_dim=16, rope_parameters=LINEAR)
    ),
    "mistral": (transformers.MistralConfig, dict(LLAMA, num_key_value_heads=2, sliding_window=32)),
    "qwen2": (transformers.Qwen2Config, dict(LLAMA, num_key_value_heads=2)),
}  # fmt: skip


def hf_model(name: str):
    config_cls, kwargs = HF_CASES[name]
    torch.manual_seed(0)
    config = config_cls(**kwargs, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # move every weight off its init (norms ≠ 1, biases ≠ 0) so parity is not trivial
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def ids(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 99, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", HF_CASES)
def test_hf_checkpoint_loads_with_same_logits(tmp_path, name):
    theirs = hf_model(name)
    theirs.save_pretrained(tmp_path)
    ours, cfg = load_hf_decoder(tmp_path)
    x = ids()
    expected = theirs(x).logits
    assert expected.std() > 0.3  # weights far from init, so agreement means something
    torch.testing.assert_close(ours(x), expected, **TOL)
    assert cfg.vocab_size == 99 and cfg.n_layer == 2
    assert cfg.block_size == (32 if name == "mistral" else 64)  # Mistral: exact within its sliding window


def test_original_gpt2_names_and_buffers(tmp_path):
    """The original GPT-2 checkpoints use bare names (h.0..., wte) and carry attention-mask buffers."""
    theirs = hf_model("gpt2")
    theirs.config.save_pretrained(tmp_path)
    tensors = {k.removeprefix("transformer."): v.contiguous() for k, v in theirs.state_dict().items()}
    tensors.pop("lm_head.weight", None)
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, _ = load_hf_decoder(tmp_path)
    torch.testing.assert_close(ours(ids()), theirs(ids()).logits, **TOL)


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    theirs = hf_model("llama-gqa-untied")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    theirs.config.save_pretrained(tmp_path / "bin")
    torch.save(theirs.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    x = ids()
    for folder in ("sharded", "bin"):
        ours, _ = load_hf_decoder(tmp_path / folder)
        torch.testing.assert_close(ours(x), theirs(x).logits, **TOL)


def test_old_and_new_rope_layouts_read_the_same(tmp_path):
    hf_model("llama-llama3-tied-bias").config.save_pretrained(tmp_path)
    new = read_hf_decoder_config(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in params.items()}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    old = read_hf_decoder_config(tmp_path)
    assert old == new and new.rope_scaling["rope_type"] == "llama3" and new.rope_theta == 10000.0


def test_greedy_generation_matches_transformers(tmp_path):
    theirs = hf_model("qwen2")
    theirs.save_pretrained(tmp_path)
    ours, _ = load_hf_decoder(tmp_path)
    prompt = [[5, 6, 7, 8]]
    expected = theirs.generate(torch.tensor(prompt), max_new_tokens=10, do_sample=False)[0, 4:].tolist()
    assert generate(ours, prompt, max_new_tokens=10, temperature=0) == [expected]


ZT_CASES = {
    "gpt2": dict(vocab_size=99, block_size=64, n_layer=2, n_head=4, d_model=32),
    "gpt2-untied": dict(vocab_size=99, block_size=64, n_layer=2, n_head=4, d_model=32, tie_embeddings=False),
    "llama": dict(vocab_size=99, block_size=64, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, d_ff=48,
                  mlp="swiglu", norm="rmsnorm", pos="rope", bias=False, tie_embeddings=False,
                  rope_theta=300.0, rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"}),
    "qwen2": dict(vocab_size=99, block_size=64, n_layer=2, n_head=4, n_kv_heads=1, d_model=32, d_ff=48,
                  mlp="swiglu", norm="rmsnorm", pos="rope", bias=False, qkv_bias=True),
}  # fmt: skip


@pytest.mark.parametrize("name", ZT_CASES)
def test_export_loads_in_transformers_with_same_logits(tmp_path, name):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**ZT_CASES[name]))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours.eval()
    export_hf_decoder(ours, ours.config, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    x = ids()
    expected = ours(x)
    assert expected.std() > 0.3
    torch.testing.assert_close(theirs(x).logits, expected, **TOL)
    again, cfg = load_hf_decoder(tmp_path)  # and back: the same model
    torch.testing.assert_close(again(x), expected, rtol=0, atol=1e-6)


def test_special_ids_written_and_read(tmp_path):
    model = GPT(GPTConfig(**ZT_CASES["llama"]))
    export_hf_decoder(model, model.config, tmp_path, bos_id=1, eos_id=2)
    assert hf_special_ids(tmp_path) == {"bos": 1, "eos": 2, "pad": None}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert hf_special_ids(tmp_path)["eos"] == [2, 7]
    assert transformers.AutoConfig.from_pretrained(tmp_path).eos_token_id == 2


# ---------------------------------------------------------------- bad input


@pytest.fixture
def llama_folder(tmp_path):
    hf_model("llama-gqa-untied").save_pretrained(tmp_path)
    return tmp_path


def rewrite_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_folder):
    rewrite_weights(llama_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ZerotuneError, match=r"tensor model.layers.1.mlp.up_proj.weight is missing"):
        load_hf_decoder(llama_folder)


def test_misshaped_tensor_is_named_with_its_file(llama_folder):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)

    rewrite_weights(llama_folder, edit)
    with pytest.raises(ZerotuneError) as e:
        load_hf_decoder(llama_folder)
    file = llama_folder / "model.safetensors"
    name = "model.layers.0.self_attn.k_proj.weight"
    assert str(e.value) == f"{file}: tensor {name} has shape (32, 32); config.json implies (16, 32)"


def test_unexpected_tensor_is_named(llama_folder):
    rewrite_weights(llama_folder, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(
        ZerotuneError, match=r"model.safetensors: unexpected tensor model.layers.0.extra.weight"
    ):
        load_hf_decoder(llama_folder)


def test_wrong_family_and_bad_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(
        ZerotuneError, match=r"config.json: model_type: 'bert' is not a decoder zerotune reads"
    ):
        load_hf_decoder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ZerotuneError, match=r"config.json: not valid JSON"):
        read_hf_decoder_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ZerotuneError, match=r"config.json: num_attention_heads: required key is missing"):
        read_hf_decoder_config(tmp_path)
    with pytest.raises(ZerotuneError, match=r"config.json: file not found"):
        read_hf_decoder_config(tmp_path / "nowhere")


def test_unsupported_settings_are_named(llama_folder):
    raw = json.loads((llama_folder / "config.json").read_text())
    (llama_folder / "config.json").write_text(
        json.dumps({**raw, "rope_parameters": {"rope_type": "yarn", "factor": 2}})
    )
    with pytest.raises(ZerotuneError, match=r"config.json: rope_scaling: unsupported rope_type 'yarn'"):
        read_hf_decoder_config(llama_folder)
    (llama_folder / "config.json").write_text(json.dumps({**raw, "hidden_act": "gelu"}))
    with pytest.raises(ZerotuneError, match=r"config.json: hidden_act: 'gelu' is not supported"):
        read_hf_decoder_config(llama_folder)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_no_weights_and_corrupt_weights(llama_folder):
    (llama_folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ZerotuneError, match=r"model.safetensors: not a readable safetensors file"):
        load_hf_decoder(llama_folder)
    (llama_folder / "model.safetensors").unlink()
    with pytest.raises(ZerotuneError, match=r"no weights: expected model.safetensors"):
        load_hf_decoder(llama_folder)
    (llama_folder / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ZerotuneError, match=r"pytorch_model.bin: cannot be loaded safely"):
        load_hf_decoder(llama_folder)


def test_export_refuses_layout_without_hf_family(tmp_path):
    model = GPT(GPTConfig(vocab_size=99, n_layer=1, n_head=2, d_model=16, pos="rope"))  # RoPE with LayerNorm
    with pytest.raises(ZerotuneError, match=r"model: no Hugging Face family has this layout \(pos=rope"):
        export_hf_decoder(model, model.config, tmp_path)
