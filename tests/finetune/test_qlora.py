import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("bitsandbytes")

from zerotune.errors import ZerotuneError  # noqa: E402
from zerotune.finetune.lora import LoRALinear, apply_lora, lora_layers, mark_only_lora_as_trainable, unwrap_lora  # noqa: E402
from zerotune.finetune.qlora import (  # noqa: E402
    dequantize_model,
    dequantize_weight,
    is_quantized,
    quantize_for_qlora,
    quantize_linear,
)
from zerotune.models.gpt import GPTConfig, build  # noqa: E402
from zerotune.spec import DataInfo  # noqa: E402

# The 16 NormalFloat levels, QLoRA paper (Dettmers et al., 2023), appendix E
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def prepare_qlora(model: nn.Module, targets: list[str], r: int = 8, alpha: float = 16.0, bits: int = 4) -> int:
    """LoRA on ``targets``, then quantize the frozen linear layers, then train only the adapters."""
    apply_lora(model, targets, r, alpha)
    quantize_for_qlora(model, bits)
    return mark_only_lora_as_trainable(model)


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the quantized layers' weights take, bytes the same weights take in fp32): the packed
    weights and everything needed to dequantize them (block maxima, their own quantization state,
    the codebook, int8 row scales); biases are not counted."""
    import bitsandbytes as bnb

    stored, fp32 = 0, 0
    for m in model.modules():
        if not is_quantized(m):
            continue
        w = m.weight
        stored += w.data.numel() * w.data.element_size()
        fp32 += m.in_features * m.out_features * 4
        if isinstance(m, bnb.nn.Linear4bit):
            state = w.quant_state
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
            stored += sum(t.numel() * t.element_size() for t in tensors)
        else:
            scb = getattr(m.weight, "SCB", None)
            scb = scb if scb is not None else m.state.SCB
            stored += scb.numel() * scb.element_size()
    return stored, fp32


def nf4_reference(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Quantize-dequantize by hand: blockwise absmax, nearest NF4 level."""
    flat = w.reshape(-1, block)  # (n_blocks, block)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    index = ((flat / absmax)[..., None] - NF4).abs().argmin(-1)  # nearest level
    return (NF4[index] * absmax).reshape(w.shape)


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, d_model=64, **kw)
    return build(cfg, DataInfo("tokens", [16], target="causal_lm", vocab_size=96))


def test_nf4_weight_matches_hand_reference():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    nn.init.normal_(lin.weight, 0, 0.05)
    q = quantize_linear(lin, 4, double_quant=False)
    assert is_quantized(q) and not q.weight.requires_grad
    # dequantized values are level × fp32 absmax: equal to the hand computation up to fp32 rounding
    torch.testing.assert_close(dequantize_weight(q), nf4_reference(lin.weight.detach()), rtol=0, atol=1e-7)


def test_int8_weight_matches_hand_reference():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = quantize_linear(lin, 8)
    w = lin.weight.detach().half().float()  # LLM.int8() quantizes the fp16 weight
    scale = w.abs().amax(dim=1, keepdim=True)  # per output row
    expected = torch.round(w * (127 / scale)) * scale / 127
    torch.testing.assert_close(dequantize_weight(q), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits", [4, 8])
def test_layer_computes_with_dequantized_weight(bits):
    torch.manual_seed(1)
    lin = nn.Linear(128, 64)
    q = quantize_linear(lin, bits)
    x = torch.randn(5, 128, requires_grad=True)
    y = q(x)  # (5, 64)
    w = dequantize_weight(q)
    # the kernels compute in fp32 from the dequantized weight: fp32 matmul tolerance
    torch.testing.assert_close(y, x @ w.T + lin.bias, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(gx, (2 * y.detach()) @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bits", "max_rel"), [(4, 0.15), (8, 0.02)])
def test_bytes_and_outputs_close_to_fp32(bits, max_rel):
    base = tiny_gpt()
    model = tiny_gpt()
    quantize_for_qlora(model, bits)
    stored, fp32 = quantized_bytes(model)
    assert fp32 == 2 * (64 * 192 + 64 * 64 + 2 * 64 * 256) * 4  # qkv, proj, fc, proj of both blocks
    assert stored <= 0.3 * fp32, stored / fp32
    assert not is_quantized(model.lm_head)  # tied to the embedding: never quantized
    idx = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = base(idx), model(idx)  # (4, 16, 96)
    # NF4 keeps ~3.6 bits per weight: logits within 15% (relative Frobenius error); int8 within 2%
    rel = float((out - ref).norm() / ref.norm())
    assert rel <= max_rel, rel
    assert rel > 0  # the weights really are quantized


def test_untied_head_is_skipped_by_default():
    model = tiny_gpt(tie_embeddings=False)
    quantize_for_qlora(model, 4)
    assert type(model.lm_head) is nn.Linear and is_quantized(model.blocks[0].mlp.fc)
    quantize_for_qlora(tiny_gpt(tie_embeddings=False), 4, skip=())
    model = tiny_gpt(tie_embeddings=False)
    quantize_for_qlora(model, 8, skip=())
    assert is_quantized(model.lm_head)


def test_lora_trains_on_quantized_base():
    model = tiny_gpt()
    n = prepare_qlora(model, ["attn.qkv", "attn.proj"], r=4, alpha=8, bits=4)
    layers = lora_layers(model)
    assert len(layers) == 4 and all(is_quantized(layer.base) for layer in layers.values())
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{k}.{ab}" for k in layers for ab in ("lora_A", "lora_B")}
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 96, (8, 16), generator=g)
    y = torch.randint(0, 96, (8, 16), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    after = model.state_dict()
    for k, v in frozen.items():  # packed weights, quantization state, norms and embeddings unchanged
        assert torch.equal(after[k], v), k


def test_dequantize_model_for_export():
    model = tiny_gpt()
    prepare_qlora(model, ["attn.qkv"], r=4, alpha=8, bits=8)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, 0, 0.02)  # a non-zero update, as after training
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(idx)
        dequantize_model(model)
        assert not any(is_quantized(m) for m in model.modules())
        assert all(type(layer.base) is nn.Linear for layer in lora_layers(model).values())
        torch.testing.assert_close(model(idx), before, rtol=1e-5, atol=1e-5)
        unwrap_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(idx), before, rtol=1e-4, atol=1e-5)


def test_bad_input():
    with pytest.raises(ZerotuneError, match="qlora.bits: expected 4 or 8, got 3"):
        quantize_for_qlora(tiny_gpt(), 3)
    with pytest.raises(ZerotuneError, match="qlora: no linear layer left to quantize"):
        quantize_for_qlora(tiny_gpt(), 4, skip=["*"])
    with pytest.raises(ZerotuneError, match="is not a quantized linear layer"):
        dequantize_weight(nn.Linear(4, 4))


@pytest.mark.parametrize("bits", [4, 8])
def test_state_dict_round_trip_for_resume(bits):
    model = tiny_gpt()
    prepare_qlora(model, ["attn.qkv"], r=4, alpha=8, bits=bits)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, 0, 0.02)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = tiny_gpt()  # same base weights, adapters freshly initialised
    prepare_qlora(fresh, ["attn.qkv"], r=4, alpha=8, bits=bits)
    fresh.load_state_dict(state, strict=True)
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), model(idx), rtol=0, atol=0)


def test_state_dict_of_another_base_is_refused():
    model = tiny_gpt()
    prepare_qlora(model, ["attn.qkv"], r=4, alpha=8, bits=4)
    other = tiny_gpt(seed=1)
    prepare_qlora(other, ["attn.qkv"], r=4, alpha=8, bits=4)
    with pytest.raises(ZerotuneError, match=r"tensor 'blocks.0.attn.qkv.base.weight.*differs from the model's"):
        model.load_state_dict(other.state_dict())


def test_qlora_method_through_the_finetune_verb_on_minilm(tmp_path):
    """`zerotune finetune --method qlora` end to end: 4-bit MiniLM base, LoRA + head train, adapter saved."""
    pytest.importorskip("bitsandbytes")
    from zerotune.evaluate.api import evaluate
    from zerotune.finetune.api import finetune

    cfg = {"task": "classification",
           "data": {"train": "builtin:docstrings", "max_length": 32, "test_split": 0.2, "val_split": 0.1},
           "finetune": {"lora": {"r": 4, "alpha": 8, "targets": ["query", "value"]}},
           "optim": {"name": "adamw", "lr": 0.001},
           "train": {"epochs": None, "max_steps": 3, "batch_size": 8, "eval_every": 3, "progress": False}}
    run = finetune(cfg, "minilm", method="qlora", out=tmp_path / "q", log=lambda *a: None)
    assert (run / "adapter.safetensors").stat().st_size < 2_000_000
    assert not (run / "model.safetensors").exists()
    assert 0.0 <= evaluate(run)["accuracy"] <= 1.0


def test_dequantize_after_an_eval_forward(bits=4):
    """An eval forward may repack a 4-bit weight for bitsandbytes' CPU kernel; dequantizing still
    gives the weight the layer computes with (read off the layer's outputs on the identity)."""
    from zerotune.finetune.qlora import dequantize_weight

    layer = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False))
    quantize_for_qlora(layer, bits, skip=())
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 8, 64))  # may repack (AVX512-BF16 CPUs)
        seen = layer(torch.eye(64)).T  # (out, in): the weight the layer applies
        w = dequantize_weight(layer[0])
    torch.testing.assert_close(w, seen, rtol=0, atol=1e-2 * float(w.abs().max()))
