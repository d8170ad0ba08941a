import json

import pytest
import torch

from tests.conftest import tiny_config
from zerotune import files
from zerotune.train import checkpoint as ckpt
from zerotune.train.api import train
from zerotune.train.tasks import SupervisedTask


def final_weights(run):
    return files.load_weights(run / "model.safetensors")


def steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_run_folder_is_complete(tmp_path):
    run = train(tiny_config(epochs=3), out=tmp_path / "r", log=lambda *a: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert {"step", "epoch", "loss", "lr", "samples_per_sec"} <= set(rows[0])
    for name in ("config.yaml", "model.safetensors", "model.json", "report.md", "plots/loss.png"):
        assert (run / name).exists(), name
    assert json.loads((run / "model.json").read_text())["finished"] is True


def test_same_seed_same_weights(tmp_path):
    a = train(tiny_config(), out=tmp_path / "a", log=lambda *a: None)
    b = train(tiny_config(), out=tmp_path / "b", log=lambda *a: None)
    for k, v in final_weights(a).items():
        assert torch.equal(v, final_weights(b)[k])


def test_resume_after_interruption_is_bit_identical(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=3, checkpoint_every=7)
    cfg["model"]["dropout"] = 0.2  # dropout draws from the RNG that checkpoints must restore
    full = train(cfg, out=tmp_path / "full", log=lambda *a: None)

    real_batch = SupervisedTask.batch

    def crash_at_23(self, step):
        if step == 23:
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(SupervisedTask, "batch", crash_at_23)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "cut", log=lambda *a: None)
    monkeypatch.setattr(SupervisedTask, "batch", real_batch)
    assert ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-000021"
    cut = train(resume=tmp_path / "cut", log=lambda *a: None)
    for k, v in final_weights(full).items():
        assert torch.equal(v, final_weights(cut)[k]), k
    assert steps(cut) == steps(full)
    lines_full = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lines_cut = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in lines_cut] == [r.get("loss") for r in lines_full]


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    run = train(tiny_config(epochs=1), out=tmp_path / "r", log=lambda *a: None)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    train(resume=run, log=lambda *a: None)
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_gradient_accumulation_is_the_same_update(tmp_path):
    a = train(tiny_config(epochs=1), out=tmp_path / "a", log=lambda *a: None)
    b = train(tiny_config(epochs=1, grad_accum=4), out=tmp_path / "b", log=lambda *a: None)
    for k, v in final_weights(a).items():
        torch.testing.assert_close(final_weights(b)[k], v, atol=2e-5, rtol=1e-4)


def test_max_steps_stops_first(tmp_path):
    run = train(tiny_config(epochs=5, max_steps=7), out=tmp_path / "r", log=lambda *a: None)
    assert json.loads((run / "model.json").read_text())["step"] == 7


def test_early_stopping_triggers_and_restores_best(tmp_path):
    logs = []
    cfg = tiny_config(epochs=40, eval_every=5,
                      early_stopping={"metric": "val_loss", "mode": "min", "patience": 2, "min_delta": 10.0})
    run = train(cfg, out=tmp_path / "r", log=logs.append)
    meta = json.loads((run / "model.json").read_text())
    assert any("early stopping at step 15" in m for m in logs)  # best at 5, no 10-nat gain at 10 or 15
    assert meta["step"] == 15 and meta["best_step"] == 5
    best, _ = ckpt.load_checkpoint(run / "checkpoints" / "best")
    for k, v in best.items():
        assert torch.equal(final_weights(run)[k], v)


def test_nonfinite_loss_stops_with_clear_message(tmp_path):
    from zerotune.errors import RunFailed

    cfg = tiny_config(epochs=2)
    cfg["optim"] = {"name": "sgd", "lr": 1e30}
    with pytest.raises(RunFailed, match=r"step \d+: the (loss|gradient norm) is not finite"):
        train(cfg, out=tmp_path / "r", log=lambda *a: None)


def test_out_of_memory_is_a_run_failure_with_advice(tmp_path, monkeypatch):
    from zerotune.errors import RunFailed

    def oom(self, out, y):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SupervisedTask, "loss", oom)
    with pytest.raises(RunFailed, match="step 0: out of memory on cpu; lower train.batch_size") as e:
        train(tiny_config(), out=tmp_path / "r", log=lambda *a: None)
    assert e.value.exit_code == 1


def test_without_a_terminal_progress_is_plain_lines(tmp_path, monkeypatch, capsys):
    """A log file gets whole lines (step, rate, ETA, the latest numbers), never carriage-return updates."""
    from zerotune.train.loop import Progress

    monkeypatch.setattr(Progress, "every", 0.0)
    lines: list[str] = []
    train(tiny_config(epochs=None, max_steps=3, log_every=1, progress=True), out=tmp_path / "r", log=lines.append)
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.split(" · ")[0] for ln in steps] == ["step 1/3", "step 2/3", "step 3/3"]
    assert "loss" in steps[-1] and "steps/s" in steps[-1] and "ETA" in steps[-1]
    assert "\r" not in capsys.readouterr().err
