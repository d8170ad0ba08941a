"""Token shards for language-model pretraining: one pass over a corpus, then memory-mapped reads.

:func:`prepare` streams the documents of a text spec once:

1. with ``split_chars``, documents longer than that are cut into pieces that end at paragraph
   breaks (:func:`zerotune.data.text.split_document`), each a document from here on, so a corpus
   of one or a few long documents still has many to hold out for validation;
   then Unicode NFC normalisation and length filters (``min_chars`` ≤ len ≤ ``max_chars``);
2. exact duplicates dropped by content hash (BLAKE2b, 128 bits; the only state that grows with
   the corpus is this set of hashes, about 100 bytes per document);
3. each document goes to ``val`` when ``h(seed, text) / 2**64 < val_fraction``, else to ``train``:
   the split depends on the document's content alone, never on its position in the corpus.
   When that leaves val empty, the last train document moves to val (given two or more);
4. batches of ``batch_docs`` documents are encoded in parallel by ``Tokenizer.encode_batch``
   with ``<|eos|>`` appended after every document, and appended to raw little-endian shard
   files ``{split}_{k:06d}.bin`` of exactly ``shard_tokens`` tokens (the last one shorter),
   ``uint16`` when every id fits, else ``uint32``;
5. ``index.json`` (written last, atomically) records dtype, vocab size, eos id, the shards with
   their token and document counts, and the counts of read/kept/duplicate/too-short/too-long
   documents. ``tokenizer.json`` is copied beside it.

The same input, tokenizer and arguments always give byte-identical files.

:class:`ShardDataset` memory-maps a split and cuts training windows ``x = t[i : i+T]``,
``y = t[i+1 : i+T+1]``. A batch is a pure function of ``(seed, step)``, so a resumed run
draws exactly the batches it would have drawn without stopping: no iterator state to save.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from zerotune.data.base import spec_path
from zerotune.data.text import iter_documents, split_document
from zerotune.data.tokenizer import load_tokenizer, save_tokenizer, special_ids, tokenizer_file
from zerotune.errors import ZerotuneError
from zerotune.files import check_output, copy_file, fsync_file, read_json_object, staged_folder, write_json

FORMAT = "zerotune-shards"
VERSION = 1
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class _ShardWriter:
    """Appends one split's tokens to consecutive shard files of exactly ``shard_tokens`` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: type, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens", "documents"}
        self._file = None

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` their concatenation, ``lengths`` each one's token count."""
        ends = np.cumsum(lengths)  # a document counts in the shard that holds its last token
        done = 0
        while done < len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            shard = self.shards[-1]
            take = min(self.shard_tokens - shard["tokens"], len(tokens) - done)
            self._file.write(tokens[done : done + take].tobytes())
            shard["tokens"] += take
            shard["documents"] += int(np.count_nonzero((ends > done) & (ends <= done + take)))
            done += take

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._file = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0, "documents": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def pop_last(self, n_tokens: int) -> None:
        """Remove the last document (``n_tokens`` long) from the end of the split's files."""
        self.close()
        self.shards[-1]["documents"] -= 1
        while n_tokens > 0:
            shard = self.shards[-1]
            cut = min(n_tokens, shard["tokens"])
            shard["tokens"] -= cut
            n_tokens -= cut
            path = self.out_dir / shard["file"]
            if shard["tokens"] == 0:
                path.unlink()
                self.shards.pop()
            else:
                os.truncate(path, shard["tokens"] * np.dtype(self.dtype).itemsize)

    def summary(self) -> dict:
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }


def _encoding_copy(tok: Tokenizer) -> Tokenizer:
    """A copy of ``tok`` that encodes raw corpus text: no truncation, padding or special-token parsing."""
    enc = Tokenizer.from_str(tok.to_str())
    enc.no_truncation()  # Hugging Face tokenizer.json files often carry a model's max length
    enc.no_padding()
    enc.encode_special_tokens = True  # literal "<|endoftext|>" in a document stays text
    return enc


def prepare(
    input_spec: str,
    tokenizer: str | Path | Tokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    min_chars: int = 1,
    max_chars: int | None = None,
    split_chars: int | None = None,
    batch_docs: int = 256,
    shard_tokens: int = 50_000_000,
    progress: bool = True,
    text_field: str = "text",
    overwrite: bool = False,
) -> dict:
    """Tokenize a corpus into train/val token shards (see the module docstring).

    Args:
        input_spec: a text spec (``text:DIR``, ``jsonl:FILE``, ``builtin:stdlib`` ...).
        tokenizer: a ``tokenizer.json``, the folder holding one, or a loaded ``Tokenizer``.
        out_dir: the shard folder (created if needed).
        val_fraction: expected fraction of documents held out for validation.
        seed: salts the train/val assignment.
        min_chars: documents shorter than this (after NFC) are dropped.
        max_chars: documents longer than this are dropped (None: no limit).
        split_chars: cut documents longer than this into pieces of at most this many characters,
            ending at paragraph breaks (None: keep documents whole); applied before the filters.
        batch_docs: documents encoded per ``encode_batch`` call.
        shard_tokens: tokens per shard file.
        progress: show a progress bar (bytes of text, MB/s) on stderr.
        text_field: the text field of ``jsonl`` records.
        overwrite: replace a finished shard folder.

    Returns:
        The counts: ``read`` (documents, or pieces with ``split_chars``), ``kept``, ``duplicate``,
        ``too_short``, ``too_long`` documents,
        ``bytes`` of kept text, and ``{split}_documents`` / ``{split}_tokens`` for train and val.

    Raises:
        ZerotuneError: bad arguments, tokenizer or corpus; an existing shard folder.

    Example:
        >>> zerotune.prepare("builtin:pydoc", "runs/tok", "runs/pydoc-shards", split_chars=1000, val_fraction=0.1)
    """
    if not 0 <= val_fraction < 1:
        raise ZerotuneError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_chars < 0 or (max_chars is not None and max_chars < max(min_chars, 1)):
        raise ZerotuneError(
            f"need 0 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}"
        )
    if split_chars is not None and not 1 <= split_chars <= 2**31:
        raise ZerotuneError(f"split_chars must be a whole number from 1 to 2**31, got {split_chars}")
    if not 0 <= seed < 2**32:
        raise ZerotuneError(f"seed must be a whole number in [0, 2**32), got {seed}")
    if batch_docs < 1 or shard_tokens < 1:
        raise ZerotuneError(f"batch_docs and shard_tokens must be positive, got {batch_docs}, {shard_tokens}")
    if isinstance(tokenizer, Tokenizer):
        tok, tok_source = tokenizer, None
    else:
        tok_source = tokenizer_file(tokenizer)
        tok = load_tokenizer(tok_source)
    eos_id = special_ids(tok)["eos"]
    if eos_id is None:
        raise ZerotuneError(
            "the tokenizer has no end-of-text token (<|eos|>, </s>, <|endoftext|> ...)", path=tok_source
        )
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    dtype_name = "uint16" if vocab_size <= 2**16 else "uint32"
    dtype = DTYPES[dtype_name]
    documents = iter_documents(input_spec, text_field)
    if split_chars is not None:
        documents = (piece for doc in documents for piece in split_document(doc, split_chars))

    out_dir = Path(out_dir)
    inputs = [p for p in (spec_path(input_spec), tok_source) if p is not None]
    check_output(out_dir, overwrite=overwrite, inputs=inputs, kind="shard folder", recognise=is_shard_folder)
    with staged_folder(out_dir) as folder:  # written beside out_dir, put in place when complete
        if tok_source is None:
            save_tokenizer(tok, folder / "tokenizer.json")
        else:
            copy_file(tok_source, folder / "tokenizer.json")

        enc = _encoding_copy(tok)
        encode = getattr(enc, "encode_batch_fast", enc.encode_batch)  # same ids, skips char offsets
        writers = {s: _ShardWriter(folder, s, dtype, shard_tokens) for s in SPLITS}
        counts = {"read": 0, "kept": 0, "duplicate": 0, "too_short": 0, "too_long": 0, "bytes": 0}
        seen: set[bytes] = set()
        salt = seed.to_bytes(16, "little", signed=True)
        threshold = int(val_fraction * 2**64)
        last_train: np.ndarray | None = None  # kept to move into val if val ends up empty
        bar = tqdm(
            desc="prepare", unit="B", unit_scale=True, file=sys.stderr, disable=not progress, mininterval=0.5
        )

        def flush(batch: list[str], to_val: list[bool]) -> None:
            nonlocal last_train
            seqs = [e.ids for e in encode(batch, add_special_tokens=False)]
            for split, want_val in (("train", False), ("val", True)):
                chosen = [s for s, v in zip(seqs, to_val, strict=True) if v == want_val]
                if not chosen:
                    continue
                lengths = np.array([len(s) + 1 for s in chosen], dtype=np.int64)
                for s in chosen:
                    s.append(eos_id)
                tokens = np.fromiter(itertools.chain.from_iterable(chosen), dtype=dtype, count=int(lengths.sum()))
                writers[split].write(tokens, lengths)
                if split == "train":
                    last_train = tokens[-int(lengths[-1]) :]

        batch: list[str] = []
        to_val: list[bool] = []
        batch_bytes = 0
        try:
            for doc in documents:
                counts["read"] += 1
                text = unicodedata.normalize("NFC", doc)
                if len(text) < min_chars:
                    counts["too_short"] += 1
                    continue
                if max_chars is not None and len(text) > max_chars:
                    counts["too_long"] += 1
                    continue
                data = text.encode("utf-8")
                digest = hashlib.blake2b(data, digest_size=16).digest()
                if digest in seen:
                    counts["duplicate"] += 1
                    continue
                seen.add(digest)
                counts["kept"] += 1
                counts["bytes"] += len(data)
                score = int.from_bytes(hashlib.blake2b(salt + digest, digest_size=8).digest(), "little")
                batch.append(text)
                to_val.append(score < threshold)
                batch_bytes += len(data)
                if len(batch) == batch_docs:
                    flush(batch, to_val)
                    bar.update(batch_bytes)
                    bar.set_postfix(docs=counts["kept"], refresh=False)
                    batch, to_val, batch_bytes = [], [], 0
            if batch:
                flush(batch, to_val)
                bar.update(batch_bytes)
        finally:
            bar.close()
            for w in writers.values():
                w.close()

        train, val = writers["train"], writers["val"]
        if val_fraction > 0 and not val.shards and len(train.shards) and train.summary()["documents"] >= 2:
            train.pop_last(len(last_train))
            val.write(last_train, np.array([len(last_train)]))
            val.close()
        splits = {s: w.summary() for s, w in writers.items()}
        counts.update({f"{s}_{k}": splits[s][k] for s in SPLITS for k in ("documents", "tokens")})
        index = {
            "format": FORMAT,
            "version": VERSION,
            "input": input_spec,
            "dtype": dtype_name,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "tokenizer": "tokenizer.json",
            "seed": seed,
            "val_fraction": val_fraction,
            "split_chars": split_chars,
            "counts": {k: counts[k] for k in ("read", "kept", "duplicate", "too_short", "too_long", "bytes")},
            "splits": splits,
        }
        for split in splits.values():  # the index (written last) says the shards are complete: they must be
            for shard in split["shards"]:
                fsync_file(folder / shard["file"])
        write_json(folder / "index.json", index, indent=2)
    return counts


def is_shard_folder(folder: Path) -> bool:
    """A folder prepare wrote (its index.json says so, or it holds nothing but shard files), which
    --overwrite may replace."""
    index = folder / "index.json"
    if index.is_file():
        try:
            return read_json_object(index).get("format") == FORMAT
        except ZerotuneError:
            return False
    names = [p.name for p in folder.iterdir()]
    return all(n == "tokenizer.json" or (n.startswith(("train_", "val_")) and n.endswith(".bin")) for n in names)


class ShardDataset:
    """One split of a prepared shard folder, memory-mapped, cut into (x, y) training windows.

    Attributes:
        n_tokens: tokens in the split (all shards together).
        n_documents: documents in the split.
        vocab_size: one more than the largest token id of the tokenizer.
        eos_id: the end-of-document token id.
        tokenizer_path: the folder's ``tokenizer.json`` (None if it is missing).

    Raises:
        ZerotuneError: missing folder, missing or malformed ``index.json``, unknown split,
            missing shard file or one whose size disagrees with the index (truncated).
    """

    def __init__(self, dir: str | Path, split: str = "train") -> None:
        self.dir = Path(dir)
        self.split = split
        index_path = self.dir / "index.json"
        if not self.dir.is_dir():
            raise ZerotuneError("shard folder not found", path=self.dir)
        if not index_path.is_file():
            raise ZerotuneError("not found: not a prepared shard folder", path=index_path)
        index = read_json_object(index_path)
        self.index = index
        if index.get("format") != FORMAT:
            raise ZerotuneError(f'not a shard index (expected "format": "{FORMAT}")', path=index_path)
        for key in ("vocab_size", "eos_id"):
            if not isinstance(index.get(key), int) or isinstance(index.get(key), bool):
                raise ZerotuneError(
                    f"field {key!r} must be an integer, got {index.get(key)!r}", path=index_path
                )
        if index.get("dtype") not in DTYPES:
            raise ZerotuneError(
                f"field 'dtype' must be one of {', '.join(DTYPES)}, got {index.get('dtype')!r}",
                path=index_path,
            )
        capacity = np.iinfo(DTYPES[index["dtype"]]).max + 1
        if not 0 < index["vocab_size"] <= capacity or not 0 <= index["eos_id"] < index["vocab_size"]:
            raise ZerotuneError(f"impossible values: vocab_size {index['vocab_size']} (1 to {capacity} for "
                                f"{index['dtype']}), eos_id {index['eos_id']} (below vocab_size)", path=index_path)
        splits = index.get("splits")
        if not isinstance(splits, dict):
            raise ZerotuneError("field 'splits' must be an object", path=index_path)
        if split not in splits:
            raise ZerotuneError(f"no split {split!r} (have {', '.join(splits) or 'none'})", path=index_path)
        self.dtype = np.dtype(DTYPES[index["dtype"]])
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        tokenizer_path = self.dir / "tokenizer.json"
        self.tokenizer_path: Path | None = tokenizer_path if tokenizer_path.is_file() else None

        shards = splits[split].get("shards") if isinstance(splits[split], dict) else None
        if not isinstance(shards, list):
            raise ZerotuneError(f"field 'splits.{split}.shards' must be a list", path=index_path)
        self._maps: list[np.memmap] = []
        self.n_documents = 0
        for i, shard in enumerate(shards):
            where = f"splits.{split}.shards[{i}]"
            if not isinstance(shard, dict):
                raise ZerotuneError(f"field {where!r} must be an object", path=index_path)
            name, n, docs = shard.get("file"), shard.get("tokens"), shard.get("documents", 0)
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise ZerotuneError(
                    f"field '{where}.file' must be a file name, got {name!r}", path=index_path
                )
            if not isinstance(n, int) or n < 1 or not isinstance(docs, int):
                raise ZerotuneError(
                    f"field '{where}.tokens' must be a positive integer, got {n!r}", path=index_path
                )
            path = self.dir / name
            if not path.is_file():
                raise ZerotuneError(f"shard file missing (listed in {index_path.name})", path=path)
            size, want = path.stat().st_size, n * self.dtype.itemsize
            if size != want:
                raise ZerotuneError(
                    f"shard has {size} bytes but {index_path.name} says {n} {index['dtype']} tokens "
                    f"({want} bytes): truncated or overwritten",
                    path=path,
                )
            self._maps.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)))
            self.n_documents += docs
        lengths = np.array([len(m) for m in self._maps], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # shard k holds [starts[k], starts[k+1])
        self.n_tokens = int(self._starts[-1])

    def __repr__(self) -> str:
        return f"ShardDataset({str(self.dir)!r}, split={self.split!r}, n_tokens={self.n_tokens})"

    def tokens(self) -> np.ndarray:
        """The whole split, shard after shard, as one array (read into memory)."""
        return np.concatenate([np.asarray(m) for m in self._maps]) if self._maps else np.zeros(0, self.dtype)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        """Tokens at global positions ``index`` (any shape), read across shard boundaries."""
        if len(self._maps) == 1:
            return np.asarray(self._maps[0][index])
        out = np.empty(index.shape, dtype=self.dtype)
        shard = np.searchsorted(self._starts, index, side="right") - 1
        for k in np.unique(shard):  # one vectorised read per shard touched, never one per row
            mask = shard == k
            out[mask] = self._maps[k][index[mask] - self._starts[k]]
        return out

    def _windows(self, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = starts[:, None] + np.arange(block_size + 1)  # (B, T+1)
        raw = self._gather(index)
        if raw.size and int(raw.max()) >= self.vocab_size:  # one comparison per batch: the files were changed
            raise ZerotuneError(f"the {self.split} shards hold token id {int(raw.max())}, outside the vocabulary of "
                                f"{self.vocab_size} that index.json gives", path=self.dir)
        tokens = torch.from_numpy(raw.astype(np.int64))  # (B, T+1)
        return tokens[:, :-1], tokens[:, 1:]  # x (B, T), y (B, T)

    def _n_windows(self, block_size: int) -> int:
        if block_size < 1:
            raise ZerotuneError(f"block_size must be positive, got {block_size}")
        if self.n_tokens < block_size + 1:
            raise ZerotuneError(
                f"the {self.split} split has {self.n_tokens} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; use a smaller block_size or more data",
                path=self.dir,
            )
        return (self.n_tokens - 1) // block_size

    def batch(
        self,
        step: int,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        mode: str = "random",
        *,
        rows: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch for one step: ``x`` (B, T) token ids and ``y`` = x shifted by one.

        Args:
            step: the optimizer step (any int ≥ 0); with ``seed`` it fixes the batch.
            batch_size: rows B.
            block_size: tokens per row T.
            seed: the run's data seed.
            mode: ``random`` (windows at uniformly drawn offsets) or ``sequential``
                (consecutive non-overlapping windows, wrapping around at the end).
            rows: only these rows of the batch are read (the window offsets of all B are drawn);
                several processes each read their share of the same batch this way.

        Returns:
            ``(x, y)`` LongTensors of shape (B, T), B the number of rows read.
        """
        if batch_size < 1:
            raise ZerotuneError(f"batch_size must be positive, got {batch_size}")
        n_windows = self._n_windows(block_size)
        if mode == "random":
            rng = np.random.default_rng([seed, step, 0])  # (the 0 keeps the windows that saved runs were trained on)
            starts = rng.integers(0, self.n_tokens - block_size, size=batch_size)  # last start n - T - 1
        elif mode == "sequential":
            first = step * batch_size
            starts = (np.arange(first, first + batch_size) % n_windows) * block_size
        else:
            raise ZerotuneError(f"unknown batch mode {mode!r}; choose random or sequential")
        return self._windows(starts[rows], block_size)

    def eval_batches(
        self,
        batch_size: int,
        block_size: int,
        max_batches: int | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows of the split, in order, as (x, y) batches (B, T).

        Every window ``[k*T, k*T + T + 1)`` is visited once; the last batch may be smaller.
        With ``world_size`` > 1, rank r takes batches r, r + world_size, ...
        """
        n_batches = self.n_eval_batches(batch_size, block_size, max_batches)
        n_windows = self._n_windows(block_size)
        for b in range(rank, n_batches, world_size):
            ids = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows))
            yield self._windows(ids * block_size, block_size)

    def n_eval_batches(self, batch_size: int, block_size: int, max_batches: int | None = None) -> int:
        """How many batches :meth:`eval_batches` yields with one process."""
        if batch_size < 1:
            raise ZerotuneError(f"batch_size must be positive, got {batch_size}")
        n_batches = -(-self._n_windows(block_size) // batch_size)
        return n_batches if max_batches is None else min(n_batches, max_batches)
