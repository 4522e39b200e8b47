"""A rank's guard: runs one rank as a child process and reports how it ended.

    python labkit/launch/guard.py RUN_DIR

mpiexec, torchrun and srun end every rank of a job as soon as one dies, all within a
fraction of a second, so from the outside it is hard to tell which rank died first. The
guard sits between the launcher and the rank: it sees its own child die first, writes a
``rank_died`` event to the run's metrics at once, and only then exits, so the launcher
(and its killing of the others) comes after the report. The child is killed with the
guard (PR_SET_PDEATHSIG) and SIGTERM, SIGINT and SIGUSR1 are passed on to it.

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


def main(run_dir: str) -> int:
    # close_fds=False: the rank needs the descriptors its launcher handed down (PMI_FD)
    child = subprocess.Popen([sys.executable, "-m", "labkit.worker", run_dir], close_fds=False,
                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    # SIGUSR1 is how mpiexec -disable-auto-cleanup tells the ranks that one of them died
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda s, f: child.send_signal(s))
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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python labkit/launch/guard.py RUN_DIR")
    sys.exit(main(sys.argv[1]))
