"""``zerotune.predict``: a classifier's or regressor's predictions for new inputs, as CSV or JSONL.

What ``inputs`` may be (one or more):

    image files, a folder of images, a glob ("photos/*.png")   one row per file, id = the file
    a folder of class sub-folders (images:DIR)                 the same, with the true label
    FILE.csv / FILE.jsonl / FILE.npz, or any data spec          one row per example, id = its row
    FILE.txt (a text model)                                     one row per non-empty line, id = FILE:LINE

Each row has the id, the prediction and its probability (a classifier), the next ``top_k - 1``
classes with theirs, and the true label where the input has one (a label column, class
sub-folders, an ``.npz``'s y). Images are resized to the model's input size and converted to its
channels; every input is normalised as the run's training data was.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zerotune.data.base import spec_path
from zerotune.data.images import EXTENSIONS, image_tensor
from zerotune.data.sources import SOURCES, load_source
from zerotune.data.tabular import encode_texts
from zerotune.errors import ZerotuneError
from zerotune.evaluate.api import _run_config
from zerotune.files import check_output_file, read_text, write_text
from zerotune.load import LoadedRun, load_run, model_inputs
from zerotune.run import open_run

FORMATS = ("csv", "jsonl")


@dataclass
class Examples:
    """Inputs ready for the model, what names each row, and the true labels where known."""

    x: torch.Tensor  # normalised as the run's training data
    ids: list[str]
    labels: list[Any] | None = None  # class names, or target values in the data's units
    texts: list[str] | None = None


def predict(run: str | Path, input: str | Path | list[str | Path], output: str | Path | None = None,
            overwrite: bool = False, top_k: int = 1, format: str | None = None) -> Path:
    """Predict for every example of ``input``; write one row per example (CSV or JSONL).

    Args:
        input: image files, a folder, a glob, a .csv/.jsonl/.npz/.txt file or a data spec (see
            the module docstring); a list for several.
        output: the file to write (default ``RUN/predictions.csv``, or ``.jsonl``); it may not be
            one of the run's files or an input, and an existing one is replaced only with ``overwrite``.
        top_k: also list the next most probable classes (a classifier), up to the number of classes.
        format: ``csv`` or ``jsonl`` (default: from ``output``'s suffix, else csv).

    Example:
        >>> zerotune.predict("runs/digits_mlp", "new.csv", "preds.csv")   # -> Path("preds.csv")
        >>> zerotune.predict("runs/cnn", ["a.png", "b.png"], "p.jsonl", top_k=3)
    """
    source = open_run(run)
    items = [str(i) for i in (input if isinstance(input, (list, tuple)) else [input])]
    if not items:
        raise ZerotuneError("--input: give at least one file, folder, glob or data spec")
    if format is None:
        format = "jsonl" if output is not None and Path(output).suffix.lower() == ".jsonl" else "csv"
    if format not in FORMATS:
        raise ZerotuneError(f"--format: expected csv or jsonl, got {format!r}")
    output = Path(output) if output else source.root / f"predictions.{format}"
    files = expand(items)
    check_output_file(output, overwrite=overwrite, inputs=[*model_inputs(source), *files])
    loaded = load_run(run)
    classes = loaded.info.classes if loaded.info.target == "classification" else None
    if not isinstance(top_k, int) or top_k < 1 or top_k > max(1, len(classes or [])):
        limit = f"1 to {len(classes)}, the number of classes" if classes else "1 for a regressor"
        raise ZerotuneError(f"--top-k: expected {limit}, got {top_k}")
    examples = read_examples(loaded, items, files)
    with torch.no_grad():
        out = torch.cat([loaded.model(examples.x[i : i + 1024]).float() for i in range(0, len(examples.x), 1024)])
    rows = rows_of(loaded, examples, out, top_k)
    write_text(output, to_jsonl(rows) if format == "jsonl" else to_csv(rows))
    return output


def expand(items: list[str]) -> list[Path]:
    """The files and folders ``items`` name (globs expanded), for the output rule; specs by their path."""
    paths: list[Path] = []
    for item in items:
        if is_spec(item):
            paths += filter(None, [spec_path(item)])
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise ZerotuneError(f"--input {item!r}: the pattern matches no file")
            paths += map(Path, matches)
        else:
            paths.append(Path(item))
    return paths


def is_spec(item: str) -> bool:
    kind, sep, _ = item.partition(":")
    return bool(sep) and kind in SOURCES


def read_examples(loaded: LoadedRun, items: list[str], files: list[Path]) -> Examples:
    """What ``items`` hold, as the model's inputs (see the module docstring)."""
    for f in files:
        if not f.exists():
            raise ZerotuneError("file not found", path=f)
    images = [f for f in files if f.is_file() and f.suffix.lower() in EXTENSIONS]
    if images and len(images) == len(files):
        return image_examples(loaded, images)
    if len(items) == 1 and not is_spec(items[0]) and files[0].is_dir():
        return folder_examples(loaded, files[0])
    if len(items) != 1:
        raise ZerotuneError("--input: several inputs must all be image files (or one file, folder or data spec)")
    item = items[0]
    if item.startswith("images:"):  # rows named by their files, labelled by their folders
        return folder_examples(loaded, files[0])
    if not is_spec(item) and Path(item).suffix.lower() == ".txt":
        return text_examples(loaded, Path(item))
    return table_examples(loaded, item if is_spec(item) else spec_for(Path(item)))


def spec_for(path: Path) -> str:
    kinds = {".csv": "csv", ".npz": "arrays", ".jsonl": "jsonl"}
    if path.suffix.lower() not in kinds:
        raise ZerotuneError("expected image files, a folder, a .csv, .jsonl, .npz or .txt file, or a data spec "
                            "such as images:DIR", path=path)
    return f"{kinds[path.suffix.lower()]}:{path}"


def image_examples(loaded: LoadedRun, files: list[Path], labels: list[str] | None = None) -> Examples:
    info = loaded.info
    if info.kind != "image":
        raise ZerotuneError(f"--input: image files, but the model reads {info.kind} inputs")
    channels, height, width = info.input_shape
    x = image_tensor(files, (width, height), grey=channels == 1)
    return Examples(loaded.preprocess.x(x), [str(f) for f in files], labels)


def folder_examples(loaded: LoadedRun, folder: Path) -> Examples:
    """A folder of images (ids only) or of class sub-folders (with their names as true labels)."""
    direct = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if direct or not classes:
        if not direct:
            raise ZerotuneError(f"no images ({', '.join(sorted(EXTENSIONS))}) and no class sub-folders", path=folder)
        return image_examples(loaded, direct)
    files = [(p, d.name) for d in classes for p in sorted(d.iterdir())
             if p.is_file() and p.suffix.lower() in EXTENSIONS]
    if not files:
        raise ZerotuneError("no images in the class sub-folders", path=folder)
    return image_examples(loaded, [p for p, _ in files], [name for _, name in files])


def text_examples(loaded: LoadedRun, path: Path) -> Examples:
    info = loaded.info
    if info.kind != "tokens" or loaded.tokenizer is None:
        raise ZerotuneError("text lines need a text model (a run with a tokenizer)", path=path)
    lines = [(i, line.strip()) for i, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
    if not lines:
        raise ZerotuneError("no text lines", path=path)
    texts = [t for _, t in lines]
    x = encode_texts(loaded.tokenizer, texts, info.input_shape[0], info.pad_id)
    return Examples(x, [f"{path}:{i}" for i, _ in lines], texts=texts)


def table_examples(loaded: LoadedRun, spec: str) -> Examples:
    """A data spec's examples (the train pool and its test files), with labels when it has them."""
    data_cfg = _run_config(loaded).data
    labelled = _has_field(spec, data_cfg.label_column)
    if not labelled:
        data_cfg = data_cfg.model_copy(update={"label_column": None})
    src = load_source(spec, data_cfg)
    parts = [s for s in (src.train, src.test) if s is not None]
    x = torch.cat([s.x[:] for s in parts])
    if list(x.shape[1:]) != list(loaded.info.input_shape):
        raise ZerotuneError(f"{spec}: examples have shape {list(x.shape[1:])}, the model expects "
                            f"{loaded.info.input_shape}")
    labels = None
    if labelled:
        y = torch.cat([s.y for s in parts])
        if src.info.target == "classification":
            labels = [src.info.classes[i] for i in y.tolist()]
        else:
            labels = y.tolist()
    return Examples(loaded.preprocess.x(x), [str(i) for i in range(len(x))], labels)


def _has_field(spec: str, name: str | None) -> bool:
    """Whether a csv:/jsonl: file names ``name`` in its header (first line / first object)."""
    kind, _, path = spec.partition(":")
    if kind not in ("csv", "jsonl") or name is None or not Path(path).is_file():
        return True
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        first = f.readline()
    if kind == "csv":
        return name in next(csv.reader([first]), [])
    try:
        return name in json.loads(first)
    except (json.JSONDecodeError, TypeError):
        return True  # let the loader report the problem


def rows_of(loaded: LoadedRun, examples: Examples, out: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
    """One dict per example: id, (text), prediction, probability, the top k, (label)."""
    rows = []
    classes = loaded.info.classes
    if loaded.info.target == "classification":
        prob, idx = out.softmax(-1).topk(top_k, dim=-1)
        for i, (p, c) in enumerate(zip(prob.tolist(), idx.tolist(), strict=True)):
            row: dict[str, Any] = {"id": examples.ids[i], "prediction": classes[c[0]], "probability": round(p[0], 6)}
            if top_k > 1:
                row["top_k"] = [[classes[j], round(q, 6)] for j, q in zip(c, p, strict=True)]
            rows.append(row)
    else:
        values = loaded.preprocess.y_inverse(out.reshape(-1)).tolist()
        rows = [{"id": examples.ids[i], "prediction": float(f"{v:.6g}")} for i, v in enumerate(values)]
    for i, row in enumerate(rows):
        if examples.texts is not None:
            row["text"] = examples.texts[i]
        if examples.labels is not None:
            row["label"] = examples.labels[i]
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Flat columns: a top-k list becomes prediction_2, probability_2, ... prediction_k, probability_k."""
    flat = []
    for row in rows:
        top = row.pop("top_k", None)
        extra = {}
        for rank, (label, p) in enumerate((top or [])[1:], 2):
            extra |= {f"prediction_{rank}": label, f"probability_{rank}": p}
        head = {k: row[k] for k in ("id", "prediction", "probability") if k in row}
        flat.append(head | extra | {k: v for k, v in row.items() if k not in head})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flat[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def to_jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
