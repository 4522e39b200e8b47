"""Finding and ending every process a graded notebook started.

nbgrader shuts down the kernel it started and nothing else (nbgrader #483): a student's cell that
starts a server, a worker pool or a ``sleep 1000`` in a new session (setsid, a double fork) leaves
it running after grading. Sessions and process groups cannot catch those, but the environment
can: a process starts with a copy of its parent's. So each grading run gets a fresh token in its
environment, and afterwards every process whose environment (``/proc/<pid>/environ``, Linux)
carries that token is stopped, then killed.
"""

import os
import signal
import time
import uuid
from pathlib import Path

from ..runs import process_alive

TOKEN_VARIABLE = "LABKIT_GRADING_TOKEN"


def new_token():
    """A fresh token, to put in the environment of one grading run as TOKEN_VARIABLE."""
    return uuid.uuid4().hex


def processes_with_token(token):
    """The ids of the live processes whose environment carries ``TOKEN_VARIABLE=token``."""
    entry = f"{TOKEN_VARIABLE}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if entry in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone already, or not ours to read
            continue
    return found


def kill_processes_with_token(token, rounds=50):
    """Kill every process carrying the token; return how many there were.

    Each round stops (SIGSTOP) the ones found, so none of them can fork while the search goes
    on; when a round finds no new one, all of them are killed.
    """
    stopped = set()
    for _ in range(rounds):
        new = [pid for pid in processes_with_token(token) if pid not in stopped]
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        stopped.update(new)
        time.sleep(0.01)
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    _wait_gone(stopped)
    return len(stopped)


def _wait_gone(pids, timeout=10.0):
    """Wait (up to ``timeout`` s) until each killed process has died: a SIGKILL is delivered
    asynchronously, and a process that still runs a moment later would be found again."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < deadline:
        left = {pid for pid in left if process_alive({"pid": pid})}
        if left:
            time.sleep(0.01)


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
