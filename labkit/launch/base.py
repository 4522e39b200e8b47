"""What every launcher shares: starting processes so that they can be stopped for sure."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def die_with_parent():
    """Ask the kernel to SIGKILL this process when its parent exits (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def spawn(cmd: list[str], env: dict, log_path, cwd=None) -> subprocess.Popen:
    """Start ``cmd`` in a new process group, output to ``log_path``.

    The child is killed if this process dies (even by SIGKILL), and its whole process
    group can be ended with :func:`kill_group`.
    """
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=die_with_parent if sys.platform == "linux" else None)
    finally:
        log.close()


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL whatever is left after ``grace`` s."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.05)
    proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python() -> str:
    return sys.executable


GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard.py")


def guarded_rank(run_dir) -> list[str]:
    """The command line of one rank behind its guard (see ``guard.py``), for mpiexec, torchrun, srun."""
    return [sys.executable, GUARD, str(run_dir)]


def host_cores() -> int:
    """The cores this process may run on (its affinity, not the whole machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def share_cores(env: dict, ranks_on_host: int) -> dict:
    """Give each of ``ranks_on_host`` ranks its share of the cores: OMP_NUM_THREADS =
    cores / ranks (at least 1), which torch reads for its thread pool, unless the user
    set OMP_NUM_THREADS. Two ranks with torch's default of one thread per core each fight
    over every core (torchrun sets OMP_NUM_THREADS=1 for the same reason)."""
    env.setdefault("OMP_NUM_THREADS", str(max(1, host_cores() // max(1, ranks_on_host))))
    return env


def rank_env(config, run_dir) -> dict:
    """The environment every rank shares: backend, timeout, where to log, its threads."""
    env = dict(os.environ)
    env.update({
        "LABKIT_BACKEND": config.backend, "LABKIT_TIMEOUT": str(config.timeout),
        "LABKIT_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1",
        "LABKIT_LOCAL_WORLD": str(config.workers),
    })
    return share_cores(env, config.workers)


def signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode > 128 and returncode - 128 in {s.value for s in signal.Signals}:
        return f"exit status {returncode} ({signal.Signals(returncode - 128).name})"
    return f"exit status {returncode}"
