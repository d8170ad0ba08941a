"""Generation: KV cache vs full recomputation, batching with padding, sampling, EOS, seeds."""

from __future__ import annotations

import pytest
import torch

from zerotune.errors import ZerotuneError
from zerotune.generate import filter_logits, generate
from zerotune.models.gpt import GPT, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=99, block_size=48, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, d_ff=48,
               mlp="swiglu", norm="rmsnorm", pos="rope", bias=False, tie_embeddings=False)  # fmt: skip
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def greedy_by_recomputation(model: GPT, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    ids, logits = list(prompt), []
    for _ in range(n):
        last = model(torch.tensor([ids]))[0, -1]  # full forward, no cache
        logits.append(last)
        ids.append(int(last.argmax()))
    return ids[len(prompt) :], logits


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_greedy_with_cache_equals_full_recomputation(pos):
    model = tiny(pos=pos)
    prompt = [5, 17, 3, 42, 8]
    expected, ref_logits = greedy_by_recomputation(model, prompt, 12)
    assert generate(model, [prompt], max_new_tokens=12, temperature=0) == [expected]
    # the cached path's logits at every step match the recomputed ones
    cache = model.new_cache(1, 17)
    ids = torch.tensor([prompt + expected])
    step_logits = [model(ids[:, :5], cache=cache, pos=0)[0, -1]]
    step_logits += [model(ids[:, t : t + 1], cache=cache, pos=t)[0, -1] for t in range(5, 16)]
    torch.testing.assert_close(torch.stack(step_logits), torch.stack(ref_logits), rtol=1e-5, atol=1e-5)


def test_batch_of_different_lengths_equals_one_at_a_time():
    model = tiny()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [30, 31, 32]]
    batched = generate(model, prompts, max_new_tokens=10, temperature=0, pad_id=0)
    alone = [generate(model, [p], max_new_tokens=10, temperature=0)[0] for p in prompts]
    assert batched == alone
    assert batched[1] == greedy_by_recomputation(model, [9], 10)[0]


def test_eos_stops_each_row_and_stream_reports_tokens():
    model = tiny()
    free = generate(model, [[1, 2], [7, 7, 7]], max_new_tokens=8, temperature=0)
    eos = free[0][3]  # the 4th token of row 0 becomes its stop token
    seen: list[tuple[int, list[int]]] = []
    out = generate(model, [[1, 2], [7, 7, 7]], max_new_tokens=8, temperature=0, eos_id=eos,
                   stream=lambda row, toks: seen.append((row, toks)))  # fmt: skip
    assert out[0] == free[0][: free[0].index(eos)]
    cut = free[1].index(eos) if eos in free[1] else 8
    assert out[1] == free[1][:cut]
    assert [toks for row, toks in seen if row == 0][-1] == out[0]
    assert len(seen) == len(out[0]) + len(out[1])
    # several stop tokens: each row stops at the first of them
    stops = {free[0][5], free[0][2]}
    first = next(i for i, t in enumerate(free[0]) if t in stops)
    assert generate(model, [[1, 2]], max_new_tokens=8, temperature=0, eos_id=list(stops)) == [free[0][:first]]


def test_sampling_is_deterministic_for_a_seed_and_respects_top_k():
    model = tiny()
    a = generate(model, [[4, 5, 6]], max_new_tokens=10, temperature=1.0, seed=123)
    b = generate(model, [[4, 5, 6]], max_new_tokens=10, temperature=1.0, seed=123)
    c = generate(model, [[4, 5, 6]], max_new_tokens=10, temperature=1.0, seed=124)
    assert a == b and a != c
    # top_k=1 is greedy whatever the temperature
    assert generate(model, [[4, 5, 6]], 10, temperature=5.0, top_k=1, seed=1) == generate(
        model, [[4, 5, 6]], 10, temperature=0
    )


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    kept_k = filter_logits(logits, top_k=2, top_p=None)
    torch.testing.assert_close(kept_k, torch.tensor([[logits[0, 0], logits[0, 1], inf, inf]]))
    # nucleus 0.8: 0.5 + 0.3 reaches it, so the third and fourth tokens go
    kept_p = filter_logits(logits[:, [2, 0, 3, 1]], top_k=None, top_p=0.8)
    assert torch.isinf(kept_p).tolist() == [[True, False, True, False]]


def test_repetition_penalty_changes_greedy_choice():
    model = tiny()
    plain = generate(model, [[3, 3, 3]], max_new_tokens=20, temperature=0)[0]
    penalised = generate(model, [[3, 3, 3]], max_new_tokens=20, temperature=0, repetition_penalty=50.0)[0]
    assert len(set(penalised)) == len(penalised)  # a huge penalty never repeats a token
    assert len(set(plain)) < len(plain)


def test_tensor_prompt_and_model_mode_restored():
    model = tiny().train()
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=3, temperature=0)
    assert len(out[0]) == 3 and model.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_ids": [[]]}, "every prompt needs at least one token"),
        ({"prompt_ids": [[1] * 40], "max_new_tokens": 9}, r"prompt of 40 tokens \+ max_new_tokens 9 exceeds"),
        ({"prompt_ids": [[1, 200]]}, r"token ids must lie in \[0, 99\)"),
        ({"temperature": -1.0}, "temperature: expected a finite number ≥ 0"),
        ({"temperature": float("nan")}, "temperature: expected a finite number ≥ 0, got nan"),
        ({"temperature": float("inf")}, "temperature: expected a finite number ≥ 0, got inf"),
        ({"top_p": 1.5}, r"top_p: expected a number in \(0, 1\]"),
        ({"top_p": float("nan")}, r"top_p: expected a number in \(0, 1\]"),
        ({"top_k": 0}, "top_k: expected ≥ 1"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty: expected a finite number > 0"),
        ({"seed": -1}, r"seed: expected an integer in \[0, 2\*\*63\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"prompt_ids": [[1, 2]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ZerotuneError, match=message):
        generate(tiny(), **args)
