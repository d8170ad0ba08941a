"""Files in and out, in one place: every file zerotune writes is written atomically.

Writing ``path``: the content goes to a temporary file beside it (``.NAME.tmp-PID``), which is
fsynced, renamed over ``path`` and its folder fsynced, so a crash or a full disk at any moment
leaves either the old file or the new one, never half of one. A write that fails (``ENOSPC``,
``EROFS``, ``EIO``...) removes the temporary file and raises :class:`~zerotune.errors.RunFailed`
(exit code 1) naming the file, with the old content kept.

Reading: safetensors weights, PyTorch files (``weights_only``: they cannot run code), a JSON
object and a JSONL file of objects; a missing, malformed or unsafe file is one
:class:`~zerotune.errors.ZerotuneError` line naming it.

    atomic_write(path, write)       write(tmp) fills the temporary file; then fsync + rename
    write_text / write_json         text, or an object as JSON (+ newline)
    copy_file(src, dst)             a copy, atomically
    check_output(out, ...)          the one output rule: what may be written, and what --overwrite may replace
    staged_folder(out)              build a folder beside ``out``, then swap it into place
    save_weights / load_weights     safetensors (tensors that share memory, like tied embeddings, are copied)
    load_torch(path)                torch.load(weights_only=True) with the one-line errors
    read_text(path)                 a UTF-8 text file
    read_json_object(path)          a JSON object
    iter_jsonl(path)                (line number, object) for each non-blank line
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from zerotune.errors import RunFailed, ZerotuneError


def first_line(e: BaseException) -> str:
    """An exception's message up to its first line break (its type name when it has no message)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failed(e: OSError | SafetensorError, path: Path, what: str) -> RunFailed:
    """A failed write (disk full, read-only filesystem, I/O error) as a one-line RunFailed naming the file."""
    reason = getattr(e, "strerror", None) or first_line(e)
    return RunFailed(f"cannot write {what} ({reason}); files written before are kept", path=path)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Write ``path`` by calling ``write(tmp_path)``, fsync, then rename over ``path``.

    Raises:
        RunFailed: the write failed (e.g. the disk is full); ``path`` keeps its old content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
        raise write_failed(e, path, "the file") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any, indent: int = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def copy_file(src: str | Path, dst: str | Path) -> None:
    atomic_write(dst, lambda p: shutil.copyfile(src, p))


# ---------------------------------------------------------------- outputs


def overlaps(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b``, lies inside it, or holds it."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output(out: str | Path, *, overwrite: bool, inputs: Iterable[str | Path] = (), kind: str = "folder",
                 recognise: Callable[[Path], bool] | None = None) -> bool:
    """The output rule every verb that writes follows, checked before any work: whether ``out`` (a
    folder) may be written, True when it holds an earlier output that will be replaced.

    ``out`` may not be, hold or lie inside any of the verb's ``inputs``; an existing non-empty folder
    is replaced only with ``overwrite``, and only when ``recognise(out)`` says it is the same ``kind``
    of output (a folder of something else is never removed).

    Raises:
        ZerotuneError: any of these (exit 2), naming ``out``.
    """
    out = Path(out)
    for path in inputs:
        if overlaps(out, Path(path)):
            raise ZerotuneError(f"is, holds or lies inside an input of this command ({path}); choose another "
                                "folder", path=out)
    if out.exists() and not out.is_dir():
        raise ZerotuneError("exists and is not a folder", path=out)
    if not (out.is_dir() and any(out.iterdir())):
        return False
    if recognise is not None and not recognise(out):
        a = "an" if kind[0] in "aeiou" else "a"
        raise ZerotuneError(f"holds files and is not {a} {kind}; choose another folder (--overwrite replaces only "
                            f"{a} {kind})", path=out)
    if not overwrite:
        raise ZerotuneError(f"{kind} already exists; pass --overwrite to replace it or --out to choose another",
                            path=out)
    return True


def check_output_file(out: str | Path, *, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """The output rule for one file: not an input, not a folder, and an existing one only with ``overwrite``."""
    out = Path(out)
    for path in inputs:
        if overlaps(out, Path(path)):
            raise ZerotuneError(f"is an input of this command ({path}); choose another file", path=out)
    if out.is_dir():
        raise ZerotuneError("is a folder; give a file name", path=out)
    if out.exists() and not overwrite:
        raise ZerotuneError("already exists; pass --overwrite to replace it", path=out)


@contextlib.contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """A new folder built at a temporary sibling (``.NAME.tmp-PID``), put in place of ``out`` only when
    the block succeeds (an old ``out`` is moved aside first and removed last). When the block fails,
    ``out`` is left as it was and the temporary folder is removed."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():  # stopped between the two renames: the old one goes back
            os.rename(old, out)
        if isinstance(e, OSError):
            raise write_failed(e, out, "the folder") from e
        if type(e) is RunFailed and str(tmp) in str(e):  # a write inside: name the file where it was going
            raise RunFailed(str(e).replace(str(tmp), str(out))) from e
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- tensors


def unshare(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): copy the later ones, on the CPU."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state_dict.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        out[k] = (v.clone() if key in seen else v).contiguous().cpu()
        seen.add(key)
    return out


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors, atomically."""
    tensors = unshare(state_dict)
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or malformed file is a ZerotuneError."""
    path = Path(path)
    if not path.is_file():
        raise ZerotuneError("weights file not found", path=path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ZerotuneError(f"not a readable safetensors file ({first_line(e)})", path=path) from None


def load_torch(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain values only: it cannot run code).

    Raises:
        ZerotuneError: a missing, damaged or unsafe file (named).
    """
    path = Path(path)
    if not path.is_file():
        raise ZerotuneError("file not found", path=path)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, LookupError,
            MemoryError, OverflowError, struct.error) as e:  # what torch's weights-only unpickler raises on a
        # damaged file (struct.error: an opcode cut short, e.g. b"M", BININT2 without its 2 bytes)
        raise ZerotuneError(f"cannot be loaded safely ({first_line(e)})", path=path) from None


def check_state_dict(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: object) -> None:
    """The tensor names and shapes ``model`` has are those of ``weights``, else the first offending
    tensor in one line. ``model`` may live on the meta device (shapes only, nothing allocated)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing:
        raise ZerotuneError(f"tensor {missing[0]!r} is missing ({len(missing)} missing in all)", path=source)
    if unexpected:
        raise ZerotuneError(f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)", path=source)
    for k, mine in own.items():  # in the model's order: the first layer that does not fit is named
        if tuple(weights[k].shape) != tuple(mine.shape):
            raise ZerotuneError(
                f"tensor {k!r} has shape {tuple(weights[k].shape)}, the model expects {tuple(mine.shape)}", path=source
            )


def load_state_dict_checked(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: object) -> None:
    """``model.load_state_dict`` whose failures name the first offending tensor in one line."""
    check_state_dict(model, weights, source)
    model.load_state_dict(weights)


# ---------------------------------------------------------------- text and JSON


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a leading BOM dropped).

    Raises:
        ZerotuneError: the file is missing, a folder, unreadable or not UTF-8 (named).
    """
    path = Path(path)
    if not path.is_file():
        raise ZerotuneError("file not found" if not path.exists() else "not a file", path=path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ZerotuneError(f"not UTF-8 text ({e.reason})", path=path) from None
    except OSError as e:
        raise ZerotuneError(f"cannot read ({e.strerror})", path=path) from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A file holding one JSON object.

    Raises:
        ZerotuneError: the file is missing, not UTF-8, not valid JSON, or not an object (named).
    """
    path = Path(path)
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ZerotuneError(f"not valid JSON ({e})", path=path) from None
    except RecursionError:
        raise ZerotuneError("not valid JSON (nested too deeply)", path=path) from None
    if not isinstance(data, dict):
        raise ZerotuneError(f"expected a JSON object, got {type(data).__name__}", path=path)
    return data


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file, read line by line.

    Raises:
        ZerotuneError: the file is missing, or a line is not UTF-8, not valid JSON or not an
            object (file and line named).
    """
    path = Path(path)
    if not path.is_file():
        raise ZerotuneError("file not found", path=path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ZerotuneError(f"line {n}: not UTF-8 text ({e.reason})", path=path) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ZerotuneError(f"line {n}: not valid JSON ({e.msg}, column {e.colno})", path=path) from None
            except RecursionError:
                raise ZerotuneError(f"line {n}: not valid JSON (nested too deeply)", path=path) from None
            if not isinstance(obj, dict):
                raise ZerotuneError(f"line {n}: expected a JSON object, got {type(obj).__name__}", path=path)
            yield n, obj
