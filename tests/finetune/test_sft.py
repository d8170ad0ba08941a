import json

import pytest
import torch
import torch.nn.functional as F

from zerotune.config import ChatTemplate, SFTConfig, load_config
from zerotune.data.chat import (
    IGNORE,
    build_rows,
    chat_prompt_ids,
    encode_chat,
    end_token_id,
    example_pair,
    load_chat_template,
    save_chat_template,
)
from zerotune.data.instructions import load_instructions, messages_from_row
from zerotune.data.tokenizer import load_tokenizer, train_tokenizer
from zerotune.errors import ZerotuneError
from zerotune.train.tasks import make_sft_task

T = ChatTemplate()
CORPUS = "abcdefghijklmnopqrstuvwxyz ABC.,!?\n0123456789 hello world the answer is"


def render_chat(messages: list[dict[str, str]], template: ChatTemplate, add_generation_prompt: bool = False) -> str:
    """The chat as text, markers included: what encode_chat must encode."""
    if template.default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": template.default_system}, *messages]
    text = "".join(template.marker(m["role"]) + m["content"] + template.end for m in messages)
    return text + (template.assistant if add_generation_prompt else "")


def decode_chat(ids: list[int], tokenizer, template: ChatTemplate) -> list[dict[str, str]]:
    """Token ids from encode_chat split back into messages at its (single-token) markers."""
    markers = {tokenizer.token_to_id(template.marker(role)): role for role in ("system", "user", "assistant", "end")}
    messages, role, body = [], None, []
    for t in ids:
        kind = markers.get(t)
        if kind is None:
            body.append(t)
        elif kind == "end":
            messages.append({"role": role, "content": tokenizer.decode(body, skip_special_tokens=False)})
            role, body = None, []
        else:
            assert role is None, f"{kind} marker inside an open {role} message"
            role = kind
    assert role is None, f"the last {role} message has no end marker"
    return messages


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "c.txt").write_text(CORPUS)
    return load_tokenizer(train_tokenizer(f"text:{d / 'c.txt'}", 64, d / "char", kind="char", progress=False))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    (d / "c.txt").write_text(CORPUS * 20)
    return load_tokenizer(train_tokenizer(f"text:{d / 'c.txt'}", 300, d / "bpe", progress=False))


def ids_of(tok, text):
    return [tok.token_to_id(c) for c in text]


def test_labels_exact_positions(char_tok):
    U, A, E = (char_tok.token_to_id(m) for m in ("<|user|>", "<|assistant|>", "<|end|>"))
    a, b, c = ids_of(char_tok, "abc")
    ids, answer = encode_chat([{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}], char_tok, T)
    assert ids == [U, a, b, E, A, c, E]
    assert answer == [False, False, False, False, False, True, True]
    x, y = example_pair(ids, answer, 100)
    assert x == [U, a, b, E, A, c]
    # only the answer "c" and its end marker are targets, each at the position before it
    assert y == [IGNORE, IGNORE, IGNORE, IGNORE, c, E]


def test_multi_turn_labels_and_system(char_tok):
    S, U, A, E = (char_tok.token_to_id(m) for m in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    s, a, b, c, d = ids_of(char_tok, "sabcd")
    ids, answer = encode_chat(chat, char_tok, T)
    assert ids == [S, s, E, U, a, E, A, b, E, U, c, E, A, d, E]
    x, y = example_pair(ids, answer, 100)
    expected = [IGNORE] * 14
    expected[6], expected[7] = b, E  # after <|assistant|> of turn 1: "b" then <|end|>
    expected[12], expected[13] = d, E
    assert y == expected


def test_instruction_row_and_default_system(char_tok):
    chat = messages_from_row({"instruction": "do", "input": "it", "output": "ok"})
    assert chat == [{"role": "user", "content": "do\n\nit"}, {"role": "assistant", "content": "ok"}]
    with_system = ChatTemplate(default_system="be")
    assert render_chat(chat, with_system) == "<|system|>be<|end|><|user|>do\n\nit<|end|><|assistant|>ok<|end|>"
    assert render_chat(chat[:1], T, add_generation_prompt=True) == "<|user|>do\n\nit<|end|><|assistant|>"


def test_literal_marker_in_content_is_text(bpe_tok):
    end = bpe_tok.token_to_id("<|end|>")
    ids, answer = encode_chat([{"role": "user", "content": "say <|end|> now"},
                               {"role": "assistant", "content": "ok"}], bpe_tok, T)
    assert ids.count(end) == 2  # only the two real turn ends
    assert decode_chat(ids, bpe_tok, T)[0]["content"] == "say <|end|> now"


def test_template_round_trip(bpe_tok, tmp_path):
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello world?"},
            {"role": "assistant", "content": "the answer is 42.\nbye"}]
    ids, _ = encode_chat(chat, bpe_tok, T)
    assert decode_chat(ids, bpe_tok, T) == chat
    # the text form encodes (markers matched as special tokens) to the same ids
    assert bpe_tok.encode(render_chat(chat, T), add_special_tokens=False).ids == ids
    prompt = chat_prompt_ids(chat[:2], bpe_tok, T)
    assert prompt == bpe_tok.encode(render_chat(chat[:2], T, add_generation_prompt=True),
                                    add_special_tokens=False).ids
    custom = ChatTemplate(user="<|bos|>", default_system="hi")
    path = save_chat_template(custom, tmp_path)
    assert path.name == "chat_template.json"
    assert load_chat_template(tmp_path) == custom


def test_packing_keeps_masks(char_tok):
    chats = [[{"role": "user", "content": u}, {"role": "assistant", "content": r}]
             for u, r in [("ab", "cd"), ("e", "fgh"), ("ijk", "l"), ("m", "n")]]
    pairs = [example_pair(*encode_chat(c, char_tok, T), 100) for c in chats]
    single = build_rows(chats, char_tok, T, 100, packing=False, pad_id=0)
    packed = build_rows(chats, char_tok, T, 16, packing=True, pad_id=0)
    # whole examples back to back: rows of ≤ 16 positions, the same targets in the same order
    assert packed.lengths.tolist() == [len(pairs[0][0]) + len(pairs[1][0]), len(pairs[2][0]) + len(pairs[3][0])]
    assert int(packed.lengths.max()) <= 16
    for row in range(2):
        x_cat = pairs[2 * row][0] + pairs[2 * row + 1][0]
        y_cat = pairs[2 * row][1] + pairs[2 * row + 1][1]
        n = len(x_cat)
        assert packed.x[row, :n].tolist() == x_cat
        assert packed.y[row, :n].tolist() == y_cat
        assert (packed.y[row, n:] == IGNORE).all()
    assert int((packed.y != IGNORE).sum()) == int((single.y != IGNORE).sum())
    # no target crosses an example: the target at each example's last position is its own end marker
    end = char_tok.token_to_id("<|end|>")
    first_len = len(pairs[0][0])
    assert packed.y[0, first_len - 1] == end
    assert packed.x[0, first_len] == char_tok.token_to_id("<|user|>")


def test_truncation_and_dropping(char_tok):
    long = [{"role": "user", "content": "abcdefgh"}, {"role": "assistant", "content": "xyz"}]
    short = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    rows = build_rows([long, short], char_tok, T, 6, packing=False, pad_id=0)
    # the long example's answer starts at position 10: nothing left within 6 positions, so it is dropped
    assert rows.examples == 1 and rows.dropped == 1 and rows.x.shape == (1, 5)
    cut = build_rows([long], char_tok, T, 12, packing=False, pad_id=0)
    x, y = example_pair(*encode_chat(long, char_tok, T), 12)
    assert cut.x.shape == (1, 12) and cut.y[0].tolist() == y
    assert y[-2:] == ids_of(char_tok, "xy")
    with pytest.raises(ZerotuneError, match="sft.max_length: 4 positions leave no answer"):
        build_rows([long], char_tok, T, 4, packing=False, pad_id=0)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_config(data_path, tok_dir, **extra):
    raw = {
        "seed": 0, "task": "sft",
        "data": {"train": f"jsonl:{data_path}", "val_split": 0.0, "tokenizer": str(tok_dir)},
        "model": {"arch": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 32},
        "optim": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": None, "max_steps": 60, "batch_size": 3, "progress": False, "log_every": 10,
                  "device": "cpu"},
        "sft": {"max_length": 32},
    }
    for k, v in extra.items():
        raw[k] = raw[k] | v if isinstance(v, dict) else v
    return load_config(raw)


def test_loss_is_summed_answer_ce(char_tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "ab", "output": "cd"}, {"instruction": "e", "output": "f"}])
    cfg = sft_config(p, tmp_path, train={"batch_size": 2})
    task = make_sft_task(cfg, char_tok)
    x, y = task.batch(0)
    out = torch.randn(*x.shape, char_tok.get_vocab_size())
    logp = out.log_softmax(-1)
    keep = y != IGNORE
    expected = -logp[keep].gather(-1, y[keep][:, None]).sum()  # hand reference over answer tokens only
    torch.testing.assert_close(task.loss(out, y), expected, rtol=1e-6, atol=1e-5)
    assert task.count(y) == 3 + 2  # "cd"+end, "f"+end
    torch.testing.assert_close(task.loss(out, y) / task.count(y), F.cross_entropy(out.flatten(0, 1), y.flatten()))


def test_batches_pure_and_val_split(char_tok, tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = sft_config(p, tmp_path, data={"val_split": 0.2})
    a, b = make_sft_task(cfg, char_tok), make_sft_task(cfg, char_tok)
    assert a.train.examples == 8 and a.val.examples == 2 and (a.split("val") is not None)
    for step in (0, 3, 7):
        torch.testing.assert_close(a.batch(step), b.batch(step))
    v = write_jsonl(tmp_path / "v.jsonl", rows[:3])
    c = make_sft_task(sft_config(p, tmp_path, data={"val": f"jsonl:{v}"}), char_tok)
    assert c.train.examples == 10 and c.val.examples == 3


def test_tiny_gpt_learns_instructions(char_tok, tmp_path):
    from zerotune.generate import generate
    from zerotune.models import build_model
    from zerotune.train.loop import train_loop

    rows = [{"instruction": "hello", "output": "world"}, {"instruction": "abc", "output": "def"},
            {"instruction": "123", "output": "456"}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = sft_config(p, tmp_path)
    torch.manual_seed(0)
    task = make_sft_task(cfg, char_tok)
    model = build_model(cfg.model, task.info)
    before = task.evaluate(model, task.train)["loss"]
    train_loop(model, task, cfg, log=lambda *a: None)
    after = task.evaluate(model, task.train)["loss"]
    assert after < 0.1 * before, (before, after)
    assert end_token_id(char_tok, T) == char_tok.token_to_id("<|end|>")
    chat = messages_from_row(rows[1])[:1]
    out = generate(model, [chat_prompt_ids(chat, char_tok, T)], max_new_tokens=8, temperature=0,
                   eos_id=end_token_id(char_tok, T))
    assert char_tok.decode(out[0]) == "def"


def test_bad_input_names_file_and_field(char_tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(ZerotuneError, match=r"bad.jsonl: line 2: not valid JSON"):
        load_instructions(f"jsonl:{bad}")
    bad.write_text('{"instruction": "a"}\n')
    with pytest.raises(ZerotuneError, match=r"bad.jsonl: line 1: output: required key is missing"):
        load_instructions(str(bad))
    bad.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    with pytest.raises(ZerotuneError, match=r"line 1: messages\[0\].role: 'bot' is not one of"):
        load_instructions(str(bad))
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(ZerotuneError, match=r"line 1: messages: no assistant message"):
        load_instructions(str(bad))
    bad.write_text('{"instruction": 3, "output": "b"}\n')
    with pytest.raises(ZerotuneError, match=r"line 1: instruction: expected a string"):
        load_instructions(str(bad))
    with pytest.raises(ZerotuneError, match=r"missing.jsonl: file not found"):
        load_instructions(str(tmp_path / "missing.jsonl"))
    bad.write_text("\n")
    with pytest.raises(ZerotuneError, match=r"bad.jsonl: no instruction rows"):
        load_instructions(str(bad))
    with pytest.raises(ZerotuneError, match=r"unknown builtin instruction set"):
        load_instructions("builtin:nope")
    good = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(ZerotuneError, match=r"sft.max_length: 64 is longer than model.block_size 32"):
        make_sft_task(sft_config(good, tmp_path), char_tok, sft=SFTConfig(max_length=64))
    (tmp_path / "chat_template.json").write_text('{"user": "<|user|>", "bot": "x"}')
    with pytest.raises(ZerotuneError, match=r"chat_template.json: bot: unknown key"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.json").write_text("[")
    with pytest.raises(ZerotuneError, match=r"chat_template.json: not valid JSON"):
        load_chat_template(tmp_path)
    with pytest.raises(ZerotuneError, match=r"template.end: 'two words' is not a single token"):
        end_token_id(char_tok, ChatTemplate(end="two words"))


def test_builtin_instructions_load():
    chats = load_instructions("builtin:pydoc_instructions")
    assert len(chats) > 50 and all(c[-1]["role"] == "assistant" and c[-1]["content"] for c in chats)


def test_recipe_config_validates():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "gpt_sft.yaml")
    assert cfg.task == "sft" and cfg.sft.template == ChatTemplate() and cfg.sft.max_length <= cfg.model.block_size
    with pytest.raises(ZerotuneError, match=r"sft.packing: expected true or false"):
        load_config({"task": "sft", "sft": {"packing": "maybe"}})
    with pytest.raises(ZerotuneError, match=r"sft.template.bot: unknown key"):
        load_config({"task": "sft", "sft": {"template": {"bot": "x"}}})


@pytest.mark.parametrize("world", [2, 3])
def test_validation_shares_add_up_to_one_process(char_tok, tmp_path, world):
    """Each of W processes evaluates batches rank, rank + W, ...: their sums add up to the one-process
    sums, and every process runs the same number of forwards (a short share pads with one)."""
    from zerotune.models import build_model

    rows = [{"instruction": f"q{i}" * (1 + i % 3), "output": f"a{i}"} for i in range(23)]
    cfg = sft_config(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, data={"val_split": 0.4})
    task = make_sft_task(cfg, char_tok)
    assert len(task.val) == 9  # in batches of 3: 3 batches, so 2 processes get 2 and 1
    torch.manual_seed(0)
    model = build_model(cfg.model, task.info)
    whole = task.eval_sums(model, task.val)
    forwards, parts = [], []
    for rank in range(world):
        seen: list[int] = []
        hook = model.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(1))
        parts.append(task.eval_sums(model, task.val, rank, world))
        hook.remove()
        forwards.append(len(seen))
    torch.testing.assert_close(sum(parts), whole, rtol=1e-12, atol=1e-9)
    assert len(set(forwards)) == 1
    assert task.metrics(whole) == task.evaluate(model, task.val)
    assert whole[1] > 0 and 0 <= whole[2] <= whole[1]
