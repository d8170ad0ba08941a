"""Checkpoint I/O, in one place: atomic, checksummed, resumable.

Layout of ``RUN/checkpoints/``::

    step-000600/weights.safetensors   model weights
    step-000600/state.pt              optimizer, scheduler, RNG states, loop counters, config
    step-000600/manifest.json         step and the SHA-256 of each file above (written last)
    best/                             the same three files for the best evaluation so far

A checkpoint folder is written under a temporary name, every file and the folder are
fsynced, and only then renamed into place, so a crash (or a full disk) at any moment leaves
the previous checkpoints intact. A write that fails (``ENOSPC``, ``EIO``...) removes its partial
files and raises :class:`~zerotune.errors.RunFailed` (exit code 1) naming the file. Loading
verifies the manifest's checksums and falls back to the newest checkpoint that verifies, with
a warning; before that, :func:`recover` undoes what a save killed half-way left behind.
``state.pt`` holds only tensors and plain Python values and is read with
``torch.load(weights_only=True)``: it cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from zerotune.errors import ZerotuneError
from zerotune.files import fsync_dir, fsync_file, load_torch, load_weights, unshare, write_failed

WEIGHTS, STATE, MANIFEST = "weights.safetensors", "state.pt", "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every random state a run touches, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- checkpoints


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so a failed write surfaces as the OSError it is
    (writing to a path, torch reports a full disk as a RuntimeError from its zip writer)."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(
    root: str | Path,
    name: str,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``root/name`` atomically; with ``keep_last``, prune older step folders.

    Raises:
        RunFailed: a write failed (e.g. the disk is full); the partial folder is removed and
            every earlier checkpoint is left as it was.
    """
    root = Path(root)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(unshare(weights), str(tmp / WEIGHTS))
        _torch_save(state, tmp / STATE)
        manifest = {"step": state.get("loop", {}).get("step"), "files": {f: sha256(tmp / f) for f in (WEIGHTS, STATE)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for f in (WEIGHTS, STATE, MANIFEST):
            fsync_file(tmp / f)
        fsync_dir(tmp)
        final = root / name
        old = root / f".old-{name}-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(root)
        if old.exists():
            shutil.rmtree(old)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            raise write_failed(e, root / name, "the checkpoint") from e
        raise
    if keep_last:
        for stale in step_checkpoints(root)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    return root / name


def step_checkpoints(root: str | Path) -> list[Path]:
    """Step checkpoint folders, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify(folder: Path) -> str | None:
    """None if the checkpoint folder is complete and its checksums match, else the problem."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or WEIGHTS not in files or STATE not in files
            or not all(isinstance(d, str) and Path(f).name == f for f, d in files.items())):
        return f"{MANIFEST} is unreadable"
    for f, digest in files.items():
        try:
            if sha256(folder / f) != digest:
                return f"{f} does not match its checksum"
        except FileNotFoundError:
            return f"{f} is missing"
        except OSError:
            return f"{f} is unreadable"
    return None


def recover(root: str | Path) -> None:
    """Clean up after a save that was killed half-way (SIGKILL, power loss).

    ``save_checkpoint`` replaces an existing ``NAME`` by renaming it to ``.old-NAME-PID`` and
    then renaming the new folder into place. Killed between the two renames, ``NAME`` is gone
    and ``.old-NAME-PID`` holds it: rename it back. Killed later, both exist: drop the old one.
    ``.tmp-*`` folders are unfinished writes that never became checkpoints: remove them.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".old-"):
            name = path.name.removeprefix(".old-").rpartition("-")[0]
            if name and not (root / name).exists():
                os.rename(path, root / name)
            else:
                shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest step checkpoint that verifies; warns about each newer one that does not.

    Calls :func:`recover` first, so a save that was killed half-way is finished or cleared.
    """
    recover(root)
    for folder in reversed(step_checkpoints(root)):
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"{folder}: {problem}; falling back to the previous checkpoint", stacklevel=2)
    return None


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Load (weights, state) from a checkpoint folder, verifying it first."""
    folder = Path(folder)
    problem = verify(folder)
    if problem:
        raise ZerotuneError(f"checkpoint is damaged: {problem}", path=folder)
    weights = load_weights(folder / WEIGHTS, device)
    state = load_torch(folder / STATE, device)
    if not isinstance(state, dict):
        raise ZerotuneError(f"{STATE} holds a {type(state).__name__}, expected a mapping", path=folder)
    return weights, state
