"""SIGKILL at random moments: every resume starts from a good checkpoint and the finished run
is bit-identical to one that was never interrupted, with a complete metrics.jsonl."""

from __future__ import annotations

import random
import re
import shutil
import signal
import time

import pytest

from tests.reliability.common import (
    assert_same_final_weights,
    assert_same_metrics,
    logged_steps,
    run_config,
    start,
    wait_for_step,
    write_config,
)
from zerotune.train import checkpoint as ckpt


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, reference_run):
    rng = random.Random(20261124)
    config = write_config(tmp_path / "c.yaml", run_config())
    run = tmp_path / "run"
    proc = start(["train", config, "--out", run], tmp_path / "log-0")
    last = 0  # the last step logged before the latest kill
    resumed_from = []
    for kill in range(1, 4):
        # a target past everything the previous process logged, then 0-20 ms (about a step) more,
        # so the kill lands anywhere: mid-step, mid-checkpoint, mid-metrics line
        wait_for_step(proc, run, last + rng.randint(3, 20))
        time.sleep(rng.uniform(0, 0.02))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=300) == -signal.SIGKILL
        last = max(logged_steps(run))
        proc = start(["train", "--resume", run], tmp_path / f"log-{kill}")
        wait_for_step(proc, run, last + 1)  # the resumed process is past its checkpoint
        log = (tmp_path / f"log-{kill}").read_text()
        found = re.search(rf"resuming {re.escape(str(run))} from step-(\d+)", log)
        assert found, log
        step = int(found.group(1))
        # a checkpoint never runs ahead of the metrics it follows, so it is at most `last`
        assert 0 < step <= last, (step, last)
        resumed_from.append(step)
    assert proc.wait(timeout=300) == 0, (tmp_path / "log-3.err").read_text()
    assert resumed_from == sorted(resumed_from)
    assert_same_final_weights(run, reference_run)
    assert_same_metrics(run, reference_run)
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_killed_while_logging_a_checkpoint_step_loses_no_metrics_line(tmp_path, monkeypatch, reference_run):
    from zerotune.train import loop
    from zerotune.train.api import train

    real = loop.MetricsLog.write

    def dies_at_9(self, record):
        if record["step"] == 9:  # a checkpoint step (checkpoint_every 3): killed before its line is written
            raise KeyboardInterrupt
        real(self, record)

    monkeypatch.setattr(loop.MetricsLog, "write", dies_at_9)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(), out=tmp_path / "run", log=lambda *a: None)
    monkeypatch.setattr(loop.MetricsLog, "write", real)
    assert logged_steps(tmp_path / "run")[-1] == 8
    train(resume=tmp_path / "run", log=lambda *a: None)  # from step 6, so step 9 is logged again
    assert_same_metrics(tmp_path / "run", reference_run)
    assert_same_final_weights(tmp_path / "run", reference_run)


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, reference_run):
    from zerotune.train.api import train

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "model.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step-000105")  # killed after logging 103-105, before checkpointing 105
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step-000102"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:9])  # killed mid-line
    train(resume=run, log=lambda *a: None)
    assert_same_metrics(run, reference_run)
