"""Runs always end with a status: the launching process's death, a Stop after the last step,
and whoever reads a run directory first."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from labkit.runs import LOCK_NAME, RunDir, process_identity

KERNEL = """
import sys, time, labkit
labkit.launch(labkit.RunConfig(workers=2, steps=100000, checkpoint_every=10, log_every=5, run_dir=sys.argv[1]))
time.sleep(3600)
"""


def _no_temp_files(run_dir):
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.timeout(150)
def test_a_killed_launching_process_leaves_the_run_stopped_with_its_reason(tmp_path, no_leftovers):
    """The kernel's role: a Python process that launched the run is killed mid-run (a closed
    tab, a killed kernel); the ranks notice, finalize the run and end."""
    run_dir = tmp_path / "run"
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL, str(run_dir)])
    try:
        deadline = time.monotonic() + 100
        while not RunDir(run_dir).checkpoints():
            assert time.monotonic() < deadline and kernel.poll() is None, "the run made no checkpoint"
            time.sleep(0.1)
        kernel.kill()
        kernel.wait(10)
        deadline = time.monotonic() + 30
        while not RunDir(run_dir).summary_path.exists():
            assert time.monotonic() < deadline, "nobody finalized the run"
            time.sleep(0.1)
    finally:
        if kernel.poll() is None:
            kernel.kill()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped"
    assert summary["error"].startswith(f"the process that launched the run (pid {kernel.pid}) ended before "
                                       "the run did; found by rank ")
    run = RunDir(run_dir)
    assert summary["resume_with"] == f"labkit train --run-dir {run_dir} --resume"
    assert run.load_checkpoint()["step"] == int(summary["checkpoint"].rsplit("-", 1)[1][:-3]) >= 10
    _no_temp_files(run_dir)  # and no_leftovers: no rank is left behind


@pytest.mark.timeout(150)
def test_a_stop_after_every_last_step_leaves_the_run_completed(tmp_path, no_leftovers):
    """Launched from a thread that then ends (the ranks go on), stopped once every rank has
    logged its last step: completed, with every number."""
    import labkit

    run_dir = tmp_path / "run"
    box = {}
    config = labkit.RunConfig(workers=2, steps=20, log_every=5, run_dir=str(run_dir))
    thread = threading.Thread(target=lambda: box.setdefault("run", labkit.launch(config)))
    thread.start()
    thread.join()
    run = box["run"]
    files = RunDir(run_dir)
    deadline = time.monotonic() + 120
    while len({r["rank"] for r in files.metrics("train") if r["step"] == 20}) < 2:
        assert time.monotonic() < deadline and not run.done(), run.result()
        time.sleep(0.01)
    result = run.stop()
    assert result.status == "completed", result
    s = result.summary
    assert s["steps"] == 20 and s["bytes_sent"] > 0 and 0 < s["comm_fraction"] < 1
    assert s["test_accuracy"] is not None and s["samples_per_s"] > 0 and "resume_with" not in s
    # measured numbers keep six significant digits, not sixteen
    assert all(len(repr(v).replace(".", "").lstrip("0")) <= 7 for v in s.values() if isinstance(v, float))


EXITING = """
import sys, time, labkit
from labkit.runs import RunDir
labkit.launch(labkit.RunConfig(workers=2, steps=100000, checkpoint_every=10, run_dir=sys.argv[1]))
while not RunDir(sys.argv[1]).checkpoints():
    time.sleep(0.1)
"""


@pytest.mark.timeout(150)
def test_the_interpreter_exiting_stops_its_runs(tmp_path, no_leftovers):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", EXITING, str(run_dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    summary = RunDir(run_dir).read_summary()  # written before the interpreter was gone
    assert (summary["status"], summary["error"]) == ("stopped", "the Python process that launched the run exited")
    assert summary["resume_with"] and RunDir(run_dir).load_checkpoint()["step"] >= 10
    _no_temp_files(run_dir)


# --- the next reader -------------------------------------------------------------------------------
def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _orphan(path, launcher=None, ranks_pid=None):
    """A run directory whose launcher is gone without a summary: config, lock, two ranks' lines."""
    run = RunDir(path)
    run.create({"sync": "allreduce", "compression": "none", "workers": 2}, 2)
    run.update_config(launched_by=launcher or {"pid": _dead_pid(), "host": socket.gethostname(), "start": 1})
    (run.path / LOCK_NAME).write_text("1\n")
    pid = ranks_pid or _dead_pid()
    for rank in (0, 1):
        run.append_metrics({"t": 1.0, "kind": "event", "event": "started", "rank": rank, "pid": pid,
                            "host": socket.gethostname()})
        run.append_metrics({"t": 2.0, "kind": "train", "step": 7, "rank": rank, "loss": 0.5})
    return run


def test_the_next_reader_finalizes_a_run_whose_launcher_is_gone(tmp_path):
    from labkit.bench.runs import show

    run = _orphan(tmp_path / "orphan")
    out, err = io.StringIO(), io.StringIO()
    assert show([str(run.path)], out, err) == 0 and err.getvalue() == ""
    summary = run.read_summary()
    assert summary["status"] == "stopped" and summary["steps"] == 7
    assert summary["error"].endswith("ended before the run did; found by labkit show")
    assert f"{run.path}: stopped: the process that launched the run (pid " in out.getvalue()

    live = _orphan(tmp_path / "live", launcher=process_identity())  # its launcher (this process) still runs
    assert live.status == "running" and not live.summary_path.exists()
    going = _orphan(tmp_path / "ranks", ranks_pid=os.getpid())  # launcher gone, a rank still running
    assert going.status == "running" and not going.summary_path.exists()
    failed = _orphan(tmp_path / "failed")
    failed.append_metrics({"t": 3.0, "kind": "event", "event": "error", "rank": 1, "error": "rank 1: OSError: boom"})
    assert failed.status == "failed" and failed.read_summary()["error"].startswith("rank 1: OSError: boom (the process")


def test_show_names_each_damaged_file_in_one_line(tmp_path):
    from labkit.bench.runs import show

    runs = {}
    for name in ("summary", "metrics", "config"):
        run = RunDir(tmp_path / name)
        run.create({"sync": "allreduce", "compression": "none", "workers": 2}, 2)
        run.append_metrics({"t": 1.0, "kind": "train", "step": 3, "rank": 0})
        run.write_summary({"status": "completed", "test_accuracy": 0.91234567, "wall_time_s": 12.3456789,
                           "bytes_sent": 1000, "comm_fraction": 0.25, "steps": 3})
        runs[name] = run
    text = runs["summary"].summary_path.read_text()
    runs["summary"].summary_path.write_text(text[: len(text) // 2])
    with open(runs["metrics"].metrics_path, "ab") as f:
        f.write(b"garbage\n\x00\xff{not json\n")
    runs["config"].config_path.write_text("{'config': not json")
    out, err = io.StringIO(), io.StringIO()
    assert show([str(tmp_path / n) for n in runs], out, err) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"labkit: show: {runs['summary'].summary_path} is damaged (not JSON: ")
    assert lines[1] == (f"labkit: show: {runs['metrics'].metrics_path}: 2 line(s) are not JSON (the first at "
                        "line 2); they are skipped")
    assert lines[2] == (f"labkit: show: {runs['config'].config_path} is damaged (not JSON: Expecting property name "
                        "enclosed in double quotes)")
    table = out.getvalue().splitlines()
    assert "0.9123" in table[3] and "12.3" in table[3] and "12.3456" not in out.getvalue()
    assert table[2].split()[4] == "damaged" and table[4].split()[1:3] == ["-", "-"]

    err = io.StringIO()
    assert show([str(tmp_path / "summary"), str(tmp_path / "nowhere")], io.StringIO(), err) == 2
    assert err.getvalue() == f"labkit: error: show: {tmp_path / 'nowhere'} does not exist\n"


@pytest.mark.timeout(150)
def test_sigterm_to_labkit_train_stops_the_run_naming_it(tmp_path, no_leftovers):
    from .conftest import LABKIT

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*LABKIT, "train", "--quiet", "--workers", "2", "--steps", "100000",
                             "--checkpoint-every", "10", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 100
        while not RunDir(run_dir).checkpoints():
            assert time.monotonic() < deadline and proc.poll() is None, "the run made no checkpoint"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == f"labkit: stopped; resume with: labkit train --run-dir {run_dir} --resume"
    summary = RunDir(run_dir).read_summary()
    assert (summary["status"], summary["error"]) == ("stopped", "the process that launched the run received SIGTERM")
    _no_temp_files(run_dir)
