import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
LABKIT = [PYTHON, "-m", "labkit.cli"]


def run_cli(*args, cwd=None, timeout=300, env=None):
    """Run ``labkit ARGS`` in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run([*LABKIT, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def labkit_processes(marker: str) -> list[int]:
    """PIDs of live processes whose command line or environment mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if state == "Z":
            continue
        if marker.encode() in cmd or marker.encode() in env:
            found.append(int(entry.name))
    return found


@pytest.fixture
def no_leftovers(tmp_path):
    """Fails the test if any process that mentions its tmp_path outlives it (and kills them)."""
    yield tmp_path
    import time

    deadline = time.time() + 10
    left = labkit_processes(str(tmp_path))
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = labkit_processes(str(tmp_path))
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind: {left}"
