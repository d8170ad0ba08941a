"""Text classification end to end: a CSV of texts → word vocabulary → RNN → evaluate → predict."""

import csv
import json
import random

from zerotune.evaluate.api import evaluate
from zerotune.evaluate.predict import predict
from zerotune.train.api import train

POS = ["great", "lovely", "excellent", "superb", "wonderful"]
NEG = ["awful", "terrible", "dreadful", "poor", "horrible"]
FILLER = ["the", "film", "was", "really", "quite", "a", "story", "and", "plot"]


def write_reviews(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            words = rng.choices(FILLER, k=6) + [rng.choice(POS if label == "pos" else NEG)]
            rng.shuffle(words)
            w.writerow([" ".join(words), label])


def test_rnn_learns_a_text_csv_and_predicts_with_its_own_vocabulary(tmp_path):
    write_reviews(tmp_path / "train.csv", 400, 0)
    write_reviews(tmp_path / "test.csv", 100, 1)
    cfg = {
        "data": {"train": f"csv:{tmp_path / 'train.csv'}", "test": f"csv:{tmp_path / 'test.csv'}",
                 "max_length": 12, "val_split": 0.1},
        "model": {"arch": "rnn", "cell": "gru", "hidden": 32, "embed_dim": 16, "pooling": "mean"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 8, "batch_size": 32, "progress": False},
    }
    run = train(cfg, out=tmp_path / "run", log=lambda *a: None)
    assert (run / "tokenizer.json").exists()
    assert evaluate(run)["accuracy"] > 0.95
    with open(tmp_path / "new.csv", "w") as f:
        f.write("text\nthe film was superb\nthe plot was dreadful\n")
    rows = (predict(run, str(tmp_path / "new.csv"))).read_text().splitlines()
    assert rows[0] == "id,prediction,probability" and [r.split(",")[1] for r in rows[1:]] == ["pos", "neg"]
    # a text file is one example per non-empty line, named FILE:LINE, the text beside its prediction
    (tmp_path / "notes.txt").write_text("the film was superb\n\nthe plot was dreadful\n")
    out = predict(run, str(tmp_path / "notes.txt"), tmp_path / "notes.jsonl", top_k=2)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(g["id"], g["prediction"], g["text"]) for g in got] == [
        (f"{tmp_path / 'notes.txt'}:1", "pos", "the film was superb"),
        (f"{tmp_path / 'notes.txt'}:3", "neg", "the plot was dreadful")]
    assert all(g["top_k"][0] == [g["prediction"], g["probability"]] and len(g["top_k"]) == 2 for g in got)
    # a labelled file: its labels come back beside the predictions
    labelled = list(csv.DictReader(open(predict(run, str(tmp_path / "test.csv"), tmp_path / "t.csv"))))
    assert len(labelled) == 100 and sum(r["label"] == r["prediction"] for r in labelled) >= 95


def test_evaluate_on_another_text_file_uses_the_runs_vocabulary(tmp_path):
    write_reviews(tmp_path / "train.csv", 400, 0)
    write_reviews(tmp_path / "other.csv", 100, 2)
    cfg = {
        "data": {"train": f"csv:{tmp_path / 'train.csv'}", "max_length": 12, "val_split": 0.1, "test_split": 0.1},
        "model": {"arch": "rnn", "cell": "gru", "hidden": 32, "embed_dim": 16, "pooling": "mean"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 8, "batch_size": 32, "progress": False},
    }
    run = train(cfg, out=tmp_path / "run", log=lambda *a: None)
    assert evaluate(run, data=f"csv:{tmp_path / 'other.csv'}")["accuracy"] > 0.95
