"""SIGKILL at random moments: every resume starts from a good checkpoint and the finished run
is bit-identical to one that was never interrupted, with a complete metrics.jsonl."""

from __future__ import annotations

import random
import re
import signal
import time

from tests.reliability.common import (
    assert_same_final_weights,
    assert_same_metrics,
    logged_steps,
    run_config,
    start,
    wait_for_step,
    write_config,
)


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
        assert proc.wait(timeout=60) == -signal.SIGKILL
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
    assert proc.wait(timeout=120) == 0, (tmp_path / "log-3.err").read_text()
    assert resumed_from == sorted(resumed_from)
    assert_same_final_weights(run, reference_run)
    assert_same_metrics(run, reference_run)
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []
