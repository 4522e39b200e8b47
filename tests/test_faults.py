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
