"""Faults a student or a machine can cause end in one clear line and an intact run."""

import json
import os
import shlex

import pytest

from labkit.launch.run import resume_command
from labkit.runs import RunDir

from .conftest import run_cli


def _one_line(stderr, start):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith(start), stderr
    return lines[0]


# --- divergence --------------------------------------------------------------------------------
@pytest.mark.timeout(150)
def test_a_diverging_run_fails_naming_the_step(tmp_path, no_leftovers):
    run_dir = tmp_path / "a run $HOME"
    out = run_cli("train", "--quiet", "--workers", "2", "--steps", "20", "--lr", "1e30", "--log-every", "2",
                  "--checkpoint-every", "10", "--run-dir", run_dir, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    failed = [line for line in out.stderr.splitlines() if line.startswith("labkit: run failed:")]
    assert len(failed) == 1 and failed[0].startswith("labkit: run failed: diverged at step "), out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("diverged at step ")
    step = int(summary["error"].split()[3])
    losses = {r["step"]: r["loss"] for r in RunDir(run_dir).metrics("train") if r["rank"] == 0}
    assert losses[step] is None and all(v is not None for k, v in losses.items() if k < step)
    for ckpt in RunDir(run_dir).checkpoints():  # no checkpoint of diverged weights
        assert RunDir(run_dir).load_checkpoint(ckpt)["step"] < step
    if summary["resume_with"]:
        assert shlex.split(summary["resume_with"])[3] == str(run_dir)
    assert not list(run_dir.rglob("*.tmp"))


def test_resume_commands_are_quoted_for_the_shell():
    for path in ("runs/plain", "/tmp/a run/with space", "it's $HOME; rm -rf x"):
        assert shlex.split(resume_command(path)) == ["labkit", "train", "--run-dir", path, "--resume"]


# --- labkit launch -------------------------------------------------------------------------------
def _launch(tmp_path, *args, timeout=60):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    return run_cli("launch", *args, timeout=timeout, env=env)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "0", "soon"])
def test_launch_rejects_nonsense_timeouts(tmp_path, value):
    out = _launch(tmp_path, "-n", "1", "--timeout", value, "--", "true")
    assert out.returncode == 2
    assert value in _one_line(out.stderr, "labkit: error: argument --timeout: must be ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(90)
def test_launch_passes_exit_codes_through_and_cleans_up(tmp_path, no_leftovers):
    assert _launch(tmp_path, "-n", "2", "--", "sh", "-c", "exit 7").returncode == 7
    assert _launch(tmp_path, "-n", "1", "--", "sh", "-c", "kill -9 $$").returncode == 137
    out = _launch(tmp_path, "-n", "2", "--", "sh", "-c", "echo rank $RANK of $WORLD_SIZE")
    assert out.returncode == 0 and "[1] rank 1 of 2" in out.stdout
    out = _launch(tmp_path, "-n", "1", "--", str(tmp_path / "missing"))
    assert out.returncode == 127
    _one_line(out.stderr, f"labkit: launch: cannot run {tmp_path / 'missing'}: No such file")
    assert not list(tmp_path.glob("labkit-launch-*")), "a temporary directory was left behind"


@pytest.mark.timeout(60)
def test_launch_times_out_and_ends_every_rank(tmp_path, no_leftovers):
    out = _launch(tmp_path, "-n", "2", "--timeout", "1", "--", "sleep", "300")  # TMPDIR names tmp_path
    assert out.returncode == 124
    _one_line(out.stderr, "labkit: launch: timed out after 1 s; ending all ranks")
    assert not list(tmp_path.glob("labkit-launch-*"))


# --- writes that cannot half-happen --------------------------------------------------------------
def _disk_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    import torch

    from labkit import runs

    run = RunDir(tmp_path / "run")
    run.save_checkpoint(10, {"model": {"w": torch.ones(3)}})
    run.write_summary({"status": "completed"})
    before = sorted(p.name for p in tmp_path.rglob("*"))
    monkeypatch.setattr(runs.os, "fsync", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        run.save_checkpoint(20, {"model": {"w": torch.zeros(3)}})
    with pytest.raises(OSError, match="No space left"):
        run.write_summary({"status": "failed"})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing half-written, nothing left
    assert run.load_checkpoint()["step"] == 10 and run.read_summary() == {"status": "completed"}


@pytest.mark.timeout(120)
def test_a_summary_that_cannot_be_written_still_ends_the_wait(tmp_path, monkeypatch, no_leftovers):
    import labkit

    monkeypatch.setattr(RunDir, "write_summary", _disk_full)  # the monitor's writes (the ranks are other processes)
    config = labkit.RunConfig(steps=20, lr=1e30, log_every=2, run_dir=str(tmp_path / "full"))
    result = labkit.launch(config).wait(timeout=100)
    assert result.status == "failed"
    assert result.error.startswith("cannot write ") and result.error.endswith("No space left on device; the run was ended")
    assert not list((tmp_path / "full").rglob("*.tmp"))


@pytest.mark.timeout(150)
def test_a_run_directory_that_vanishes_ends_the_run_in_one_line(tmp_path, no_leftovers):
    import shutil
    import subprocess
    import time

    from .conftest import LABKIT

    run_dir = tmp_path / "gone"
    proc = subprocess.Popen([*LABKIT, "train", "--quiet", "--steps", "100000", "--checkpoint-every", "10",
                             "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not RunDir(run_dir).checkpoints():
            assert time.monotonic() < deadline and proc.poll() is None, "the run made no checkpoint"
            time.sleep(0.1)
        # moved away in one step (a tree being deleted file by file races the run's own writes)
        os.rename(run_dir, tmp_path / "moved")
        shutil.rmtree(tmp_path / "moved", ignore_errors=True)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    failed = [line for line in err.splitlines() if line.startswith("labkit: run failed:")]
    assert failed == [f"labkit: run failed: the run directory {run_dir} vanished while the run went on"], err


# --- a rank that stops answering --------------------------
@pytest.mark.timeout(150)
def test_a_silent_rank_is_named_with_the_timeout_that_caught_it(tmp_path, no_leftovers):
    import signal
    import time

    import labkit

    run_dir = tmp_path / "silent"
    run = labkit.launch(labkit.RunConfig(workers=2, steps=100000, timeout=3, log_every=1, run_dir=str(run_dir)))
    files = RunDir(run_dir)
    deadline = time.monotonic() + 100
    while not [r for r in files.metrics("train") if r["rank"] == 1]:
        assert time.monotonic() < deadline and not run.done(), run.result()
        time.sleep(0.1)
    pid = [e["pid"] for e in files.metrics("event") if e["event"] == "started" and e["rank"] == 1][0]
    os.kill(pid, signal.SIGSTOP)
    result = run.wait(timeout=100)
    assert result.status == "failed"
    assert result.error == (f"rank 1 stopped answering (its process was stopped and never continued): rank 0 gave "
                            f"up waiting for it after the 3 s communication timeout (--timeout 3); "
                            f"see {run_dir / 'logs' / 'rank-1.log'}")
    assert not list(run_dir.rglob("*.tmp"))
