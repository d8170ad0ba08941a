"""Continuous batching: one model, one generation loop, many sequences in one KV cache.

The loop runs in its own thread. Each turn it

1. admits waiting sequences while the batch has free rows: each prompt is prefilled alone (one forward
   over its tokens) straight into its row of the shared cache, and its first token is sampled;
2. runs one decode step for every sequence in the batch: one new token each, one forward of shape
   (rows, 1), each row sampled with its own settings and its own seeded generator;
3. lets finished and cancelled sequences go; the last row moves into the freed one, so rows 0…n−1 are
   always the running sequences.

So a request joins the running batch at the next step and a long generation never holds up a short one.

The cache layout. Every row writes its next token at the same column ``col``; row i's sequence occupies
columns ``start[i]``…``col − 1`` and everything left of ``start[i]`` is hidden from it. The model is told
``start`` as its left padding, so row i's positions count from 0 at ``start[i]`` and its keys and values
are those it would have alone (they depend on positions, never on columns). A new prompt of L tokens
goes into columns col − L…col − 1 (when col < L, every row first moves right). When ``col`` reaches the
block size, every row moves left so that the longest ends at the new ``col``; a row never holds more
than block_size tokens, as a request's prompt + max_tokens is checked against it before it is queued.

Determinism: a row's logits are the same math alone or in a batch, so with ``temperature`` 0, or with a
``seed``, a request gets the same tokens alone or in a busy batch (up to float rounding of reductions
whose length differs; the tests check it token for token on a trained model).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zerotune.errors import ZerotuneError
from zerotune.generate import Decoder, filter_logits


@dataclass(frozen=True)
class Sampling:
    """How one sequence is sampled; the OpenAI request fields of the same names."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the text ends before the first of these strings
    presence_penalty: float = 0.0  # z_t −= presence · [t generated before] + frequency · (times generated)
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # CTRL's, as ``zerotune generate``: over the prompt and the tokens so far
    logprobs: int | None = None  # None: none; k ≥ 0: the chosen token's log-probability and the k most likely


@dataclass
class Delta:
    """New text of a sequence (possibly empty while a stop string or a UTF-8 character is incomplete) and
    the tokens it came from, with (token, logprob, [(token, logprob) …]) each when logprobs were asked."""

    text: str
    tokens: list[int]
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] | None = None


@dataclass
class Finished:
    reason: str  # "stop" (end token or stop string), "length" (max_tokens), "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    message: str = ""  # for "error"


@dataclass(eq=False)
class Sequence:
    """One generation. ``emit`` is called from the engine's thread with each :class:`Delta` and, last,
    one :class:`Finished`."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Delta | Finished], None]
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    queued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finish: str | None = None  # why it ended: "stop" or "length" (set by the engine)
    _sent: int = 0  # characters of the decoded text already emitted
    _next: int = 0  # the token the next decode step feeds
    _generator: torch.Generator | None = None


class Refused(ValueError):
    """A request that cannot run; ``field`` is the part of it at fault ("prompt" or "max_tokens")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class QueueFull(Exception):
    """The wait queue has no room for the request."""


class Engine:
    """Runs sequences on ``decoder``'s model in batches of up to ``max_batch``; at most ``max_queue`` wait
    (beyond the rows that are free).

    Example:
        >>> engine = Engine(load_decoder("runs/pydoc_gpt_tiny"), max_batch=8)
        >>> engine.start()
        >>> engine.submit([Sequence(ids, Sampling(max_tokens=20, temperature=0), print)])
    """

    def __init__(self, decoder: Decoder, max_batch: int = 8, max_queue: int = 64,
                 on_step: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ZerotuneError(f"max_batch must be ≥ 1 and max_queue ≥ 0, got {max_batch} and {max_queue}")
        self.decoder = decoder
        self.model = decoder.model.eval()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.block = decoder.block_size
        self.vocab = self.model.config.vocab_size
        self.device = next(self.model.parameters()).device
        self.cache = self.model.new_cache(max_batch, self.block)
        self.rows: list[Sequence] = []  # row i of the cache holds rows[i]
        self.starts: list[int] = []  # row i's first column
        self.col = 0  # the column every row writes next
        self.moves = 0  # times the rows were moved in the cache (to make room), for tests and metrics
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.on_step = on_step  # called after each decode step with the number of rows that ran
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stop_ids = {decoder.eos_id} if decoder.eos_id is not None else set()

    # ------------------------------------------------------------ the caller's side (any thread)

    def check(self, prompt: list[int], sampling: Sampling) -> None:
        """Refuse what cannot run, before it is queued: an empty prompt, an id outside the vocabulary, a
        prompt that fills the model's context, or a prompt + max_tokens longer than it.

        Raises:
            Refused: the problem, and whether the prompt or max_tokens is at fault.
        """
        if not prompt:
            raise Refused("prompt", "the prompt has no tokens")
        if any(not 0 <= t < self.vocab for t in prompt):
            raise Refused("prompt", f"token ids must lie in [0, {self.vocab})")
        if len(prompt) >= self.block:
            raise Refused("prompt", f"the prompt is {len(prompt)} tokens; the model's context is {self.block} "
                                    "tokens, prompt and reply together")
        if len(prompt) + sampling.max_tokens > self.block:
            raise Refused("max_tokens", f"the model's context is {self.block} tokens; the request asks for "
                                        f"{len(prompt) + sampling.max_tokens} ({len(prompt)} in the prompt, "
                                        f"{sampling.max_tokens} to generate)")

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences (all or none).

        Raises:
            QueueFull: fewer than ``len(sequences)`` places are left in the queue.
        """
        with self._wake:
            free = max(0, self.max_batch - len(self.rows))  # rows the first waiting take at the next step
            if len(self.waiting) + len(sequences) > free + self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests wait (--max-queue "
                                f"{self.max_queue}); try again shortly")
            self.waiting.extend(sequences)
            self._wake.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Stop sequences (a client went away): their rows are freed at the next step."""
        with self._wake:
            for s in sequences:
                s.cancelled = True
            self._wake.notify()

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="zerotune-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------ the loop (the engine's thread)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.rows:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = []
                while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
            try:
                with torch.inference_mode():
                    for seq in admitted:
                        if seq.cancelled:
                            seq.emit(Finished("cancelled", len(seq.prompt), 0))
                            continue
                        try:
                            self._prefill(seq)
                        except Exception as e:  # this prompt alone failed: the batch runs on
                            seq.emit(Finished("error", len(seq.prompt), 0, f"{type(e).__name__}: {e}"))
                    if self.rows:
                        self._decode()
            except Exception as e:  # a failure of the model itself: every running sequence gets it
                for seq in self.rows:
                    seq.emit(Finished("error", len(seq.prompt), len(seq.tokens), f"{type(e).__name__}: {e}"))
                self.rows, self.starts, self.col = [], [], 0
        for seq in [*self.rows, *self.waiting]:
            seq.emit(Finished("cancelled", len(seq.prompt), len(seq.tokens)))

    def _prefill(self, seq: Sequence) -> None:
        if not self.rows:
            self.col = 0
        n = len(seq.prompt)
        if self.col == self.block:
            self._compact()
        if self.col < n:
            self._move(n)
        row = len(self.rows)
        view = self.cache.view(slice(row, row + 1), self.col - n)
        ids = torch.tensor([seq.prompt], device=self.device)
        logits = self.model(ids, cache=view, pos=0)[:, -1].float()  # (1, V): alone, as without a batch
        seq._generator = torch.Generator(device=self.device)
        if seq.sampling.seed is not None:
            seq._generator.manual_seed(seq.sampling.seed)
        else:
            seq._generator.seed()
        self.rows.append(seq)
        self.starts.append(self.col - n)
        self._sample([seq], logits)
        if self._done(seq):
            self._release([row])

    def _decode(self) -> None:
        if self.col == self.block:
            self._compact()
        n = len(self.rows)
        ids = torch.tensor([[s._next] for s in self.rows], device=self.device)  # (n, 1)
        pad = torch.tensor(self.starts, device=self.device)  # (n,)
        logits = self.model(ids, cache=self.cache.view(slice(0, n)), pos=self.col, pad=pad)[:, -1].float()
        self.col += 1
        live = [i for i, seq in enumerate(self.rows) if not seq.cancelled]
        if live:
            self._sample([self.rows[i] for i in live], logits[live] if len(live) < n else logits)
        if self.on_step is not None:
            self.on_step(n)
        self._release([i for i, s in enumerate(self.rows) if self._done(s)])

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample each sequence's next token from its row of ``logits`` (n, V), and pass on its text.

        Every step is row by row in its math (each row its own penalties, temperature, top-k/top-p and
        generator), done for all rows at once where the settings allow, as one op per step is cheaper
        than one per row."""
        ss = [q.sampling for q in seqs]
        z = logits
        if any(s.presence_penalty or s.frequency_penalty for s in ss):
            counts = torch.stack([torch.bincount(torch.tensor(q.tokens, dtype=torch.long, device=self.device),
                                                 minlength=self.vocab).to(logits.dtype) for q in seqs])
            presence = torch.tensor([s.presence_penalty for s in ss], device=self.device)[:, None]
            frequency = torch.tensor([s.frequency_penalty for s in ss], device=self.device)[:, None]
            z = z - presence * (counts > 0) - frequency * counts
        for i, (q, s) in enumerate(zip(seqs, ss, strict=True)):
            if s.repetition_penalty != 1.0:  # z ← z / r where z > 0, else z · r, for every token seen
                seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
                seen[torch.tensor(q.prompt + q.tokens, dtype=torch.long, device=self.device)] = True
                row = z[i]
                z = z.clone() if z is logits else z
                z[i] = torch.where(seen, torch.where(row > 0, row / s.repetition_penalty,
                                                     row * s.repetition_penalty), row)
        greedy = [s.temperature == 0 for s in ss]
        chosen = z.argmax(dim=-1).tolist() if any(greedy) else []
        if not all(greedy):
            z = z / torch.tensor([s.temperature or 1.0 for s in ss], device=self.device)[:, None]
            for i, s in enumerate(ss):
                if not greedy[i] and (s.top_k is not None or s.top_p < 1.0):
                    z[i] = filter_logits(z[i:i + 1], s.top_k, s.top_p)[0]
            # inverse CDF: row i draws one uniform u from its own generator and takes the first token whose
            # cumulative probability exceeds u · total (a token of probability 0 is never taken)
            cdf = z.softmax(dim=-1).cumsum(dim=-1)  # (n, V)
            u = torch.cat([torch.rand(1, generator=q._generator, device=self.device) for q in seqs])  # (n,)
            total = cdf[:, -1]
            at = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
            drawn = torch.searchsorted(cdf, at[:, None], right=True)[:, 0].tolist()
            chosen = [chosen[i] if greedy[i] else d for i, d in enumerate(drawn)]
        logp = logits.log_softmax(dim=-1) if any(s.logprobs is not None for s in ss) else None
        now = time.perf_counter()
        for i, (seq, token) in enumerate(zip(seqs, chosen, strict=True)):
            self._take(seq, token, None if logp is None or ss[i].logprobs is None else logp[i], now)

    def _take(self, seq: Sequence, token: int, logp: torch.Tensor | None, now: float) -> None:
        """Append ``token`` to seq (or end it there, for an end token) and pass on its text."""
        s = seq.sampling
        if seq.first_token_at is None:
            seq.first_token_at = now
        if token in self._stop_ids:
            seq.finish = "stop"
            self._flush(seq, [], None)
            return
        seq.tokens.append(token)
        seq._next = token
        lp = None
        if logp is not None:
            top = torch.topk(logp, min(s.logprobs, self.vocab)) if s.logprobs else None
            alts = [] if top is None else [(self.decoder.decode([int(t)]), float(v))
                                          for v, t in zip(top.values, top.indices, strict=True)]
            lp = [(self.decoder.decode([token]), float(logp[token]), alts)]
        if len(seq.tokens) >= s.max_tokens:
            seq.finish = "length"
        self._flush(seq, [token], lp)

    def _flush(self, seq: Sequence, tokens: list[int], lp) -> None:
        """Emit the text that can no longer change: a stop string found ends the sequence there; text
        that may be the start of a stop string, or an incomplete UTF-8 character, waits."""
        text = self.decoder.decode(seq.tokens)
        stops = seq.sampling.stop
        end = len(text)
        for stop in stops:
            at = text.find(stop, max(0, seq._sent - len(stop) + 1))
            if at != -1 and at < end:
                end, seq.finish = at, "stop"
        if seq.finish is None:
            while end > seq._sent and text[end - 1] == "\ufffd":
                end -= 1
            if stops:  # hold back a tail that could still grow into a stop string
                hold = max((k for stop in stops for k in range(1, len(stop)) if text[:end].endswith(stop[:k])),
                           default=0)
                end -= hold
        end = max(end, seq._sent)
        seq.emit(Delta(text[seq._sent:end], tokens, lp))
        seq._sent = end

    @staticmethod
    def _done(seq: Sequence) -> bool:
        return seq.cancelled or seq.finish is not None

    def _release(self, rows: list[int]) -> None:
        """Let the sequences of ``rows`` go; the last rows move into the freed ones."""
        for i in sorted(rows, reverse=True):
            seq = self.rows[i]
            reason = seq.finish or "cancelled"
            seq.emit(Finished(reason, len(seq.prompt), len(seq.tokens)))
            last = len(self.rows) - 1
            if i != last:
                a = self.starts[last]
                self.cache.k[:, i, :, a:self.col] = self.cache.k[:, last, :, a:self.col]
                self.cache.v[:, i, :, a:self.col] = self.cache.v[:, last, :, a:self.col]
                self.rows[i], self.starts[i] = self.rows[last], self.starts[last]
            self.rows.pop()
            self.starts.pop()

    def _move(self, col: int) -> None:
        """Move every row so that it ends at column ``col`` (its keys and values do not depend on columns)."""
        for i, a in enumerate(self.starts):
            length = self.col - a
            b = col - length
            if b != a:
                self.cache.k[:, i, :, b:col] = self.cache.k[:, i, :, a:self.col].clone()
                self.cache.v[:, i, :, b:col] = self.cache.v[:, i, :, a:self.col].clone()
                self.starts[i] = b
        self.col = col
        self.moves += 1

    def _compact(self) -> None:
        """Make room on the right: every row moves left so that the longest ends at the new ``col``."""
        longest = max((self.col - a for a in self.starts), default=0)
        if longest >= self.block:  # cannot happen: prompt + max_tokens ≤ block_size is checked first
            raise ZerotuneError(f"a sequence outgrew the model's context of {self.block} tokens")
        self._move(longest)

