"""``labkit show`` on every kind of run directory, and ``labkit launch``'s exit status: the
failed rank's own, whichever launcher started the ranks."""

import os
import socket

import pytest

from labkit.cli import main
from labkit.runs import LOCK_NAME, RunDir, process_identity

from .conftest import PYTHON, run_cli
from .test_run_endings import _dead_pid

CONFIG = {"sync": "allreduce", "compression": "none", "workers": 2}


# --- labkit show ---------------------------------------------------------------------------------
def _run(path, summary=None, launched_by=None):
    """A run directory as a launcher leaves it: config, lock, each rank's first lines."""
    run = RunDir(path)
    run.create(CONFIG, 2)
    run.update_config(launched_by=launched_by or process_identity())
    (run.path / LOCK_NAME).write_text("1\n")
    for rank in (0, 1):
        run.append_metrics({"t": 1.0, "kind": "event", "event": "started", "rank": rank, "pid": _dead_pid(),
                            "host": socket.gethostname()})
        run.append_metrics({"t": 2.0, "kind": "train", "step": 5, "rank": rank, "loss": 0.5})
    if summary is not None:
        run.write_summary(summary)
    return run


def _show(capsys, *paths):
    code = main(["show", *map(str, paths)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_show_completed_running_and_orphaned_runs(tmp_path, capsys):
    done = _run(tmp_path / "done", {"status": "completed", "steps": 5, "test_accuracy": 0.912345,
                                    "wall_time_s": 3.25, "bytes_sent": 123456, "comm_fraction": 0.5})
    going = _run(tmp_path / "going")  # launched by this process, which still runs
    orphan = _run(tmp_path / "orphan", launched_by={"pid": _dead_pid(), "host": socket.gethostname(), "start": 1})

    code, out, err = _show(capsys, done.path, going.path, orphan.path)
    assert (code, err) == (0, [])
    assert out[0].split() == ["run", "sync", "compression", "workers", "status", "steps", "test_acc", "wall_s",
                              "bytes_sent", "comm_frac"]
    assert out[2].split() == [str(done.path), "allreduce", "none", "2", "completed", "5", "0.9123", "3.2",
                              "123,456", "0.50"]
    assert out[3].split()[4:6] == ["running", "5"] and not going.summary_path.exists()
    assert out[4].split()[4:6] == ["stopped", "5"]
    assert len(out) == 6  # the table, then one line: why the orphan stopped
    assert out[5].startswith(f"{orphan.path}: stopped: the process that launched the run (pid ")
    assert out[5].endswith("ended before the run did; found by labkit show")
    assert orphan.read_summary()["status"] == "stopped"  # finalized by the reader


def test_show_names_a_damaged_summary_and_refuses_what_is_not_a_run(tmp_path, capsys):
    run = _run(tmp_path / "damaged", {"status": "completed", "test_accuracy": 0.5})
    run.summary_path.write_text('{"status": "compl')
    code, out, err = _show(capsys, run.path)
    assert code == 1
    assert out[2].split()[4] == "damaged"
    assert len(err) == 1 and err[0].startswith(f"labkit: show: {run.summary_path} is damaged (not JSON: ")

    (tmp_path / "notes").mkdir()
    for path, what in ((tmp_path / "notes", "is not a labkit run directory (no config.json)"),
                       (tmp_path / "nowhere", "does not exist")):
        code, out, err = _show(capsys, run.path, path)
        assert (code, out, err) == (2, [], [f"labkit: error: show: {path} {what}"])


def test_labkit_show_command_exit_status(tmp_path):
    """The installed command, not only main(): the status reaches the shell."""
    result = run_cli("show", tmp_path, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"labkit: error: show: {tmp_path} is not a labkit run directory (no config.json)\n"


# --- labkit launch: the failed rank's status under every launcher ---------------------------------
RANK_EXITS = """
import os, sys, time
rank = int(os.environ.get("RANK") or os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK"))
if rank == 1:
    time.sleep(0.5)
    {how}
time.sleep(40)  # still running when rank 1 fails: every launcher ends it (else --timeout 30 would)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("launcher, how, status", [
    ("local", "sys.exit(7)", 7), ("mpi", "sys.exit(7)", 7), ("torchrun", "sys.exit(7)", 7),
    ("mpi", "os.kill(os.getpid(), 9)", 137)])  # torchrun's -9 is read as in the test below
def test_launch_exits_with_the_failed_ranks_status(launcher, how, status, tmp_path, no_leftovers):
    env = dict(os.environ, TMPDIR=str(tmp_path))  # marks every process it starts for no_leftovers
    result = run_cli("launch", "-n", 2, "--launcher", launcher, "--timeout", 30, "--",
                     PYTHON, "-c", RANK_EXITS.format(how=how), tmp_path, timeout=50, env=env)
    assert result.returncode == status, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == (
        f"labkit: launch: a rank failed ({'killed by signal 9, ' if status == 137 else ''}status {status}); "
        "the others were ended")
    assert not list(tmp_path.glob("labkit-launch-*")), "a temporary directory was left behind"


def test_torchrun_root_cause_is_the_first_failure(tmp_path):
    from labkit.launch.command import torchrun_root_cause

    log = tmp_path / "launcher.log"
    log.write_text("rank 0 says exitcode: 3 in its own output\n"
                   "Failures:\n[1]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : -15 (pid: 11)\n"
                   "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n"
                   "  exitcode  : -9 (pid: 12)\n  error_file: <N/A>\n")
    assert torchrun_root_cause(str(log)) == -9  # labkit launch exits 128 + 9, as for a local rank
    log.write_text("exitcode: 3\nno summary: torchrun itself failed\n")
    assert torchrun_root_cause(str(log)) is None
    assert torchrun_root_cause(str(tmp_path / "missing.log")) is None


def test_the_first_recorded_failure_wins_and_damaged_records_are_skipped(tmp_path):
    from labkit.launch.guard import first_failure

    assert first_failure(str(tmp_path / "missing")) is None
    assert first_failure(str(tmp_path)) is None
    (tmp_path / "rank-2").write_text("-15 1700000002.5\n")  # ended by the cleanup, later
    (tmp_path / "rank-1").write_text("7 1700000001.25\n")  # the one that failed
    (tmp_path / "rank-3").write_text("garbage")
    (tmp_path / "rank-0.tmp").write_text("9 1600000000.0\n")  # never completed
    assert first_failure(str(tmp_path)) == 7
