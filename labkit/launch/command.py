"""``labkit launch -n N -- CMD``: run any command as N ranks with labkit.comm ready inside."""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time

from .base import GUARD, free_port, kill_group, share_cores, spawn
from .guard import first_failure

DEFAULT_TIMEOUT_S = 3600.0  # a rank that never ends is ended after an hour unless told otherwise


def check_timeout(value) -> float:
    """``--timeout`` as seconds: a finite number > 0, else ValueError with what is wrong."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a finite number of seconds > 0, got {value}")
    return seconds


def _command_for(launcher: str, n: int, command: list[str], status_dir: str = "") -> list[list[str]] | list[str]:
    from ..comm import mpiexec_path

    if launcher == "mpi":  # each rank behind a guard that makes mpiexec end the job when it fails
        return [mpiexec_path() or "mpiexec", "-n", str(n), sys.executable, GUARD, "--status", status_dir, "--",
                *command]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                "--no-python", *command]
    if launcher == "slurm":
        return ["srun", f"--ntasks={n}", "--kill-on-bad-exit=1", *command]
    return command


def run_command(command: list[str], n: int, launcher: str = "local", backend: str = "gloo",
                timeout: float | None = DEFAULT_TIMEOUT_S) -> int:
    """Run ``command`` as ``n`` ranks; stream their output; end them all if one fails.

    Returns the exit status of the first rank (or launcher) that failed, as the shell
    writes it (128 + N for a rank killed by signal N), 124 on the timeout and 130 on
    Ctrl-C; the temporary directory of the ranks' output is removed. Under torchrun, which
    itself exits 1 whichever rank failed and how, the status is the one its root-cause
    report names (:func:`torchrun_root_cause`); under MPICH's mpiexec, which exits N for a rank
    killed by signal N, it is 128 + N as well (:func:`mpiexec_signal`)."""
    if timeout is not None:
        timeout = check_timeout(timeout)
    env = dict(os.environ, LABKIT_BACKEND=backend, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), PYTHONUNBUFFERED="1")
    if launcher == "slurm":
        env.pop("MASTER_ADDR")  # the first node of the allocation, set by the batch script
        env.pop("LOCAL_WORLD_SIZE")  # srun spreads the ranks over the nodes: SLURM_CPUS_PER_TASK decides
    else:
        share_cores(env, n)  # all n ranks run on this host
    logdir = tempfile.mkdtemp(prefix="labkit-launch-")
    try:
        return _run(command, n, launcher, env, logdir, timeout)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def _run(command, n, launcher, env, logdir, timeout) -> int:
    procs = []
    try:
        if launcher == "local":
            for r in range(n):
                procs.append(spawn(command, dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                   os.path.join(logdir, f"rank-{r}.log")))
            logs = [os.path.join(logdir, f"rank-{r}.log") for r in range(n)]
        else:
            os.mkdir(os.path.join(logdir, "status"))
            procs.append(spawn(_command_for(launcher, n, command, os.path.join(logdir, "status")), env,
                               os.path.join(logdir, "launcher.log")))
            logs = [os.path.join(logdir, "launcher.log")]
    except OSError as e:  # a missing or non-executable command
        for p in procs:
            kill_group(p, grace=1.0)
        name = _command_for(launcher, n, command)[0] if launcher != "local" else command[0]
        print(f"labkit: launch: cannot run {name}: {e.strerror or e}", file=sys.stderr)
        return 126 if isinstance(e, PermissionError) else 127
    stop = threading.Event()
    tails = [threading.Thread(target=_tail, args=(path, f"[{r}] " if launcher == "local" else "", stop),
                              daemon=True) for r, path in enumerate(logs)]
    for t in tails:
        t.start()
    try:
        code = _wait(procs, timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p, grace=3.0)
        time.sleep(0.3)
        stop.set()
        for t in tails:
            t.join(2)
    return _report(_rank_status(code, launcher, logs, logdir))


def _wait(procs, timeout) -> int:
    """Wait until every process ends well (0), one fails (its status), the timeout (124) or
    Ctrl-C (130)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"labkit: launch: timed out after {timeout:g} s; ending all ranks", file=sys.stderr)
                return 124
            time.sleep(0.1)
    except KeyboardInterrupt:
        return 130


def _rank_status(code: int, launcher: str, logs: list[str], logdir: str) -> int:
    """The failed rank's own status behind the launcher's (negative: killed by that signal)."""
    if launcher == "torchrun" and code not in (0, 124, 130):
        code = torchrun_root_cause(logs[0]) or code  # torchrun itself exits 1 whatever the rank's status
    elif launcher == "mpi" and code not in (0, 124, 130):
        first = first_failure(os.path.join(logdir, "status"))  # the guards' records
        if first is not None:
            code = first
        elif code > 0 and mpiexec_signal(logs[0]) == code:
            code = -code  # MPICH's mpiexec exits N for a rank killed by signal N
    return code


def _report(code: int) -> int:
    """Say how a rank failed; the exit status of ``labkit launch``."""
    if code < 0:  # killed by a signal: the shell's way of saying so
        print(f"labkit: launch: a rank failed (killed by signal {-code}, status {128 - code}); the others "
              "were ended", file=sys.stderr)
        return 128 - code
    if code not in (0, 124, 130):
        print(f"labkit: launch: a rank failed (status {code}); the others were ended", file=sys.stderr)
    return code if code < 256 else 1


def _log_tail(log_path: str, size: int = 1 << 20) -> str | None:
    """The last ``size`` bytes of a launcher's log as text (its report is at the end; the ranks
    may have written a lot before it), or None when it cannot be read."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return None


ROOT_CAUSE = "Root Cause (first observed failure)"
EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")


def torchrun_root_cause(log_path: str) -> int | None:
    """The exit status of the first rank that failed under torchrun, read from the "Root Cause
    (first observed failure)" section torchrun writes when it ends (``exitcode  : 7 (pid: ...)``;
    -N for a rank killed by signal N). None when the log holds no such section."""
    text = _log_tail(log_path)
    if text is None:
        return None
    at = text.rfind(ROOT_CAUSE)
    if at < 0:
        return None
    found = EXITCODE.search(text, at)
    if not found:
        return None
    code = int(found.group(1))
    return code or None  # a rank that exited 0 is not a failure: keep torchrun's own status


MPIEXEC_SIGNAL = re.compile(r"TERMINATED WITH THE EXIT STRING: .*\(signal (\d+)\)")


def mpiexec_signal(log_path: str) -> int | None:
    """The signal that killed a rank under MPICH's mpiexec, from the line it writes
    (``YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)``), or None."""
    text = _log_tail(log_path)
    if text is None:
        return None
    found = MPIEXEC_SIGNAL.findall(text)
    return int(found[-1]) if found else None


def _tail(path: str, prefix: str, stop: threading.Event) -> None:
    with open(path, "a+", errors="replace") as f:
        f.seek(0)
        while True:
            line = f.readline()
            if line:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()
            elif stop.is_set():
                return
            else:
                time.sleep(0.05)
