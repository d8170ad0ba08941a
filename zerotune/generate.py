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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zerotune.config import ChatTemplate
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


def check_sampling(max_new_tokens: int, temperature: float, top_k, top_p, repetition_penalty: float,
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
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
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


@dataclass
class Decoder:
    """A decoder run ready to generate from: the model, its tokenizer and how prompts are made.

    A run instruction-tuned with ``task: sft`` (it holds ``chat_template.json``) renders messages with its
    template and stops at the template's end marker. Any other run is a plain language model: a text prompt
    is its tokens (after BOS when the tokenizer has one distinct from EOS), and messages are rendered as
    plain lines, ``User: …`` / ``Assistant: …`` / ``System: …``, ending in ``Assistant:`` (:data:`PLAIN_CHAT`);
    generation then also stops where the model starts the next ``User:`` line.
    """

    model: nn.Module
    tokenizer: Any
    template: ChatTemplate | None
    eos_id: int | None
    pad_id: int | None
    bos_id: int | None
    name: str

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def encode(self, text: str) -> list[int]:
        """A text prompt's token ids (BOS first when the tokenizer has a BOS that is not also EOS)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.bos_id is not None and self.bos_id != self.eos_id:
            ids = [self.bos_id, *ids]
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The generation prompt of a conversation: the chat template's, or the plain format's."""
        if self.template is not None:
            return chat_prompt_ids(messages, self.tokenizer, self.template)
        lines = [f"{PLAIN_CHAT[m['role']]}: {m['content']}" for m in messages]
        return self.encode("\n".join([*lines, f"{PLAIN_CHAT['assistant']}:"]))

    def chat_stops(self) -> list[str]:
        """Strings a chat reply ends at, besides the end token: the plain format's next user line."""
        return [] if self.template is not None else [f"\n{PLAIN_CHAT['user']}:"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


PLAIN_CHAT = {"system": "System", "user": "User", "assistant": "Assistant"}  # a run without a chat template


def load_decoder(run: str | Path, device: str | torch.device = "cpu") -> Decoder:
    """A run's decoder with its tokenizer (and chat template, for an instruction-tuned run).

    Raises:
        ZerotuneError: the run has no tokenizer, or its model is not a decoder (named).
    """
    loaded = load_run(run, device)
    if loaded.tokenizer is None:
        raise ZerotuneError("the run has no tokenizer.json; generation needs a text model", path=loaded.run.root)
    if not hasattr(loaded.model, "new_cache"):
        raise ZerotuneError(f"model.arch {loaded.meta['model'].get('arch')!r} is not a decoder; generate needs gpt",
                            path=loaded.run.model_json)
    tok = loaded.tokenizer
    ids = special_ids(tok)
    template = load_chat_template(loaded.run.root) if (loaded.run.root / TEMPLATE_FILE).is_file() else None
    eos = end_token_id(tok, template) if template is not None else ids["eos"]
    return Decoder(loaded.model, tok, template, eos, ids["pad"], ids["bos"], loaded.run.root.resolve().name)


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
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)  # before the run is loaded
    dec = load_decoder(run)
    encoded = []
    for text in prompts:
        prompt = dec.encode_chat([{"role": "user", "content": text}]) if dec.template else dec.encode(text)
        if not prompt:
            raise ZerotuneError("--prompt: the prompt is empty and the tokenizer has no BOS token")
        encoded.append(prompt)
    printed = [0]

    def on_token(row: int, tokens: list[int]) -> None:
        text = dec.decode(tokens)
        if len(text) > printed[0] and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            stream(text[printed[0]:])
            printed[0] = len(text)

    if stream is not None and len(prompts) == 1:
        stream(prompts[0])
    out = generate(dec.model, encoded, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, eos_id=dec.eos_id, seed=seed, pad_id=dec.pad_id,
                   stream=on_token if stream is not None and len(prompts) == 1 else None)
    texts = [dec.decode(t) for t in out]
    if stream is not None and len(prompts) == 1 and len(texts[0]) > printed[0]:
        stream(texts[0][printed[0]:])
    return texts
