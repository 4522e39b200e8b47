"""Single-rank training end to end: the default run, the run directory, and exact resume."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

import labkit
from labkit.runs import RunDir

from .conftest import LABKIT, run_cli


@pytest.mark.timeout(180)
def test_default_run_reaches_95_percent(tmp_path, no_leftovers):
    start = time.monotonic()
    out = run_cli("train", "--quiet", cwd=tmp_path, timeout=170)
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test_accuracy"] >= 0.95
    assert elapsed < 120  # the README promises well under a minute on 2 idle cores
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["model"] == "mlp" and config["world_size"] == 1
    assert (run_dir / "logs" / "rank-0.log").read_text().strip()
    kinds = {json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert kinds == {"train", "eval", "event"}
    for key in ("test_accuracy", "test_loss", "train_loss", "steps", "wall_time_s", "samples_per_s",
                "bytes_sent", "comm_fraction"):
        assert key in summary


@pytest.mark.timeout(120)
def test_python_api_train(tmp_path, no_leftovers):
    cfg = labkit.RunConfig(steps=60, eval_every=20, run_dir=str(tmp_path / "api"), model="lenet")
    result = labkit.train(cfg, progress=False)
    assert result.status == "completed" and result.test_accuracy > 0.5
    assert [r["step"] for r in result.metrics("eval")] == [20, 40, 60]
    assert RunDir(result.run_dir).latest_checkpoint().name == "step-00000060.pt"


def _weights(run_dir, step):
    return RunDir(run_dir).load_checkpoint(RunDir(run_dir).checkpoint_path(step))["model"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_then_resume_is_bitwise_exact(tmp_path, no_leftovers):
    steps = 400
    common = ["train", "--quiet", "--steps", str(steps), "--checkpoint-every", "50", "--log-every", "5"]
    straight = tmp_path / "straight"
    assert run_cli(*common, "--run-dir", straight, timeout=200).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*LABKIT, *common, "--run-dir", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 150
        while not (killed / "checkpoints" / "step-00000150.pt").exists():
            assert time.monotonic() < deadline, "no checkpoint appeared"
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the ranks see their launcher gone and end the run as stopped, naming it
    deadline = time.monotonic() + 30
    while RunDir(killed).read_summary() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    summary = RunDir(killed).read_summary()
    assert summary is not None, "the ranks of a killed launcher left no summary"
    assert summary["status"] == "stopped", summary
    assert "ended before the run did" in summary["error"], summary
    assert RunDir(killed).latest_checkpoint() is not None  # ...and their checkpoints stay
    assert not (killed / "checkpoints" / f"step-{steps:08d}.pt").exists()

    resumed = run_cli("train", "--quiet", "--run-dir", killed, "--resume", timeout=200)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(straight, steps), _weights(killed, steps)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # the metrics of the resumed run continue where the checkpoint left off, no step twice
    train_steps = [r["step"] for r in RunDir(killed).metrics("train")]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == steps
    assert RunDir(killed).read_summary()["status"] == "completed"
    events = [r["event"] for r in RunDir(killed).metrics("event")]
    assert events.count("started") == 2
    assert os.path.exists(killed / "logs" / "rank-0.log")
