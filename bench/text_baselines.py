"""Classic baselines for a text classification recipe, on the exact train/val/test split zerotune uses.

    python bench/text_baselines.py configs/minilm_classify.yaml [--json [out.json]]

    majority        always the most frequent train label
    tfidf word      TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2)) + LogisticRegression
    tfidf word+char the same word features next to TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5),
                    sublinear_tf=True) (concatenated) + LogisticRegression

The split: the raw texts are the rows the config's ``data.train`` loads (a builtin text set, a CSV
or a JSONL file), in the same order; the test and val indices come from
``zerotune.data.splits.split_off`` with the config's seed, fractions and stratification, the code
``load_data`` runs. The script then rebuilds the splits with ``load_data`` itself, as ``zerotune
evaluate`` does, and checks that its train, val and test examples are those rows (same token ids,
same labels), so the baselines and a fine-tuned run are scored on the same held-out examples.

LogisticRegression (lbfgs, multinomial) is fitted on the train split only; C is chosen from
{0.3, 1, 3, 10, 30, 100} by val accuracy (ties: the smaller C), and the model fitted with that C
is scored once on test. Accuracy and macro-F1 (unweighted mean of the per-class F1, as zerotune's
``f1``). ``--json`` prints the results as JSON after the table; ``--json FILE`` writes them there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the zerotune of this checkout, not an installed one

from zerotune.config import load_config  # noqa: E402
from zerotune.data.base import Split  # noqa: E402
from zerotune.data.builtin import TEXT_SETS, docstring_texts  # noqa: E402
from zerotune.data.sources import load_source  # noqa: E402
from zerotune.data.splits import load_data, split_off  # noqa: E402
from zerotune.data.tabular import read_csv, read_jsonl  # noqa: E402

C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def raw_rows(cfg) -> tuple[list[str], list[str] | None]:
    """The texts of ``data.train``, one per example, in the order its source loads them, and (for a
    builtin set) their labels."""
    kind, _, arg = cfg.data.train.partition(":")
    if kind == "builtin" and arg in TEXT_SETS:
        pairs = docstring_texts(TEXT_SETS[arg])
        return [text for text, _ in pairs], [label for _, label in pairs]
    if kind in ("csv", "jsonl"):
        header, rows, _ = (read_csv if kind == "csv" else read_jsonl)(Path(arg))
        return [row[header.index(cfg.data.text_column)] for row in rows], None
    raise SystemExit(f"data.train {cfg.data.train!r}: expected a builtin text set ({', '.join(TEXT_SETS)}), "
                     "csv:FILE or jsonl:FILE")


def split_indices(cfg) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Train/val/test row indices of ``data.train`` as ``load_data`` draws them, the labels and class names."""
    if cfg.task != "classification":
        raise SystemExit(f"task {cfg.task!r}: the baselines are classifiers (task: classification)")
    if cfg.data.test or cfg.data.val or cfg.data.classes:
        raise SystemExit("data.test, data.val and data.classes are not supported here: one data.train set only")
    source = load_source(cfg.data.train, cfg.data)
    labels = source.train.y
    rows = Split(torch.arange(len(labels)), labels)  # x: the row numbers, split like the examples
    pool, test = split_off(rows, cfg.data.test_split, cfg.seed, stratify=True)
    pool, val = split_off(pool, cfg.data.val_split, cfg.seed + 1, stratify=True)
    if test is None or val is None:
        raise SystemExit("the config needs data.test_split > 0 and data.val_split > 0")
    index = {"train": pool.x.numpy(), "val": val.x.numpy(), "test": test.x.numpy()}
    data = load_data(cfg.data, cfg.task, cfg.seed)  # the splits training and evaluate build
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        same = torch.equal(split.x, source.train.x[index[name]]) and torch.equal(split.y, labels[index[name]])
        if not same:
            raise SystemExit(f"the {name} split load_data builds is not the rows split here")
    return index, labels.numpy(), list(source.info.classes)


def features(kind: str, train: list[str], *others: list[str]):
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizers = [TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2))]
    if kind == "word+char":
        vectorizers.append(TfidfVectorizer(sublinear_tf=True, analyzer="char_wb", ngram_range=(2, 5)))
    fitted = [hstack([v.fit_transform(train) for v in vectorizers]).tocsr()]
    return fitted + [hstack([v.transform(t) for v in vectorizers]).tocsr() for t in others]


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y, pred)), "f1": float(f1_score(y, pred, average="macro"))}


def tfidf_lr(kind: str, texts: dict[str, list[str]], y: dict[str, np.ndarray]) -> dict:
    """Fit on train, choose C on val, score on test."""
    from sklearn.linear_model import LogisticRegression

    x_train, x_val, x_test = features(kind, texts["train"], texts["val"], texts["test"])
    fitted = {c: LogisticRegression(C=c, max_iter=5000).fit(x_train, y["train"]) for c in C_GRID}
    val_acc = {c: scores(y["val"], m.predict(x_val))["accuracy"] for c, m in fitted.items()}
    best = max(C_GRID, key=lambda c: (val_acc[c], -c))  # ties: the smaller C
    return {"C": best, "val_accuracy": val_acc[best], "features": x_train.shape[1],
            "test": scores(y["test"], fitted[best].predict(x_test))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a classification recipe with a text data.train (e.g. configs/minilm_classify.yaml)")
    ap.add_argument("--json", nargs="?", const="-", help="also write the results here (no file: print them)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    index, labels, classes = split_indices(cfg)
    all_texts, names = raw_rows(cfg)
    if len(all_texts) != len(labels) or names not in (None, [classes[i] for i in labels]):
        raise SystemExit(f"the raw rows ({len(names)}) are not the {len(labels)} examples data.train loads")
    texts = {k: [all_texts[i] for i in v] for k, v in index.items()}
    y = {k: labels[v] for k, v in index.items()}
    majority = np.bincount(y["train"]).argmax()
    results = {
        "config": args.config, "data": cfg.data.train, "seed": cfg.seed, "classes": len(classes),
        "n": {k: len(v) for k, v in index.items()},
        "majority": {"label": classes[majority], "val_accuracy": float(np.mean(y["val"] == majority)),
                     "test": scores(y["test"], np.full_like(y["test"], majority))},
        "tfidf_word_lr": tfidf_lr("word", texts, y),
        "tfidf_word_char_lr": tfidf_lr("word+char", texts, y),
    }
    n = results["n"]
    print(f"{cfg.data.train}: {len(classes)} classes, train {n['train']:,}, val {n['val']:,}, test {n['test']:,} "
          f"(seed {cfg.seed})\n")
    print("| baseline | C (by val) | val accuracy | test accuracy | test macro-F1 |")
    print("|---|---:|---:|---:|---:|")
    for name, key in (("majority class", "majority"), ("TF-IDF word 1-2 + LR", "tfidf_word_lr"),
                      ("TF-IDF word 1-2 + char 2-5 + LR", "tfidf_word_char_lr")):
        r = results[key]
        c = f"{r['C']:g}" if "C" in r else "–"
        print(f"| {name} | {c} | {r['val_accuracy']:.3f} | {r['test']['accuracy']:.3f} | {r['test']['f1']:.3f} |")
    if args.json == "-":
        print(json.dumps(results, indent=1))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
