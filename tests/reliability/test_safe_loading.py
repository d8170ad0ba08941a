"""Loading never runs code from a file, and a broken or mismatched file is one clear line."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zerotune import files
from zerotune.cli import main
from zerotune.config import load_config
from zerotune.errors import ZerotuneError
from zerotune.models import ARCHS
from zerotune.train import checkpoint as ckpt

PACKAGE = Path(__file__).resolve().parents[2] / "zerotune"


# ---------------------------------------------------------------- the source itself


def _name(node: ast.AST) -> str:
    """``torch.load`` for the expression ``torch.load``; '' for anything not a dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def unsafe_calls(source: str) -> list[str]:
    """Calls that could deserialise code: torch.load without weights_only=True, np.load without
    allow_pickle=False, plain pickle loading, yaml.load and friends, an Unpickler without find_class."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            line = f"line {node.lineno}: {name}"
            if name == "torch.load" and _keyword(node, "weights_only") is not True:
                found.append(f"{line} without weights_only=True")
            elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is not False:
                found.append(f"{line} without allow_pickle=False")
            elif name in ("pickle.load", "pickle.loads", "marshal.loads", "dill.load", "joblib.load",
                          "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "eval", "exec",
                          "torch.jit.load"):
                found.append(line)
        elif isinstance(node, ast.ClassDef) and any(_name(b) == "pickle.Unpickler" for b in node.bases):
            if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                found.append(f"line {node.lineno}: Unpickler {node.name} without find_class")
    return found


def test_unsafe_call_finder_finds_them():
    src = ("torch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f)\npickle.loads(b)\nyaml.load(s)\n"
           "class U(pickle.Unpickler):\n    pass\ntorch.load(f, weights_only=True)\nnp.load(f, allow_pickle=False)\n")
    assert len(unsafe_calls(src)) == 6


def test_no_file_reader_in_zerotune_can_run_code():
    problems = [f"{p.relative_to(PACKAGE.parent)}: {u}" for p in sorted(PACKAGE.rglob("*.py"))
                for u in unsafe_calls(p.read_text(encoding="utf-8"))]
    assert problems == []


# ---------------------------------------------------------------- pickles


class Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_resume_from_a_checkpoint_whose_pickle_runs_code_is_refused(tmp_path, monkeypatch, capfd, reference_run):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "model.json").unlink()  # unfinished: resume will load the latest checkpoint
    folder = ckpt.latest_checkpoint(run / "checkpoints")
    state = folder / "state.pt"
    torch.save({"loop": Evil()}, state)  # a .pt file, written the way torch writes one
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.pt"] = ckpt.sha256(state)  # checksums pass: only the unpickler stands guard
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--resume", str(run)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {folder / 'state.pt'}: cannot be loaded safely"), err
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------- YAML


@pytest.mark.parametrize("text", [
    "seed: !!python/object/apply:os.system ['touch PWNED']\n",
    "!!python/object/apply:subprocess.call [['touch', 'PWNED']]\n",
    "seed: !!python/name:os.system\n",
    "data: !!python/object/new:collections.OrderedDict [[[train, builtin:digits]]]\n",
])
def test_yaml_python_tags_are_refused(tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(ZerotuneError, match=r"evil\.yaml: line \d+: invalid YAML: could not determine a constructor"):
        load_config(path)
    assert not (tmp_path / "PWNED").exists()


def test_yaml_python_tag_in_an_override_stays_a_string(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZerotuneError, match=r"seed: expected an integer, got \"!!python/object/apply:os.system"):
        load_config({}, ["seed=!!python/object/apply:os.system ['touch PWNED']"])
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------- safetensors


def _safetensors(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


GARBAGE = {
    "empty": b"",
    "short": b"\x01\x02\x03",
    "huge header length": _safetensors({}, length=2**62),
    "header past the end": _safetensors({}, length=1000),
    "header not JSON": _safetensors(b"{not json"),
    "header not an object": _safetensors([1, 2, 3]),
    "unknown dtype": _safetensors({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "offsets past the data": _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, b"\0" * 8),
    "shape disagrees with offsets": _safetensors({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                                 b"\0" * 8),
    "negative shape": _safetensors({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "offsets reversed": _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8),
    "a pickle": pickle.dumps({"w": torch.zeros(2)}),
}


@pytest.mark.parametrize("name", GARBAGE)
def test_safetensors_garbage_is_a_clean_error(tmp_path, name):
    path = tmp_path / "model.safetensors"
    path.write_bytes(GARBAGE[name])
    with pytest.raises(ZerotuneError, match=rf"^{path}: not a readable safetensors file \(.+\)$"):
        files.load_weights(path)


# ---------------------------------------------------------------- a run that does not fit its weights


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _edit_weights(path: Path, edit) -> None:
    weights = files.load_weights(path)
    edit(weights)
    save_file(weights, str(path))


def _put(key, value):
    return lambda weights: weights.__setitem__(key, value)


def _set(key, value):
    def edit(d):
        parent = d
        *parents, leaf = key.split(".")
        for p in parents:
            parent = parent[p]
        parent[leaf] = value

    return edit


OTHER_ARCHS = [a for a in ARCHS if a != "mlp"]
TAMPERED = {
    "narrower layer": ("model.json", _set("model.hidden", [16]),
                       "model.safetensors: tensor 'net.1.weight' has shape (32, 64), the model expects (16, 64)"),
    "deeper mlp": ("model.json", _set("model.hidden", [32, 32]), "model.safetensors: tensor 'net."),
    "unknown arch": ("model.json", _set("model.arch", "nosuch"),
                     "model.json: model.arch: unknown arch 'nosuch'; choose from"),
    "unknown model key": ("model.json", _set("model.heads", 4), "model.json: model.heads: unknown key"),
    "other input shape": ("model.json", _set("data_info.input_shape", [1, 4, 4]),
                          "model.safetensors: tensor 'net.1.weight' has shape (32, 64), the model expects (32, 16)"),
    "data_info not a mapping": ("model.json", _set("data_info", "image"), "model.json: data_info:"),
    "data_info wrong type": ("model.json", _set("data_info.input_shape", "8x8"), "model.json: data_info.input_shape:"),
    "preprocess unknown key": ("model.json", _set("preprocess.scale", 2), "model.json: preprocess.scale:"),
    "model.json missing model": ("model.json", lambda d: d.pop("model"), "model.json: key 'model' is missing"),
    "tensor missing": ("model.safetensors", lambda w: w.pop("net.4.bias"),
                       "model.safetensors: tensor 'net.4.bias' is missing (1 missing in all)"),
    "extra tensor": ("model.safetensors", _put("net.9.weight", torch.zeros(2)),
                     "model.safetensors: unexpected tensor 'net.9.weight'"),
    "mis-shaped tensor": ("model.safetensors", _put("net.4.weight", torch.zeros(10, 31)),
                          "model.safetensors: tensor 'net.4.weight' has shape (10, 31), the model expects (10, 32)"),
    "tokenizer.json garbage": ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": 7}}',
                               "tokenizer.json: not a valid tokenizer.json"),
} | {f"arch {a}": ("model.json", _set("model", {"arch": a}), "error: ") for a in OTHER_ARCHS}


@pytest.fixture(scope="module")
def finished_run(reference_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    shutil.copytree(reference_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "plots"))
    return run


@pytest.mark.parametrize("case", TAMPERED)
def test_evaluate_a_run_that_does_not_fit_its_weights(tmp_path, capfd, finished_run, case):
    name, edit, expected = TAMPERED[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    if isinstance(edit, bytes):
        (run / name).write_bytes(edit)
    else:
        (_edit_json if name == "model.json" else _edit_weights)(run / name, edit)
    assert main(["evaluate", str(run)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert str(run) in err[0]
    assert not (run / "eval.json").exists()
