"""A rank's guard: runs one rank as a child process and reports how it ended.

    python labkit/launch/guard.py RUN_DIR
    python labkit/launch/guard.py --status DIR -- COMMAND...

mpiexec, torchrun and srun end every rank of a job as soon as one dies, all within a
fraction of a second, so from the outside it is hard to tell which rank died first. The
guard sits between the launcher and the rank: it sees its own child die first, writes a
``rank_died`` event to the run's metrics at once, and only then exits, so the launcher
(and its killing of the others) comes after the report. The child is killed with the
guard (PR_SET_PDEATHSIG) and SIGTERM, SIGINT and SIGUSR1 are passed on to it.

The second form guards a rank of ``labkit launch --launcher mpi -- COMMAND``. MPICH's mpiexec
ends the other ranks when one dies abnormally (a signal), but after a plain ``exit(7)`` it
waits for them, and ranks blocked on the one that left would wait until ``--timeout``. So
when its child fails, this guard writes the child's status and the time to ``DIR/rank-K``
and then dies by a signal itself (the child's, or SIGKILL for an exit status), which makes
mpiexec end the job; ``labkit launch`` reads back the status of the first rank that failed.

This file is run by path and imports only the standard library, so that it starts in
milliseconds and never loads torch.
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time

RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
CLEAN_EXITS = (0, 1, 143)  # finished, failed with its own error event, stopped


def env_rank() -> int:
    for name in RANK_VARS:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return 0


def _die_with_parent():
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _run_child(command: list) -> subprocess.Popen:
    """Start the rank as this guard's child, dying with it; pass the launcher's signals on."""
    # close_fds=False: the rank needs the descriptors its launcher handed down (PMI_FD)
    child = subprocess.Popen(command, close_fds=False,
                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    # SIGUSR1 is how mpiexec -disable-auto-cleanup tells the ranks that one of them died
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda s, f: child.send_signal(s))
    return child


def main(run_dir: str) -> int:
    child = _run_child([sys.executable, "-m", "labkit.worker", run_dir])
    code = child.wait()
    if code not in CLEAN_EXITS:
        with open(os.path.join(run_dir, "config.json")) as f:
            start = json.load(f)["start_time"]
        record = {"t": time.time() - start, "kind": "event", "event": "rank_died", "rank": env_rank(),
                  "detail": how(code), "pid": child.pid, "host": socket.gethostname()}
        fd = os.open(os.path.join(run_dir, "metrics.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
        finally:
            os.close(fd)
    return code if code >= 0 else 128 - code


def guard_command(status_dir: str, command: list) -> int:
    """Run ``command``; if it fails, record how in ``status_dir`` and die by a signal."""
    try:
        code = _run_child(command).wait()
    except OSError as e:
        print(f"labkit: launch: cannot run {command[0]}: {e.strerror or e}", file=sys.stderr)
        code = 126 if isinstance(e, PermissionError) else 127
    if code == 0:
        return 0
    path = os.path.join(status_dir, f"rank-{env_rank()}")
    with open(path + ".tmp", "w") as f:
        f.write(f"{code} {time.time():.6f}\n")
    os.replace(path + ".tmp", path)
    sys.stdout.flush()
    sys.stderr.flush()
    sig = -code if code < 0 else signal.SIGKILL
    if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    return 128 + int(sig)  # not reached for a deadly signal


def first_failure(status_dir: str) -> int | None:
    """The status of the rank that failed first, as ``guard_command`` recorded it (-N: killed
    by signal N), or None when no rank recorded a failure."""
    found = []
    try:
        names = [n for n in os.listdir(status_dir) if n.startswith("rank-") and not n.endswith(".tmp")]
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(status_dir, name)) as f:
                code, when = f.read().split()
            found.append((float(when), int(code)))
        except (OSError, ValueError):
            continue
    return min(found)[1] if found else None


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--status" and sys.argv[3] == "--":
        sys.exit(guard_command(sys.argv[2], sys.argv[4:]))
    if len(sys.argv) != 2:
        sys.exit("usage: python labkit/launch/guard.py RUN_DIR | --status DIR -- COMMAND...")
    sys.exit(main(sys.argv[1]))
