"""LoRA against ``peft`` on the same BERT: outputs, gradients and AdamW steps; merge, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertModel

from zerotune.errors import ZerotuneError
from zerotune.finetune.lora import (
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
    unwrap_lora,
)
from zerotune.interop.hf_bert import encoder_name_to_hf, save_hf_bert
from zerotune.models.bert import BERT, BERTConfig

R, ALPHA = 4, 8.0
CFG = BERTConfig(vocab_size=99, hidden=32, layers=2, heads=4, intermediate=37, max_position=32)


def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (3, 8), generator=g)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0
    weights = torch.randn(3, 8, 32, generator=g)  # a fixed random projection makes a scalar loss
    return ids, mask, weights


def loss_of(h: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return ((h * weights).sum(-1) * mask).sum()


def twin_models(tmp_path):
    """Our BERT + our LoRA and transformers' BertModel + peft LoRA, same base, same non-zero adapters."""
    torch.manual_seed(0)
    ours = BERT(CFG).eval()
    save_hf_bert(ours, tmp_path / "base")
    theirs = BertModel.from_pretrained(tmp_path / "base").eval()
    names = apply_lora(ours, ["query", "value"], r=R, alpha=ALPHA)
    mark_only_lora_as_trainable(ours)
    theirs = get_peft_model(
        theirs, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["query", "value"])
    )
    pairs = []  # (our parameter, peft parameter)
    their_params = dict(theirs.named_parameters())
    for name in names:
        layer = ours.get_submodule(name)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)  # non-zero so the adapter path is exercised
        hf = "base_model.model." + encoder_name_to_hf(name + ".weight").removesuffix(".weight")
        for ab in ("lora_A", "lora_B"):
            p = their_params[f"{hf}.{ab}.default.weight"]
            with torch.no_grad():
                p.copy_(getattr(layer, ab))
            pairs.append((getattr(layer, ab), p))
    return ours, theirs, names, pairs


def test_matches_peft_outputs_gradients_and_adamw_steps(tmp_path):
    ours, theirs, names, pairs = twin_models(tmp_path)
    assert len(names) == 4
    ids, mask, weights = inputs()
    opt_ours = torch.optim.AdamW([a for a, _ in pairs], lr=1e-2, weight_decay=0.01)
    opt_theirs = torch.optim.AdamW([b for _, b in pairs], lr=1e-2, weight_decay=0.01)
    assert {id(p) for p in ours.parameters() if p.requires_grad} == {id(a) for a, _ in pairs}
    assert {id(p) for p in theirs.parameters() if p.requires_grad} == {id(b) for _, b in pairs}
    for step in range(4):
        h_ours = ours(ids, attention_mask=mask)
        h_theirs = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.bool()
        torch.testing.assert_close(h_ours[m], h_theirs[m], atol=1e-5, rtol=0)
        if step == 3:
            break  # outputs after 3 optimizer steps checked above
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
        loss_of(h_ours, mask, weights).backward()
        loss_of(h_theirs, mask, weights).backward()
        for a, b in pairs:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)
        opt_ours.step()
        opt_theirs.step()
    for a, b in pairs:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_zero_b_starts_from_the_base_model():
    torch.manual_seed(0)
    base = BERT(CFG).eval()
    ids, mask, _ = inputs()
    with torch.no_grad():
        before = base(ids, attention_mask=mask)
        apply_lora(base, ["layers.*.attn.*", "ffn.up"], r=R, alpha=ALPHA)
        torch.testing.assert_close(base(ids, attention_mask=mask), before, atol=0, rtol=0)


def test_layer_formula_by_hand():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    layer = LoRALinear(linear, r=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = x @ linear.weight.T + linear.bias + 1.5 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    bound = (1 / 6) ** 0.5  # Kaiming-uniform with a=√5: U(-1/√fan_in, 1/√fan_in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > 0.2 * bound


def test_merged_equals_unmerged_and_unmerge_restores(tmp_path):
    ours, _, _, _ = twin_models(tmp_path)
    ids, mask, _ = inputs()
    weight = ours.layers[0].attn.query.base.weight.detach().clone()
    with torch.no_grad():
        unmerged = ours(ids, attention_mask=mask)
        assert merge_lora(ours) == 4
        assert not torch.equal(ours.layers[0].attn.query.base.weight, weight)
        torch.testing.assert_close(ours(ids, attention_mask=mask), unmerged, atol=1e-5, rtol=0)
        assert unmerge_lora(ours) == 4
        torch.testing.assert_close(ours.layers[0].attn.query.base.weight, weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(ids, attention_mask=mask), unmerged, atol=1e-6, rtol=0)
        unwrap_lora(ours)
        assert not any(isinstance(m, LoRALinear) for m in ours.modules())
        torch.testing.assert_close(ours(ids, attention_mask=mask), unmerged, atol=1e-5, rtol=0)


def test_export_with_adapters_writes_merged_weights(tmp_path):
    ours, _, _, _ = twin_models(tmp_path)
    save_hf_bert(ours, tmp_path / "merged")
    assert len(lora_layers(ours)) == 4 and not any(layer.merged for layer in lora_layers(ours).values())
    ref = BertModel.from_pretrained(tmp_path / "merged").eval()
    ids, mask, _ = inputs()
    with torch.no_grad():
        m = mask.bool()
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(ours(ids, attention_mask=mask)[m], theirs[m], atol=1e-5, rtol=0)


def test_trainable_count_by_hand(tmp_path):
    ours, _, _, _ = twin_models(tmp_path)
    # 2 layers × (query, value) × (A: r×32 + B: 32×r)
    assert mark_only_lora_as_trainable(ours) == 2 * 2 * (R * 32 + 32 * R)
    head = nn.Linear(32, 3)
    ours.add_module("head", head)
    assert mark_only_lora_as_trainable(ours, also=["head.*"]) == 2 * 2 * (R * 32 + 32 * R) + 32 * 3 + 3


def test_adapter_state_saved_alone_and_reloaded(tmp_path):
    ours, _, names, _ = twin_models(tmp_path)
    state = lora_state_dict(ours)
    assert sorted(state) == sorted(f"{n}.{ab}" for n in names for ab in ("lora_A", "lora_B"))
    save_file(state, tmp_path / "adapter.safetensors")
    assert (tmp_path / "adapter.safetensors").stat().st_size < 10_000
    torch.manual_seed(0)
    fresh = BERT(CFG).eval()  # same seed → same base weights
    apply_lora(fresh, ["query", "value"], r=R, alpha=ALPHA)
    merge_lora(fresh)  # loading into a merged model re-merges with the new adapters
    load_lora_state_dict(fresh, load_file(tmp_path / "adapter.safetensors"))
    ids, mask, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(ids, attention_mask=mask), ours(ids, attention_mask=mask), atol=1e-5, rtol=0
        )


def test_errors(tmp_path):
    ours, _, _, _ = twin_models(tmp_path)
    with pytest.raises(ZerotuneError, match=r"lora.targets: \['qkv'\] matched no linear layer; .*'query'"):
        apply_lora(BERT(CFG), ["qkv"])
    with pytest.raises(ZerotuneError, match="call apply_lora first"):
        mark_only_lora_as_trainable(BERT(CFG))
    state = lora_state_dict(ours)
    missing = {k: v for k, v in state.items() if k != "layers.1.attn.value.lora_B"}
    with pytest.raises(
        ZerotuneError, match=r"adapter.safetensors: missing adapter tensor 'layers.1.attn.value.lora_B'"
    ):
        load_lora_state_dict(ours, missing, path="adapter.safetensors")
    bad = {**state, "layers.0.attn.query.lora_A": torch.zeros(R + 1, 32)}
    with pytest.raises(ZerotuneError, match=r"tensor 'layers.0.attn.query.lora_A' has shape \[5, 32\]"):
        load_lora_state_dict(ours, bad)
    with pytest.raises(ZerotuneError, match=r"unexpected tensor 'layers.0.attn.key.lora_A'"):
        load_lora_state_dict(ours, {**state, "layers.0.attn.key.lora_A": torch.zeros(R, 32)})
    with pytest.raises(ZerotuneError, match="lora.r"):
        LoRALinear(nn.Linear(2, 2), r=0)
