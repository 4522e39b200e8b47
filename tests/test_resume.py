"""Checkpoints that cannot rot silently, and a resume that knows what it resumes."""

import hashlib
import json
import os
import pickle

import pytest
import torch

from labkit.runs import CheckpointError, RunDir, checksum_path

from .conftest import run_cli


def _two_checkpoints(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (10, 20):
        run.save_checkpoint(step, {"model": {"w": torch.full((4,), float(step))}})
    return run


def test_checkpoint_is_written_with_its_checksum(tmp_path):
    run = _two_checkpoints(tmp_path)
    path = run.checkpoint_path(20)
    digest, size = checksum_path(path).read_text().split()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() and int(size) == path.stat().st_size
    assert run.load_checkpoint()["step"] == 20
    assert not [p for p in run.checkpoint_dir.iterdir() if p.name.endswith(".tmp")]
    run.save_checkpoint(30, {"model": {}})  # the oldest goes, with its checksum
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == [
        "step-00000020.pt", "step-00000020.pt.sha256", "step-00000030.pt", "step-00000030.pt.sha256"]


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "is truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:200] + bytes([p.read_bytes()[200] ^ 1, p.read_bytes()[201] ^ 1])
                             + p.read_bytes()[202:]), "does not match its checksum"),
    (lambda p: checksum_path(p).unlink(), "has no checksum file"),
])
def test_a_damaged_newest_checkpoint_is_never_loaded(tmp_path, damage, why):
    run = _two_checkpoints(tmp_path)
    damage(run.checkpoint_path(20))
    path, state, rejected = run.find_good_checkpoint()
    assert path == run.checkpoint_path(10) and state["step"] == 10
    assert [(p.name, w.split(" (")[0]) for p, w in rejected] == [("step-00000020.pt", why)]
    assert run.load_checkpoint()["step"] == 10
    with pytest.raises(CheckpointError, match=why):
        run.load_checkpoint(run.checkpoint_path(20))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_foreign_pickle_with_a_matching_checksum_runs_no_code(tmp_path):
    run = _two_checkpoints(tmp_path)
    marker = tmp_path / "executed"
    payload = _Payload()
    payload.marker = marker
    data = pickle.dumps({"step": 30, "model": payload})
    path = run.checkpoint_path(30)
    path.write_bytes(data)
    checksum_path(path).write_text(f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")
    found, state, rejected = run.find_good_checkpoint()
    assert found == run.checkpoint_path(20)
    assert rejected[0][0] == path and "is not a labkit checkpoint" in rejected[0][1]
    assert not marker.exists()


@pytest.mark.timeout(150)
def test_resume_skips_a_truncated_checkpoint_and_sets_it_aside(tmp_path, no_leftovers):
    run_dir = tmp_path / "run"
    common = ["--quiet", "--steps", "20", "--checkpoint-every", "10", "--log-every", "5", "--eval-every", "10"]
    first = run_cli("train", *common, "--run-dir", run_dir, timeout=120)
    assert first.returncode == 0, first.stderr
    run = RunDir(run_dir)
    newest = run.checkpoint_path(20)
    newest.write_bytes(newest.read_bytes()[:1000])
    out = run_cli("train", "--quiet", "--run-dir", run_dir, "--resume", timeout=120)
    assert out.returncode == 0, out.stderr
    notes = [line for line in out.stderr.splitlines() if line.startswith("labkit: resume:")]
    assert len(notes) == 1
    assert "step-00000020.pt is truncated" in notes[0] and "resuming from step-00000010.pt (step 10)" in notes[0]
    assert (run.checkpoint_dir / "rejected" / "step-00000020.pt").stat().st_size == 1000
    assert run.load_checkpoint()["step"] == 20  # written again by the resumed run, whole
    assert json.loads(run.summary_path.read_text())["status"] == "completed"
    started = [e.get("resumed_from") for e in run.metrics("event") if e["event"] == "started"]
    assert started == [None, 10]


# --- a resume that knows what it resumes ----------------------------------------------------
def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 20-step run with checkpoints at 10 and 20; each test works on a copy."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    out = run_cli("train", "--quiet", "--steps", "20", "--checkpoint-every", "10", "--log-every", "5",
                  "--eval-every", "10", "--run-dir", run_dir, timeout=120)
    assert out.returncode == 0, out.stderr
    return run_dir


def _copy(finished_run, tmp_path):
    import shutil

    return shutil.copytree(finished_run, tmp_path / "run")


def _refused(out, option):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith(f"labkit: error: {option}: "), out.stderr
    return lines[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("argv, option, words", [
    (["--workers", "2"], "--workers", "made with --workers 1"),
    (["--sync", "local-sgd"], "--sync", "made with --sync allreduce"),
    (["--model", "lenet"], "--model", "made with --model mlp"),
    (["--steps", "15"], "--steps", "below the checkpoint's step 20"),
])
def test_resume_refuses_settings_that_contradict_the_checkpoint(finished_run, tmp_path, argv, option, words):
    run_dir = _copy(finished_run, tmp_path)
    before = _snapshot(run_dir)
    out = run_cli("train", "--quiet", "--run-dir", run_dir, "--resume", *argv, timeout=100)
    assert words in _refused(out, option)
    assert _snapshot(run_dir) == before


@pytest.mark.timeout(120)
def test_a_failing_resume_changes_nothing(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    (run_dir / "config.json").unlink()
    before = _snapshot(run_dir)
    out = run_cli("train", "--quiet", "--run-dir", run_dir, "--resume", timeout=100)
    assert "has no config.json" in _refused(out, "--resume")
    assert _snapshot(run_dir) == before and "summary.json" in before

    run_dir = _copy(finished_run, tmp_path / "all-bad")
    for ckpt in RunDir(run_dir).checkpoints():
        ckpt.write_bytes(b"not a checkpoint")
    before = _snapshot(run_dir)
    out = run_cli("train", "--quiet", "--run-dir", run_dir, "--resume", timeout=100)
    line = _refused(out, "--resume")
    assert "no intact checkpoint" in line and "step-00000020.pt is truncated" in line
    assert _snapshot(run_dir) == before


@pytest.mark.timeout(150)
def test_a_run_in_progress_locks_its_directory(tmp_path, no_leftovers):
    import subprocess
    import time

    from .conftest import LABKIT

    run_dir = tmp_path / "live"
    proc = subprocess.Popen([*LABKIT, "train", "--quiet", "--steps", "100000", "--checkpoint-every", "10",
                             "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not RunDir(run_dir).checkpoints():
            assert time.monotonic() < deadline and proc.poll() is None, "the run made no checkpoint"
            time.sleep(0.1)
        metrics_before = (run_dir / "metrics.jsonl").read_bytes()
        out = run_cli("train", "--quiet", "--run-dir", run_dir, "--resume", timeout=100)
        line = _refused(out, "--resume")
        assert f"in use by a run in progress (launched by pid {proc.pid})" in line
        assert (run_dir / "metrics.jsonl").read_bytes().startswith(metrics_before)  # nothing rewritten
        assert proc.poll() is None
    finally:
        proc.send_signal(2)  # Ctrl-C: the run stops and finalizes
        proc.wait(60)
    assert RunDir(run_dir).read_summary()["status"] == "stopped"
    # the lock went with the run: now the resume is accepted (and stopped at once by its own check)
    out = run_cli("train", "--quiet", "--run-dir", run_dir, "--resume", "--steps", "5", timeout=100)
    assert "below the checkpoint's step" in _refused(out, "--steps")
