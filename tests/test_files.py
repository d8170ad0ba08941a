"""zerotune.files: atomic writes with one-line errors, the readers, and that every writer uses them.

(A line that hands its write to ``atomic_write(path, lambda tmp: ...)`` writes the temporary file.)
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import torch

from zerotune import files
from zerotune.cli import main
from zerotune.errors import RunFailed, ZerotuneError

PACKAGE = Path(__file__).resolve().parents[1] / "zerotune"


def fail_with(code: int):
    def write(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(code, {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system"}[code])
    return write


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EROFS, "Read-only file system")])
def test_a_failed_write_keeps_the_old_file_and_says_so_in_one_line(tmp_path, code, reason):
    path = tmp_path / "model.json"
    files.write_json(path, {"v": 1})
    with pytest.raises(RunFailed, match=re.escape(f"{path}: cannot write the file ({reason}); files written "
                                                  "before are kept")) as e:
        files.atomic_write(path, fail_with(code))
    assert e.value.exit_code == 1
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]  # no temporary file left


def test_writers_round_trip(tmp_path):
    files.write_text(tmp_path / "a.txt", "é\n")
    files.write_json(tmp_path / "b.json", {"x": [1, 2]}, indent=2)
    files.copy_file(tmp_path / "a.txt", tmp_path / "c.txt")
    tied = torch.arange(6.0).reshape(2, 3)
    files.save_weights(tmp_path / "w.safetensors", {"emb": tied, "head": tied})  # shared memory is copied
    assert (tmp_path / "c.txt").read_text(encoding="utf-8") == "é\n"
    assert files.read_json_object(tmp_path / "b.json") == {"x": [1, 2]}
    loaded = files.load_weights(tmp_path / "w.safetensors")
    assert torch.equal(loaded["emb"], tied) and torch.equal(loaded["head"], tied)


@pytest.mark.parametrize("raw, message", [
    (None, "file not found"),
    (b"\xff\xfe{", "not UTF-8 text"),
    (b'{"a": ', "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
])
def test_read_json_object_errors_name_the_file(tmp_path, raw, message):
    path = tmp_path / "x.json"
    if raw is not None:
        path.write_bytes(raw)
    with pytest.raises(ZerotuneError, match=re.escape(f"{path}: {message}")):
        files.read_json_object(path)


def test_iter_jsonl_numbers_lines_and_names_the_bad_one(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n  \n{"a": 2}\n')  # a BOM, blank lines skipped
    assert list(files.iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]
    for raw, message in [(b'{"a": 1}\n{"a"\n', "line 2: not valid JSON"), (b'{"a": 1}\n[3]\n',
                         "line 2: expected a JSON object, got list"), (b'{"a": 1}\n\xff\n', "line 2: not UTF-8 text")]:
        path.write_bytes(raw)
        with pytest.raises(ZerotuneError, match=re.escape(f"{path}: {message}")):
            list(files.iter_jsonl(path))


def test_a_full_disk_under_a_verb_is_one_line_and_the_old_file_stays(tmp_path, monkeypatch, capfd):
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--input", "builtin:pydoc", "--vocab-size", "300", "--kind", "char", "--out",
            str(out)]
    assert main(args) == 0
    before = (out / "tokenizer.json").read_bytes()

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "fsync_file", full)
    capfd.readouterr()
    assert main([*args[:-4], "--vocab-size", "400", "--kind", "char", "--out", str(out), "--overwrite"]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"error: {out / 'tokenizer.json'}: cannot write the file (No space left on device); files "
                   "written before are kept"]
    assert (out / "tokenizer.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]


# Writing a file any other way than through zerotune.files, and the few places that may (each
# commits its files another way, said here).
WRITES = re.compile(r"\.write_text\(|\.write_bytes\(|\bopen\([^)]*[\"'][wax]b?\+?[\"']|\bsave_file\(|\btorch\.save\("
                    r"|\.save\(str\(|\bos\.replace\(|\bshutil\.copy(file)?\(|\.savefig\(|\bnp\.save\(")
ALLOWED = {
    "files.py": "the atomic writers themselves",
    "train/checkpoint.py": "a checkpoint is a folder written under a temporary name, fsynced, then renamed",
    "data/shards.py": "shard files are streamed, fsynced, and committed by index.json, written last",
    "train/loop.py": "metrics.jsonl is an append-only log; a torn last line is dropped on resume",
    "data/download.py": "a download streams into the temporary file that atomic_write hands it",
}


def test_every_file_the_package_writes_goes_through_zerotune_files():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if WRITES.search(code) and rel not in ALLOWED and "atomic_write(" not in code:
                offenders.append(f"zerotune/{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_scan_finds_a_plain_write():
    assert WRITES.search('(folder / "config.json").write_text(text)')
    assert WRITES.search('with open(path, "w") as f:')
    assert WRITES.search("tokenizer.save(str(folder / 'tokenizer.json'))")
    assert not WRITES.search("write_text(path, text)")


@pytest.mark.parametrize("weight_map, message", [
    ({"w": "../elsewhere.safetensors"}, "weight_map: expected an object of tensor names → file names in this folder"),
    ({"w": 7}, "weight_map: expected an object"),
    ({"w": "shard-2.safetensors"}, "shard-2.safetensors: shard listed in model.safetensors.index.json is missing"),
])
def test_a_hugging_face_index_names_files_in_its_folder(tmp_path, weight_map, message):
    from zerotune.interop.hf_files import read_weights

    files.write_json(tmp_path / "model.safetensors.index.json", {"weight_map": weight_map})
    with pytest.raises(ZerotuneError, match=re.escape(message)):
        read_weights(tmp_path)


@pytest.mark.parametrize("data", [b"M", b"J\x01", b"K", b"\x80\x02M\x01"])
def test_a_pickle_cut_inside_an_opcode_is_one_clear_error(tmp_path, data):
    """The weights-only unpickler reads an opcode's argument with struct.unpack; cut short, that raises
    struct.error, which must become the same one-line error as any other damaged file."""
    path = tmp_path / "state.pt"
    path.write_bytes(data)
    with pytest.raises(ZerotuneError, match="cannot be loaded safely"):
        files.load_torch(path)
