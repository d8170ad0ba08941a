"""Fuzzing every reader with hypothesis: whatever the bytes, the result is a value or a
ZerotuneError whose message names the file, never another exception."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerotune.config import DataConfig, load_config
from zerotune.data.cifar import read_batch
from zerotune.data.idx import read_idx
from zerotune.data.shards import ShardDataset
from zerotune.data.sources import SOURCES, load_source
from zerotune.data.tabular import load_csv, load_jsonl
from zerotune.data.tokenizer import load_tokenizer
from zerotune.errors import ZerotuneError
from zerotune.files import load_weights

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def check(read, path: Path, *args):
    """Call ``read(path, *args)``; a ZerotuneError must name the file (or its folder)."""
    try:
        return read(path, *args)
    except ZerotuneError as e:
        assert str(path) in str(e) or str(path.parent) in str(e), str(e)
        return e


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["builtin:digits", "mlp", "adam", "relu", "nan", "inf"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def pieces(tokens: list[str], max_size: int) -> st.SearchStrategy[str]:
    """Strings made of ``tokens`` (single characters and keywords) in any order."""
    return st.lists(st.sampled_from(tokens), max_size=max_size).map("".join)


def mutated(base: bytes) -> st.SearchStrategy[bytes]:
    """``base`` with a few bytes changed, cut short, or extended."""
    @st.composite
    def build(draw):
        data = bytearray(base)
        for _ in range(draw(st.integers(0, 4))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(data)))
        return bytes(data[:cut] if draw(st.booleans()) else data) + draw(st.binary(max_size=8))
    return build()


# ---------------------------------------------------------------- config


CONFIG_KEYS = ["seed", "task", "data", "model", "optim", "schedule", "train", "arch", "hidden", "epochs",
               "batch_size", "lr", "train", "val_split", "early_stopping", "augment", "betas", "dropout"]
config_trees = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(CONFIG_KEYS), inner, max_size=4)), max_leaves=10)
yaml_texts = st.one_of(
    st.binary(max_size=200),
    pieces(list(":-[]{},'\"!&*#|>%@`\n\t ?abcdefgh0123.") + ["!!python/", "\ufeff", "seed", "train"], 60),
    config_trees.map(lambda t: json.dumps(t, allow_nan=True).encode()),
)


@FUZZ
@given(blob=yaml_texts)
def test_config_loader(scratch, blob):
    path = scratch / "config.yaml"
    path.write_bytes(blob if isinstance(blob, bytes) else blob.encode("utf-8", "surrogatepass"))
    check(load_config, path)


# ---------------------------------------------------------------- data specs


@pytest.fixture(scope="module")
def spec_dir(scratch):
    """A folder of small, mostly broken files for the data-spec fuzzer to point at."""
    d = scratch / "specs"
    (d / "empty").mkdir(parents=True)
    (d / "idx").mkdir()
    (d / "idx" / "train-images-idx3-ubyte").write_bytes(idx_blob(0x08, [2, 2, 2], b"\x01" * 8))
    (d / "idx" / "train-labels-idx1-ubyte").write_bytes(idx_blob(0x08, [2], b"\x00\x01"))
    (d / "cifar").mkdir()
    (d / "cifar" / "data_batch_1").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}))
    (d / "images" / "cat").mkdir(parents=True)
    (d / "images" / "cat" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (d / "t.csv").write_text("a,b,label\n1,2,x\n3,4,y\n")
    (d / "t.jsonl").write_text('{"text": "hi there", "label": 1}\n{"text": "yo", "label": 0}\n')
    (d / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    np.savez(d / "a.npz", x=np.zeros((3, 2)), y=np.array([0, 1, 0]))
    return d


@FUZZ
@given(kind=st.sampled_from([*SOURCES, "", "text", "shards", "idx "]), sep=st.sampled_from([":", "", "::"]),
       name=st.sampled_from(["", "empty", "idx", "cifar", "images", "t.csv", "t.jsonl", "bad.npz", "a.npz",
                             "nothing", "images/cat/x.png", "idx/train-images-idx3-ubyte"]),
       noise=st.text(max_size=6))
def test_data_spec_parser(spec_dir, kind, sep, name, noise):
    arg = str(spec_dir / name) + noise if name or not noise else noise
    try:
        load_source(f"{kind}{sep}{arg}", DataConfig())
    except ZerotuneError:
        pass


# ---------------------------------------------------------------- IDX


def idx_blob(code: int, dims: list[int], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", n) for n in dims) + payload


idx_blobs = st.one_of(
    st.binary(max_size=64),
    st.builds(idx_blob, st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07, 0xFF]),
              st.lists(st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)), max_size=4), st.binary(max_size=64)),
    mutated(idx_blob(0x08, [2, 3, 3], bytes(range(18)))),
)


@FUZZ
@given(blob=idx_blobs, gz=st.booleans(), ndim=st.sampled_from([None, 1, 3]))
def test_idx_reader(scratch, blob, gz, ndim):
    path = scratch / ("f-idx3-ubyte.gz" if gz else "f-idx3-ubyte")
    path.write_bytes(gzip.compress(blob) if gz and len(blob) % 3 else blob)  # some .gz files are not gzip
    check(read_idx, path, ndim)


# ---------------------------------------------------------------- CIFAR


cifar_objects = st.one_of(
    json_values,
    st.fixed_dictionaries({
        st.sampled_from(["data", b"data"]): st.one_of(
            st.builds(lambda n, w: np.zeros((n, w), np.uint8), st.integers(0, 3), st.sampled_from([3072, 3071, 1])),
            json_values),
        st.sampled_from(["labels", b"labels", "fine_labels", "x"]): st.one_of(
            st.lists(st.integers(-3, 12), max_size=4), json_values),
    }),
)


@FUZZ
@given(blob=st.one_of(st.binary(max_size=64),
                      st.builds(pickle.dumps, cifar_objects, st.integers(0, 5)),
                      mutated(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [3]}, protocol=2))))
def test_cifar_batch_reader(scratch, blob):
    path = scratch / "data_batch_1"
    path.write_bytes(blob)
    check(read_batch, path)


def test_cifar_pickle_that_would_run_code_is_refused(scratch):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    path = scratch / "evil_batch"
    path.write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    with pytest.raises(ZerotuneError, match=r"evil_batch: refusing to load builtins\.exec"):
        read_batch(path)


# ---------------------------------------------------------------- CSV and JSONL


table_text = pieces(list('ab,;"\n\r 0123456789.-eE') + ["label", "text", "nan", "\x00", "é"], 60)


@FUZZ
@given(body=st.one_of(table_text.map(lambda t: "label,text,a\n" + t), table_text, st.binary(max_size=40)))
def test_csv_reader(scratch, body):
    path = scratch / "t.csv"
    path.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass"))
    check(load_csv, path)


jsonl_lines = st.lists(st.one_of(
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    st.fixed_dictionaries({"label": json_values, "text": json_values}).map(json.dumps),
    st.fixed_dictionaries({"label": st.integers(0, 3), "a": json_values}).map(json.dumps),
    table_text), max_size=5).map("\n".join)


@FUZZ
@given(body=st.one_of(jsonl_lines, st.binary(max_size=40)))
def test_jsonl_reader(scratch, body):
    path = scratch / "t.jsonl"
    path.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass"))
    check(load_jsonl, path)


# ---------------------------------------------------------------- tokenizer.json


@pytest.fixture(scope="module")
def good_tokenizer(scratch):
    from zerotune.data.tokenizer import train_tokenizer

    (scratch / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 5)
    path = train_tokenizer(f"text:{scratch / 'corpus.txt'}", 40, scratch / "tok", kind="char", progress=False)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_tokenizer_reader(scratch, good_tokenizer, data):
    spec = json.loads(good_tokenizer)
    blob = data.draw(st.one_of(
        st.binary(max_size=40),
        json_values.map(lambda v: json.dumps({"model": v}).encode()),
        st.dictionaries(st.sampled_from(list(spec)), json_values, max_size=3).map(
            lambda d: json.dumps(spec | d).encode()),
        st.dictionaries(st.sampled_from(list(spec["model"])), json_values, max_size=2).map(
            lambda d: json.dumps(spec | {"model": spec["model"] | d}).encode()),
        mutated(good_tokenizer[:300]),
    ))
    path = scratch / "tokenizer.json"
    path.write_bytes(blob)
    check(load_tokenizer, path)


# ---------------------------------------------------------------- safetensors


tensor_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", 7]),
    "shape": st.lists(st.integers(-1, 5), max_size=3),
    "data_offsets": st.lists(st.integers(-1, 40), min_size=0, max_size=3),
})
safetensors_headers = st.dictionaries(
    st.sampled_from(["w", "b", "__metadata__", ""]),
    st.one_of(tensor_entries, json_values), max_size=3).map(lambda h: json.dumps(h).encode())


@FUZZ
@given(header=st.one_of(safetensors_headers, st.binary(max_size=20)), data=st.binary(max_size=48),
       length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_safetensors_reader(scratch, header, data, length):
    path = scratch / "weights.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    check(load_weights, path)


# ---------------------------------------------------------------- token shards


shard_entries = st.fixed_dictionaries({
    "file": st.sampled_from(["train_000000.bin", "missing.bin", "../x.bin", "", 3]),
    "tokens": st.one_of(st.integers(-1, 12), json_values),
    "documents": st.one_of(st.integers(0, 3), json_values),
})
shard_indexes = st.fixed_dictionaries(
    {"format": st.sampled_from(["zerotune-shards", "other"])},
    optional={"vocab_size": st.one_of(st.integers(-1, 300), json_values),
              "eos_id": st.one_of(st.integers(-1, 300), json_values),
              "dtype": st.sampled_from(["uint16", "uint32", "int8", None]),
              "splits": st.one_of(json_values, st.fixed_dictionaries(
                  {"train": st.one_of(json_values, st.fixed_dictionaries(
                      {"shards": st.one_of(json_values, st.lists(shard_entries, max_size=2))}))}))})


@FUZZ
@given(index=st.one_of(shard_indexes.map(json.dumps), st.text(max_size=30)), shard=st.binary(max_size=48),
       block=st.integers(0, 6))
def test_shard_index_reader(scratch, index, shard, block):
    d = scratch / "shards"
    d.mkdir(exist_ok=True)
    (d / "index.json").write_text(index, encoding="utf-8", errors="surrogatepass")
    (d / "train_000000.bin").write_bytes(shard)
    ds = check(ShardDataset, d)
    if isinstance(ds, ShardDataset):  # a readable index: batches are windows or a clean error too
        try:
            x, y = ds.batch(0, 2, block)
            assert x.shape == y.shape == (2, block)
        except ZerotuneError:
            pass


# ---------------------------------------------------------------- .npz arrays and images


def _npz_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.arange(6, dtype=np.float32).reshape(3, 2), y=np.array([0, 1, 0]))
    return buf.getvalue()


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)).save(buf, format="PNG")
    return buf.getvalue()


@FUZZ
@given(blob=st.one_of(st.binary(max_size=40), mutated(_npz_bytes())))
def test_npz_arrays_reader(scratch, blob):
    from zerotune.data.sources import load_arrays

    path = scratch / "a.npz"
    path.write_bytes(blob)
    check(lambda p: load_arrays(str(p)), path)


@FUZZ
@given(blob=st.one_of(st.binary(max_size=40), mutated(_png_bytes())))
def test_image_folder_reader(scratch, blob):
    from zerotune.data.images import load_images

    (scratch / "img" / "a").mkdir(parents=True, exist_ok=True)
    path = scratch / "img" / "a" / "x.png"
    path.write_bytes(blob)
    try:
        load_images(str(scratch / "img"))
    except ZerotuneError as e:
        assert str(path) in str(e) or str(scratch / "img") in str(e), str(e)


# ---------------------------------------------------------------- checkpoint folders


def _state_bytes() -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"loop": {"step": 3}, "rng": torch.arange(4)}, buf)
    return buf.getvalue()


@FUZZ
@given(state=st.one_of(st.binary(max_size=40), mutated(_state_bytes())),
       manifest=st.one_of(st.none(), json_values.map(json.dumps), st.binary(max_size=20)),
       files=st.dictionaries(st.sampled_from(["weights.safetensors", "state.pt", "../x", "", "sub"]),
                             st.one_of(st.just("match"), json_values), max_size=3))
def test_checkpoint_folder_reader(scratch, state, manifest, files):
    import hashlib
    import shutil
    import warnings

    from zerotune import files as zfiles
    from zerotune.train import checkpoint as ckpt

    root = scratch / "ckpts"
    shutil.rmtree(root, ignore_errors=True)
    folder = root / "step-000003"
    (folder / "sub").mkdir(parents=True)
    (folder / "state.pt").write_bytes(state)
    zfiles.save_weights(folder / "weights.safetensors", {"w": np.zeros(2, np.float32)} and {})
    digests = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() if (folder / f).is_file() else "0"
               for f in ("weights.safetensors", "state.pt")}
    if manifest is None:  # a manifest that matches, with fuzzed entries
        manifest = json.dumps({"step": 3, "files": digests | {k: digests.get(k, "0") if v == "match" else v
                                                             for k, v in files.items()}})
    (folder / "manifest.json").write_bytes(manifest if isinstance(manifest, bytes) else manifest.encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = ckpt.latest_checkpoint(root)
    assert found in (None, folder)
    check(ckpt.load_checkpoint, folder)


# ---------------------------------------------------------------- configuration values on the command line

# every leaf key of a digits MLP config that does not decide how long training takes
SET_KEYS = ["seed", "task", "data.val_split", "data.test_split", "data.normalize", "data.classes", "data.train",
            "optim.name", "optim.lr", "optim.weight_decay", "optim.momentum", "optim.nesterov", "optim.betas",
            "optim.eps", "schedule.name", "schedule.warmup_steps", "schedule.step_size", "schedule.gamma",
            "schedule.min_lr_ratio", "train.batch_size", "train.grad_accum", "train.loss", "train.label_smoothing",
            "train.grad_clip", "train.metrics", "train.eval_every", "train.log_every", "train.checkpoint_every",
            "train.keep_last", "train.on_nonfinite", "train.max_skips", "train.precision", "model.hidden",
            "model.activation", "model.dropout", "model.norm", "model.init", "model.arch", "train.early_stopping"]
yaml_scalars = st.one_of(
    st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}.get(str(f), repr(f))),
    st.text(alphabet="abcdefxyz_01.-:[]{},", max_size=10), st.sampled_from(["true", "null", "~", "[]", "{}", "''"]),
    st.lists(st.integers(-3, 10**7), max_size=3).map(json.dumps),
    st.sampled_from(["[top0_accuracy]", "[f1, auroc]", "normal(-1)", "normal(0.02)", "sgd", "bf16", "cnn", "1e400"]))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(SET_KEYS), value=yaml_scalars)
def test_any_set_value_trains_or_is_one_line(scratch, key, value):
    """`train CONFIG --set KEY=VALUE`: it trains (exit 0), stops on a run failure such as divergence (exit 1),
    or refuses the value (exit 2), always with one line naming it, never a traceback, and a neighbouring run
    folder never changes."""
    import yaml as pyyaml

    from tests.conftest import tiny_config
    from tests.reliability.common import snapshot
    from zerotune.cli import main

    config = scratch / "fuzz.yaml"
    if not config.exists():
        config.write_text(pyyaml.safe_dump(tiny_config(epochs=None, max_steps=2, eval_every=1)))
        main(["train", str(config), "--out", str(scratch / "keep")])
    keep = snapshot(scratch / "keep")
    proc = subprocess.run([sys.executable, "-m", "zerotune", "train", str(config), "--set", f"{key}={value}", "--out",
                           str(scratch / "fuzzrun"), "--overwrite"], capture_output=True, text=True, timeout=600,
                          cwd=scratch)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode in (0, 1, 2), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    if proc.returncode:
        assert len(errors) == 1, proc.stderr
    if proc.returncode == 2:
        top = key.split(".")[0]
        assert top in errors[0] or "data spec" in errors[0] or "--set" in errors[0], errors[0]
    assert keep == snapshot(scratch / "keep")


# ---------------------------------------------------------------- model.json and Hugging Face folders


def replaced(base: dict) -> st.SearchStrategy[dict]:
    """``base`` with one value anywhere in it (a nested key or list item) replaced by any JSON
    value, or removed."""
    paths: list[tuple] = []

    def walk(node, path):
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in children:
            walk(v, (*path, k))

    walk(base, ())

    @st.composite
    def build(draw):
        tree = json.loads(json.dumps(base))
        path = draw(st.sampled_from(paths[1:]))
        parent = tree
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(st.one_of(json_values, st.integers(-2**63, 2**64), st.integers(-3, 3)))
        return tree

    return build()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished digits MLP run (its model.json is what the reader below fuzzes)."""
    from tests.conftest import tiny_config
    from zerotune.train.api import train

    return train(tiny_config(epochs=1), out=tmp_path_factory.mktemp("mj") / "run", log=lambda *a: None)


def _model_json(run: Path) -> dict:
    return json.loads((run / "model.json").read_text())


@FUZZ
@given(data=st.data())
def test_model_json_reader(scratch, small_run, data):
    """Any model.json: the run loads (and its model runs on an example) or one line names the file."""
    import shutil

    from zerotune.load import load_run

    run = scratch / "run"
    if not run.exists():
        shutil.copytree(small_run, run)
    good = _model_json(small_run)
    edited = replaced(good).map(lambda t: json.dumps(t).encode())  # drawn half the time: values, not bytes
    blob = data.draw(st.one_of(edited, edited, mutated(json.dumps(good).encode()), st.binary(max_size=40)))
    (run / "model.json").write_bytes(blob)
    loaded = check(load_run, run)
    if not isinstance(loaded, ZerotuneError):
        import torch

        with torch.no_grad():
            loaded.model(torch.zeros(2, *loaded.info.input_shape))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny GPT run exported in Hugging Face format, its weights cut into two shards with an index."""
    from tests.helpers import write_char_shards
    from zerotune.files import save_weights, write_json
    from zerotune.interop.export import export
    from zerotune.train.api import train

    root = tmp_path_factory.mktemp("hf")
    shards = write_char_shards(root, "the cat sat on the mat. " * 6, 40, 0.1)
    run = train({"seed": 0, "task": "causal_lm", "data": {"train": f"shards:{shards}"},
                 "model": {"arch": "gpt", "block_size": 16, "n_layer": 1, "n_head": 2, "d_model": 16},
                 "train": {"epochs": None, "max_steps": 2, "batch_size": 4, "progress": False, "metrics": []}},
                out=root / "run", log=lambda *a: None)
    out = export(run, "hf", root / "hf")
    tensors = load_weights(out / "model.safetensors")
    names = sorted(tensors)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, part in half.items():
        save_weights(out / file, {n: tensors[n] for n in part})
    (out / "model.safetensors").unlink()
    write_json(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": {
        n: file for file, part in half.items() for n in part}})
    return out


@FUZZ
@given(data=st.data())
def test_hugging_face_folder_reader(scratch, hf_folder, data):
    """Any config.json or weight index: the model loads (and runs on a few tokens) or one line
    names a file of the folder."""
    import shutil

    import torch

    from zerotune.load import load

    folder = scratch / "hf"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(hf_folder, folder)
    name = data.draw(st.sampled_from(["config.json", "model.safetensors.index.json"]))
    good = json.loads((hf_folder / name).read_text())
    edited = replaced(good).map(lambda t: json.dumps(t).encode())  # drawn half the time: values, not bytes
    blob = data.draw(st.one_of(edited, edited, mutated(json.dumps(good).encode()), st.binary(max_size=40)))
    (folder / name).write_bytes(blob)
    try:
        model, _ = load(folder)
    except ZerotuneError as e:
        assert str(folder) in str(e), str(e)
        return
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
