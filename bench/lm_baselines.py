"""Count-based baselines for a language model: unigram and bigram perplexity on the val split of
a shard folder, with the statistics taken from its train split only.

    python bench/lm_baselines.py runs/pydoc-shards [--json out.json]

    unigram  p(w)       = (c(w) + 1) / (N + V)                         (add-one)
    bigram   p(w | u)   = λ c(u, w) / c(u) + (1 − λ) p_unigram(w)       (Jelinek-Mercer; 1 − λ alone
                                                                        where u was never seen)

λ is chosen on the last 10 % of the train tokens, with the counts of the first 90 %; the final
counts then use all of train. Perplexity is exp of the mean negative log-likelihood over every val
token after the first (document ends, the eos tokens, are tokens like any other), the tokens a
language model's ``zerotune evaluate`` scores.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from zerotune.data.shards import ShardDataset


def unigram(train: np.ndarray, vocab: int) -> np.ndarray:
    return (np.bincount(train, minlength=vocab) + 1.0) / (len(train) + vocab)


def bigram_nll(train: np.ndarray, held: np.ndarray, vocab: int, lam: float) -> float:
    """Mean −log p(w | u) over consecutive pairs of ``held``, counts from ``train``."""
    uni = unigram(train, vocab)
    pair = train[:-1].astype(np.int64) * vocab + train[1:]
    keys, counts = np.unique(pair, return_counts=True)
    context = np.bincount(train[:-1], minlength=vocab).astype(np.float64)
    u, w = held[:-1].astype(np.int64), held[1:].astype(np.int64)
    where = np.searchsorted(keys, u * vocab + w)
    where = np.minimum(where, len(keys) - 1)
    c_uw = np.where(keys[where] == u * vocab + w, counts[where], 0).astype(np.float64)
    c_u = context[u]
    ml = np.divide(c_uw, c_u, out=np.zeros_like(c_uw), where=c_u > 0)
    p = np.where(c_u > 0, lam * ml + (1 - lam) * uni[w], uni[w])
    return float(-np.log(p).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards", help="a shard folder made by zerotune prepare")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    train_ds, val_ds = ShardDataset(args.shards, "train"), ShardDataset(args.shards, "val")
    vocab = train_ds.vocab_size
    train, val = train_ds.tokens().astype(np.int64), val_ds.tokens().astype(np.int64)
    cut = int(0.9 * len(train))
    lam = min((0.05 * k for k in range(1, 20)), key=lambda x: bigram_nll(train[:cut], train[cut:], vocab, x))
    uni = unigram(train, vocab)
    results = {
        "shards": args.shards, "vocab_size": vocab, "train_tokens": len(train), "val_tokens": len(val),
        "val_documents": val_ds.n_documents, "uniform_perplexity": float(vocab),
        "unigram_perplexity": math.exp(float(-np.log(uni[val[1:]]).mean())),
        "bigram_lambda": round(lam, 2),
        "bigram_perplexity": math.exp(bigram_nll(train, val, vocab, lam)),
    }
    for k, v in results.items():
        print(f"{k:>20}  {v:,.2f}" if isinstance(v, float) else f"{k:>20}  {v:,}" if isinstance(v, int) else
              f"{k:>20}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
