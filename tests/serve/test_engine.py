"""Continuous batching: every sequence gets the tokens it would get alone, however the batch around it
comes and goes; rows are freed on cancel; the queue is bounded; stop strings end the text."""

from __future__ import annotations

import threading

import pytest

from zerotune.generate import generate, load_decoder
from zerotune.serve.engine import Delta, Engine, Finished, QueueFull, Refused, Sampling, Sequence


@pytest.fixture(scope="module")
def decoder(text_run):
    return load_decoder(text_run)


class Collect:
    """The text, tokens and end of one sequence, as its emit callback sees them."""

    def __init__(self) -> None:
        self.text, self.tokens, self.end = "", [], None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Delta):
            self.text += event.text
            self.tokens += event.tokens
        else:
            self.end = event
            self.done.set()


def run_alone(decoder, prompt, sampling):
    engine = Engine(decoder, max_batch=1)
    engine.start()
    got = Collect()
    engine.submit([Sequence(prompt, sampling, got)])
    assert got.done.wait(60)
    engine.stop()
    return got


PROMPTS = ["The with statement", "A class definition", "x", "Identifiers (also referred to as names) are",
           "The import statement", "Comparisons", "assert"]


def plans(decoder):
    out = []
    for i, text in enumerate(PROMPTS):
        ids = decoder.encode(text)
        room = decoder.block_size - len(ids)
        greedy = Sampling(max_tokens=min(room, 20 + 9 * i), temperature=0)
        sampled = Sampling(max_tokens=min(room, 70 - 7 * i), temperature=1.0, top_k=40, top_p=0.95, seed=i,
                           presence_penalty=0.5 * (i % 2), repetition_penalty=1.0 + 0.2 * (i % 3))
        out += [(ids, greedy), (ids, sampled)]
    return out


def test_greedy_alone_matches_zerotune_generate(decoder):
    ids = decoder.encode("The with statement")
    alone = run_alone(decoder, ids, Sampling(max_tokens=40, temperature=0))
    reference = generate(decoder.model, [ids], 40, temperature=0, eos_id=decoder.eos_id)[0]
    assert alone.tokens == reference
    assert alone.text == decoder.decode(reference)
    assert alone.end.reason == "length" and alone.end.completion_tokens == 40


def test_the_repetition_penalty_is_zerotune_generates(decoder):
    ids = decoder.encode("The with statement")
    alone = run_alone(decoder, ids, Sampling(max_tokens=40, temperature=0, repetition_penalty=1.5))
    plain = run_alone(decoder, ids, Sampling(max_tokens=40, temperature=0))
    reference = generate(decoder.model, [ids], 40, temperature=0, repetition_penalty=1.5, eos_id=decoder.eos_id)[0]
    assert alone.tokens == reference != plain.tokens


def test_every_sequence_gets_its_tokens_alone_inside_a_changing_batch(decoder):
    work = plans(decoder)
    alone = [run_alone(decoder, ids, s) for ids, s in work]
    assert len({tuple(a.tokens) for a in alone}) > len(work) // 2  # the texts differ: the check has teeth

    engine = Engine(decoder, max_batch=4, max_queue=len(work))
    engine.start()
    together = [Collect() for _ in work]
    # join at different times: the first half now, the rest when the first has a few tokens
    first = [Sequence(ids, s, c) for (ids, s), c in zip(work[:7], together[:7], strict=True)]
    engine.submit(first)
    while len(together[0].tokens) < 3 and not together[0].done.is_set():
        together[0].done.wait(0.001)
    engine.submit([Sequence(ids, s, c) for (ids, s), c in zip(work[7:], together[7:], strict=True)])
    for c in together:
        assert c.done.wait(120)
    engine.stop()
    for a, b in zip(alone, together, strict=True):
        assert b.tokens == a.tokens
        assert b.text == a.text
        assert b.end.reason == a.end.reason
    assert engine.moves > 0  # rows were moved in the cache (to admit a longer prompt, or to make room)


def test_rows_are_moved_when_the_columns_run_out(decoder):
    """Sequences that together outrun the cache's columns: the rows move left, the tokens stay the same."""
    short, long = decoder.encode("x"), decoder.encode("Identifiers (also referred to as names) are")
    work = [(long, Sampling(max_tokens=decoder.block_size - len(long), temperature=0)),
            (short, Sampling(max_tokens=30, temperature=1.0, seed=5)),
            (short, Sampling(max_tokens=decoder.block_size - len(short), temperature=1.0, seed=6))]
    alone = [run_alone(decoder, ids, s) for ids, s in work]
    engine = Engine(decoder, max_batch=2)
    engine.start()
    together = [Collect() for _ in work]
    engine.submit([Sequence(ids, s, c) for (ids, s), c in zip(work, together, strict=True)])
    for c in together:
        assert c.done.wait(60)
    engine.stop()
    assert [c.tokens for c in together] == [a.tokens for a in alone]
    assert engine.moves >= 2  # the third joins when col is past its start, then the columns run out


def test_a_cancelled_sequence_frees_its_row_when_the_step_ends(decoder):
    engine = Engine(decoder, max_batch=2)
    engine.start()
    seqs = []
    got = Collect()

    def emit(event):
        got(event)
        if isinstance(event, Delta) and len(got.tokens) == 3:
            engine.cancel(seqs)  # as a client going away would, while the step is under way

    seqs.append(Sequence(decoder.encode("The with statement"), Sampling(max_tokens=60, temperature=0), emit))
    engine.submit(seqs)
    assert got.done.wait(60)
    assert got.end.reason == "cancelled" and got.end.completion_tokens == 3  # freed as that step ended
    assert engine.running == 0
    other = Collect()
    engine.submit([Sequence(decoder.encode("x"), Sampling(max_tokens=5, temperature=0), other)])
    assert other.done.wait(60) and other.end.reason == "length"
    engine.stop()


def test_the_queue_is_bounded_and_refuses_all_or_nothing(decoder):
    engine = Engine(decoder, max_batch=1, max_queue=3)  # not started: nothing leaves the queue
    s = Sampling(max_tokens=2, temperature=0)
    engine.submit([Sequence([1], s, Collect()) for _ in range(2)])  # one takes the free row, one waits
    with pytest.raises(QueueFull, match="2 requests wait"):
        engine.submit([Sequence([1], s, Collect()) for _ in range(3)])
    assert engine.queued == 2
    engine.submit([Sequence([1], s, Collect()) for _ in range(2)])  # 1 row + 3 waiting places
    with pytest.raises(QueueFull):
        engine.submit([Sequence([1], s, Collect())])
    assert engine.queued == 4


def test_with_no_queue_free_rows_still_take_requests(decoder):
    engine = Engine(decoder, max_batch=2, max_queue=0)
    s = Sampling(max_tokens=2, temperature=0)
    engine.submit([Sequence([1], s, Collect()) for _ in range(2)])
    with pytest.raises(QueueFull):
        engine.submit([Sequence([1], s, Collect())])


def test_a_stop_string_ends_the_text_before_it(decoder):
    ids = decoder.encode("The with statement")
    full = run_alone(decoder, ids, Sampling(max_tokens=60, temperature=1.0, seed=0))
    stop = full.text[10:13]  # a string the sampled text contains
    cut = run_alone(decoder, ids, Sampling(max_tokens=60, temperature=1.0, seed=0, stop=(stop,)))
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.end.reason == "stop"
    assert cut.end.completion_tokens < 60


def test_check_names_the_field_at_fault(decoder):
    engine = Engine(decoder)
    with pytest.raises(Refused, match="context is 96 tokens") as e:
        engine.check([1] * 96, Sampling(max_tokens=1))
    assert e.value.field == "prompt"
    with pytest.raises(Refused, match=r"asks for 100 \(10 in the prompt, 90") as e:
        engine.check([1] * 10, Sampling(max_tokens=90))
    assert e.value.field == "max_tokens"
    with pytest.raises(Refused, match="token ids"):
        engine.check([10_000], Sampling(max_tokens=1))


def test_a_finished_event_comes_last(decoder):
    events = []
    engine = Engine(decoder)
    engine.start()
    done = threading.Event()

    def emit(e):
        events.append(e)
        if isinstance(e, Finished):
            done.set()

    engine.submit([Sequence(decoder.encode("x"), Sampling(max_tokens=8, temperature=0), emit)])
    assert done.wait(60)
    engine.stop()
    assert all(isinstance(e, Delta) for e in events[:-1]) and isinstance(events[-1], Finished)
    assert sum(len(e.tokens) for e in events[:-1]) == 8
