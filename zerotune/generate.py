"""Text generation from a decoder LM with a KV cache.

Prompts of different lengths run as one batch: they are left-padded to a common length and
the model is told how many padding tokens each row has (``pad``), so padded columns are
never attended to and every row's positions start at 0 on its first real token — each row
gets the tokens it would get alone. The prompt is processed once (prefill), then each step
feeds one new token per row.

Per step, with logits z over the vocabulary:

    z_i ← z_i / r if z_i > 0 else z_i · r   for tokens already seen (repetition penalty r, CTRL)
    z   ← z / temperature                  temperature 0 = greedy (argmax)
    keep the top_k largest z, then the smallest set whose probability reaches top_p (nucleus)
    next ~ softmax(z)                      drawn with an own torch.Generator seeded by ``seed``
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from zerotune.data.chat import TEMPLATE_FILE, chat_prompt_ids, end_token_id, load_chat_template
from zerotune.data.tokenizer import special_ids
from zerotune.errors import ZerotuneError
from zerotune.load import load_run


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set every logit outside the top-k / nucleus (top-p) set to −inf; logits (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_args(max_new_tokens: int, temperature: float, top_k, top_p, repetition_penalty: float,
                seed: int | None = None) -> None:
    """Every sampling value in range (NaN and infinities fail each comparison, so they are refused too)."""
    if not max_new_tokens >= 0:
        raise ZerotuneError(f"max_new_tokens: expected ≥ 0, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:
        raise ZerotuneError(f"temperature: expected a finite number ≥ 0, got {temperature}")
    if top_k is not None and not top_k >= 1:
        raise ZerotuneError(f"top_k: expected ≥ 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ZerotuneError(f"top_p: expected a number in (0, 1], got {top_p}")
    if not 0 < repetition_penalty < math.inf:
        raise ZerotuneError(f"repetition_penalty: expected a finite number > 0, got {repetition_penalty}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ZerotuneError(f"seed: expected an integer in [0, 2**63), got {seed}")


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt_ids: list[list[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    pad_id: int | None = None,
    stream: Callable[[int, list[int]], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a :class:`zerotune.models.gpt.GPT` (anything with ``config.block_size``,
            ``new_cache(batch, max_len)`` and ``forward(idx, cache, pos, pad)``).
        prompt_ids: one list of token ids per prompt (lengths may differ), or a (B, T) tensor.
        max_new_tokens: tokens to add per prompt at most.
        temperature: softmax temperature; 0 picks the most likely token (greedy).
        top_k: sample only among the k most likely tokens.
        top_p: sample only from the smallest set of tokens whose probability reaches top_p.
        repetition_penalty: > 1 discourages tokens already in the prompt or the output.
        eos_id: a row stops when it produces this token (or one of these tokens), which is
            not included in its output.
        seed: seeds the sampling generator, so the same call gives the same tokens.
        pad_id: token id placed in the padding columns (never attended to); default 0.
        stream: called as ``stream(row, tokens_so_far)`` each time a row gains a token.

    Returns:
        The new tokens of each prompt (without the prompt), in prompt order.

    Raises:
        ZerotuneError: empty prompt, prompt + max_new_tokens longer than the model's block_size,
            or an argument out of range.

    Example:
        >>> out = generate(model, [[1, 2, 3], [4]], max_new_tokens=20, temperature=0)
    """
    _check_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    prompts = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else [list(p) for p in prompt_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ZerotuneError("prompt_ids: every prompt needs at least one token")
    block_size = model.config.block_size
    vocab = model.config.vocab_size
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > block_size:
        raise ZerotuneError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
            f"block_size {block_size}"
        )
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ZerotuneError(f"prompt_ids: token ids must lie in [0, {vocab})")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    stop = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)

    device = next(model.parameters()).device
    B = len(prompts)
    pad_counts = [longest - len(p) for p in prompts]
    idx = torch.tensor(
        [[pad_id or 0] * n + p for n, p in zip(pad_counts, prompts, strict=True)], device=device
    )  # (B, T)
    pad = torch.tensor(pad_counts, device=device) if any(pad_counts) else None
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        seen[row, p] = True

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, longest + max_new_tokens)
        logits = model(idx, cache=cache, pos=0, pad=pad)[:, -1]  # prefill: (B, V)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        pos = longest
        for step in range(max_new_tokens):
            logits = logits.float()
            if repetition_penalty != 1.0:
                penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
                logits = torch.where(seen, penalised, logits)
            if temperature == 0:
                next_ids = logits.argmax(dim=-1)  # (B,)
            else:
                logits = filter_logits(logits / temperature, top_k, top_p)
                next_ids = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]  # (B,)
            seen[torch.arange(B, device=device), next_ids] = True
            for row, token in enumerate(next_ids.tolist()):
                if done[row]:
                    continue
                if token in stop:
                    done[row] = True
                    continue
                out[row].append(token)
                if stream is not None:
                    stream(row, list(out[row]))
            if all(done) or step == max_new_tokens - 1:
                break
            logits = model(next_ids[:, None], cache=cache, pos=pos, pad=pad)[:, -1]  # (B, V)
            pos += 1
    finally:
        model.train(was_training)
    return out


def generate_text(
    run: str | Path,
    prompts: list[str],
    *,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stream: Callable[[str], None] | None = None,
) -> list[str]:
    """Generate from a trained decoder run: encode the prompts with the run's tokenizer, sample with the
    KV cache, stop at EOS, and return each prompt's completion text. With one prompt and ``stream``,
    text is passed to ``stream`` as it is produced (the prompt first). A run instruction-tuned with
    ``task: sft`` (it holds ``chat_template.json``) gets each prompt as a user turn of its chat
    template and stops at the template's end marker.

    Example:
        >>> zerotune.generate("runs/pydoc_gpt_tiny", ["The with statement"], max_new_tokens=40, seed=0)
    """
    _check_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)  # before the run is loaded
    loaded = load_run(run)
    if loaded.tokenizer is None:
        raise ZerotuneError("the run has no tokenizer.json; generation needs a text model", path=loaded.run.root)
    if not hasattr(loaded.model, "new_cache"):
        raise ZerotuneError(f"model.arch {loaded.meta['model'].get('arch')!r} is not a decoder; generate needs gpt",
                            path=loaded.run.model_json)
    tok = loaded.tokenizer
    ids = special_ids(tok)
    template = None
    if (loaded.run.root / TEMPLATE_FILE).is_file():  # an instruction-tuned run: prompts are user turns
        template = load_chat_template(loaded.run.root)
        ids = {**ids, "eos": end_token_id(tok, template)}
    encoded = []
    for text in prompts:
        if template is not None:
            prompt = chat_prompt_ids([{"role": "user", "content": text}], tok, template)
        else:
            prompt = tok.encode(text, add_special_tokens=False).ids
        if template is None and ids["bos"] is not None and ids["bos"] != ids["eos"]:
            prompt = [ids["bos"], *prompt]
        if not prompt:
            raise ZerotuneError("--prompt: the prompt is empty and the tokenizer has no BOS token")
        encoded.append(prompt)
    printed = [0]

    def on_token(row: int, tokens: list[int]) -> None:
        text = tok.decode(tokens, skip_special_tokens=True)
        if len(text) > printed[0] and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            stream(text[printed[0]:])
            printed[0] = len(text)

    if stream is not None and len(prompts) == 1:
        stream(prompts[0])
    out = generate(loaded.model, encoded, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, eos_id=ids["eos"], seed=seed, pad_id=ids["pad"],
                   stream=on_token if stream is not None and len(prompts) == 1 else None)
    texts = [tok.decode(t, skip_special_tokens=True) for t in out]
    if stream is not None and len(prompts) == 1 and len(texts[0]) > printed[0]:
        stream(texts[0][printed[0]:])
    return texts
