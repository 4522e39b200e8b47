"""Runs on the local SLURM from the control panel: a job waiting in the queue shows "queued"
with its id, position and reason, goes live when it starts, and Stop cancels it.

The jobs are submitted held (``sbatch --hold``, through LABKIT_SBATCH_EXTRA), so that they
wait in the queue for as long as the test needs; ``scontrol release`` lets one start.
Also here: cluster/local-slurm.sh down stops only the daemons its own `up` started.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from labkit import RunConfig
from labkit.widgets import ControlPanel

from .conftest import SLURM_SCRIPT

pytestmark = [pytest.mark.slurm]


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return re.search(r"JobState=(\S+)", out.stdout).group(1)


def tick_until(panel: ControlPanel, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        panel.tick()
        if re.search(pattern, panel.status.value):
            return panel.status.value
        time.sleep(0.2)
    raise AssertionError(f"the panel never showed {pattern!r}; it shows {panel.status.value!r}")


@pytest.mark.timeout(150)
def test_queued_run_shows_id_and_position_goes_live_and_stop_cancels(slurm_cluster, tmp_path, monkeypatch,
                                                                      no_leftovers):
    monkeypatch.setenv("LABKIT_SBATCH_EXTRA", "--hold")
    config = RunConfig(workers=2, launcher="slurm", steps=100000, log_every=5, eval_every=1000)
    first, second = ControlPanel(config, runs_dir=tmp_path / "a"), ControlPanel(config, runs_dir=tmp_path / "b")
    first.start()
    second.start()
    try:
        one, two = first.run.job.job_id, second.run.job.job_id
        # (the status is refreshed every half second: the first may show "1 of 1" for a moment)
        tick_until(first, re.escape(f"queued: SLURM job {one}, position 1 of 2 in the queue (reason: JobHeldUser)"))
        tick_until(second, re.escape(f"queued: SLURM job {two}, position 2 of 2 in the queue (reason: JobHeldUser)"))

        # Stop while queued: the job is cancelled before any rank started
        second.stop()
        assert re.fullmatch(rf"stopped at step 0 \(SLURM job {two}\)", tick_until(second, "^stopped"))
        assert job_state(two) == "CANCELLED"
        assert not list((second.run.run_dir / "logs").glob("rank-*.log"))
        assert second.run.summary()["status"] == "stopped"

        # released, the first job starts: the panel says where, then Stop cancels the running job
        subprocess.run(["scontrol", "release", one], check=True, timeout=30)
        host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
        assert tick_until(first, "started|running") in (
            f"SLURM job {one} started on {host}: starting the ranks...",
            *(f"running: step {k} of 100000 (SLURM job {one})" for k in range(1, 100)))
        first.stop()
        assert re.fullmatch(rf"stopped at step \d+ \(SLURM job {one}\)", tick_until(first, "^stopped"))
        assert job_state(one) == "CANCELLED"
        assert first.run.summary()["status"] == "stopped"
    finally:
        for panel in (first, second):
            if panel.run is not None and not panel.run.done():
                panel.run.stop(timeout=30)


# --- local-slurm.sh down ---------------------------------------------------------------------
def _decoy(folder: Path, name: str) -> subprocess.Popen:
    """A process whose name is ``name`` (a copy of sleep), as another cluster's daemon would be."""
    binary = folder / name
    shutil.copy(shutil.which("sleep"), binary)
    return subprocess.Popen([str(binary), "300"])


def _alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


@pytest.mark.timeout(60)
def test_down_stops_only_the_daemons_up_recorded(tmp_path):
    """No SLURM needed: `down` kills a recorded pid only while it is still that daemon."""
    if os.geteuid() != 0:
        pytest.skip("local-slurm.sh runs as root")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    ours = _decoy(bin_dir, "munged")          # recorded: the munged `up` started
    other = _decoy(bin_dir, "slurmd")         # another cluster's slurmd: not recorded
    reused = subprocess.Popen(["sleep", "300"])  # a recorded pid now used by something else
    try:
        (state / "started").write_text(f"munged {ours.pid}\nslurmd {reused.pid}\n")
        out = subprocess.run(["bash", str(SLURM_SCRIPT), "down"], capture_output=True, text=True, timeout=40,
                             env={**os.environ, "LABKIT_SLURM_STATE": str(state)})
        assert out.returncode == 0, out.stderr
        ours.wait(timeout=10)
        assert _alive(other) and _alive(reused)
        assert not (state / "started").exists()
        assert f"munged:{ours.pid}" in out.stdout
    finally:
        for proc in (ours, other, reused):
            if _alive(proc):
                proc.send_signal(signal.SIGKILL)
                proc.wait()


@pytest.mark.timeout(90)
def test_a_second_cluster_goes_down_without_touching_the_first(slurm_cluster, tmp_path):
    """A second cluster on other ports beside the session's: its `down` stops its own
    slurmctld and slurmd, and leaves the first cluster's daemons and munged running."""
    record = slurm_cluster / "started"
    first = record.read_text().split() if record.exists() else []
    first_pids = [int(p) for p in first[1::2]]
    munged = subprocess.run(["pgrep", "-x", "munged"], capture_output=True, text=True).stdout.split()
    env = {**os.environ, "LABKIT_SLURM_STATE": str(tmp_path / "second"), "LABKIT_SLURM_PORT": "6987"}
    env.pop("SLURM_CONF", None)
    up = subprocess.run(["bash", str(SLURM_SCRIPT), "up"], capture_output=True, text=True, timeout=120, env=env)
    try:
        assert up.returncode == 0, up.stderr
        started = (tmp_path / "second" / "started").read_text().split()
        assert started[0::2] == ["slurmctld", "slurmd"]  # the running munged is used, not restarted
        second_pids = [int(p) for p in started[1::2]]
    finally:
        down = subprocess.run(["bash", str(SLURM_SCRIPT), "down"], capture_output=True, text=True, timeout=60,
                              env=env)
    assert down.returncode == 0, down.stderr
    for pid in second_pids:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    for pid in first_pids + [int(p) for p in munged]:
        assert Path(f"/proc/{pid}").exists(), f"pid {pid} of the first cluster was stopped"
    assert subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
