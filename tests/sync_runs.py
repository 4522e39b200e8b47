"""Helpers of the sync-mode tests: short runs through the Python API, and killing a rank."""

from __future__ import annotations

import os
import signal
import time

import labkit
from labkit.runs import RunDir


def train(run_dir, **settings) -> labkit.RunResult:
    """A 4-rank run of the default training (digits, MLP, 10 epochs) with ``settings``."""
    return labkit.train(labkit.RunConfig(workers=4, run_dir=str(run_dir), **settings), progress=False)


def train_and_kill(run_dir, victim: int, at_step: int, **settings) -> tuple[labkit.RunResult, int]:
    """Start a 4-rank run, SIGKILL rank ``victim`` once it has logged step ``at_step``.

    The pid comes from the rank's ``started`` event. Returns the run's result and the step
    the victim had logged when it was killed.
    """
    run = labkit.launch(labkit.RunConfig(workers=4, run_dir=str(run_dir), log_every=5, **settings))
    try:
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, "the victim never reached the step"
            assert not run.done(), f"the run ended before rank {victim} could be killed: {run.result()}"
            steps = [r["step"] for r in run.metrics("train") if r["rank"] == victim]
            if steps and steps[-1] >= at_step:
                break
            time.sleep(0.05)
        pid = next(e["pid"] for e in run.metrics("event") if e["event"] == "started" and e["rank"] == victim)
        os.kill(pid, signal.SIGKILL)
        return run.wait(timeout=240), steps[-1]
    finally:
        if not run.done():
            run.stop()


def events(run_dir, name: str) -> list[dict]:
    return [e for e in RunDir(run_dir).metrics("event") if e["event"] == name]
