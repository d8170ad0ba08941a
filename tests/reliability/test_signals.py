"""SIGINT / SIGTERM: the step finishes, a checkpoint is saved, one line on stderr, exit 130 / 143,
and resuming gives the same final weights as a run that was never stopped."""

from __future__ import annotations

import re
import signal

from tests.reliability.common import (
    assert_same_final_weights,
    assert_same_metrics,
    run_config,
    start,
    wait_for_step,
    write_config,
)
from zerotune.train import checkpoint as ckpt


def stop_with(sig: signal.Signals, proc, run, at_step: int, log) -> int:
    """Send ``sig`` once the run has logged ``at_step``; check the exit and the one stderr line.
    Returns the step the run says it stopped (and checkpointed) at."""
    wait_for_step(proc, run, at_step)
    proc.send_signal(sig)
    code = proc.wait(timeout=300)
    assert code == 128 + sig, (code, log.with_name(log.name + ".err").read_text())
    err = log.with_name(log.name + ".err").read_text().strip().splitlines()
    assert len(err) == 1, err
    found = re.fullmatch(r"error: stopped by signal at step (\d+); checkpoint saved; continue with: "
                         r"zerotune train --resume " + re.escape(str(run)), err[0])
    assert found, err[0]
    step = int(found.group(1))
    assert step >= at_step
    assert ckpt.latest_checkpoint(run / "checkpoints").name == ckpt.step_name(step)
    return step


def test_sigint_then_sigterm_save_a_checkpoint_and_resume_exactly(tmp_path, reference_run):
    config = write_config(tmp_path / "c.yaml", run_config())
    run = tmp_path / "run"
    proc = start(["train", config, "--out", run], tmp_path / "a")
    first = stop_with(signal.SIGINT, proc, run, 10, tmp_path / "a")
    proc = start(["train", "--resume", run], tmp_path / "b")
    second = stop_with(signal.SIGTERM, proc, run, first + 20, tmp_path / "b")
    assert f"from {ckpt.step_name(first)}" in (tmp_path / "b").read_text()
    proc = start(["train", "--resume", run], tmp_path / "c")
    assert proc.wait(timeout=300) == 0, (tmp_path / "c.err").read_text()
    assert f"from {ckpt.step_name(second)}" in (tmp_path / "c").read_text()
    assert_same_final_weights(run, reference_run)
    assert_same_metrics(run, reference_run)
