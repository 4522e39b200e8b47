"""Multi-rank training on every launcher and backend; failures and stops end every process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import labkit
from labkit.runs import RunDir

from .conftest import run_cli

pytestmark = pytest.mark.slow


LAYOUT = ["config.json", "metrics.jsonl", "summary.json", "checkpoints", "logs/rank-0.log",
          "logs/rank-1.log", "logs/rank-2.log", "logs/rank-3.log"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher,backend", [("local", "gloo"), ("mpi", "gloo"), ("mpi", "mpi"),
                                              ("torchrun", "gloo"), ("slurm", "gloo"), ("slurm", "mpi")])
def test_four_workers_train_on_every_launcher(launcher, backend, tmp_path, no_leftovers, request):
    if launcher == "slurm":
        request.getfixturevalue("slurm_cluster")
    run_dir = tmp_path / f"{launcher}-{backend}"
    out = run_cli("train", "--quiet", "--workers", 4, "--launcher", launcher, "--backend", backend,
                  "--run-dir", run_dir, timeout=220)
    assert out.returncode == 0, out.stderr + out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 4
    assert summary["test_accuracy"] >= 0.95
    assert summary["bytes_sent"] > 0 and 0 < summary["comm_fraction"] < 1
    for part in LAYOUT:
        assert (run_dir / part).exists(), part
    ranks = {r["rank"] for r in RunDir(run_dir).metrics("train")}
    assert ranks == {0, 1, 2, 3}


def _pid_of(run_dir: Path, rank: int, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in RunDir(run_dir).metrics("event"):
            if r.get("event") == "started" and r["rank"] == rank:
                return r["pid"]
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} never started")


def _wait_for_step(run_dir: Path, step: int, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in RunDir(run_dir).metrics("train")):
            return
        time.sleep(0.1)
    raise AssertionError(f"no rank reached step {step}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher,backend", [("local", "gloo"), ("mpi", "gloo"), ("mpi", "mpi"),
                                              ("torchrun", "gloo")])
def test_killed_rank_fails_the_run_naming_it(launcher, backend, tmp_path, no_leftovers):
    cfg = labkit.RunConfig(workers=4, launcher=launcher, backend=backend, steps=5000, checkpoint_every=20,
                           run_dir=str(tmp_path / "run"))
    run = labkit.launch(cfg)
    try:
        victim = _pid_of(run.run_dir, 2)
        _wait_for_step(run.run_dir, 40)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        result = run.wait(timeout=90)
        assert time.monotonic() - killed_at < 60, "the run did not end within 60 s of the death"
    finally:
        run.stop()
    assert result.status == "failed"
    assert "rank 2" in result.error, result.error
    assert result.summary["checkpoint"] and result.summary["resume_with"]


@pytest.mark.timeout(240)
def test_failed_run_resumes_to_completion(tmp_path, no_leftovers):
    run_dir = tmp_path / "run"
    run = labkit.launch(labkit.RunConfig(workers=2, steps=400, checkpoint_every=25, run_dir=str(run_dir)))
    try:
        _wait_for_step(run_dir, 60)
        os.kill(_pid_of(run_dir, 1), signal.SIGKILL)
        assert run.wait(timeout=90).status == "failed"
    finally:
        run.stop()
    out = run_cli("train", "--quiet", "--run-dir", run_dir, "--resume", timeout=200)
    assert out.returncode == 0, out.stderr
    summary = RunDir(run_dir).read_summary()
    assert summary["status"] == "completed" and summary["steps"] == 400


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", ["local", "mpi", "torchrun", "slurm"])
def test_stop_ends_every_process(launcher, tmp_path, no_leftovers, request):
    if launcher == "slurm":
        request.getfixturevalue("slurm_cluster")
    run = labkit.launch(labkit.RunConfig(workers=2, launcher=launcher, steps=100000,
                                         run_dir=str(tmp_path / "run")))
    _pid_of(run.run_dir, 1)
    result = run.stop(timeout=60)
    assert result.status == "stopped"
    assert run.done()


@pytest.mark.timeout(300)
def test_labkit_launch_runs_a_command_as_n_ranks(tmp_path, no_leftovers):
    script = tmp_path / "allreduce.py"
    script.write_text(
        "import torch, labkit.comm as C\n"
        "c = C.init()\n"
        "t = torch.full((3,), float(c.rank + 1))\n"
        "c.allreduce(t)\n"
        "print('rank', c.rank, 'of', c.size, 'sum', t[0].item())\n")
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "launch", "-n", "3", "--", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr
    assert sorted(line.split("] ", 1)[1] for line in out.stdout.splitlines() if "sum" in line) == [
        f"rank {r} of 3 sum 6.0" for r in range(3)]


@pytest.mark.timeout(120)
def test_labkit_launch_ends_the_others_when_one_fails(tmp_path, no_leftovers):
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    sys.exit(3)\n"
        "time.sleep(300)\n")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "launch", "-n", "3", "--", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 3
    assert time.monotonic() - start < 60
    assert "a rank failed" in out.stderr
