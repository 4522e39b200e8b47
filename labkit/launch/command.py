"""``labkit launch -n N -- CMD``: run any command as N ranks with labkit.comm ready inside."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

from .base import free_port, kill_group, share_cores, spawn


def _command_for(launcher: str, n: int, command: list[str]) -> list[list[str]] | list[str]:
    from ..comm import mpiexec_path

    if launcher == "mpi":
        return [mpiexec_path() or "mpiexec", "-n", str(n), *command]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                "--no-python", *command]
    if launcher == "slurm":
        return ["srun", f"--ntasks={n}", "--kill-on-bad-exit=1", *command]
    return command


def run_command(command: list[str], n: int, launcher: str = "local", backend: str = "gloo",
                timeout: float | None = None) -> int:
    """Run ``command`` as ``n`` ranks; stream their output; end them all if one fails."""
    env = dict(os.environ, LABKIT_BACKEND=backend, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), PYTHONUNBUFFERED="1")
    if launcher == "slurm":
        env.pop("MASTER_ADDR")  # the first node of the allocation, set by the batch script
        env.pop("LOCAL_WORLD_SIZE")  # srun spreads the ranks over the nodes: SLURM_CPUS_PER_TASK decides
    else:
        share_cores(env, n)  # all n ranks run on this host
    logdir = tempfile.mkdtemp(prefix="labkit-launch-")
    if launcher == "local":
        procs = [spawn(command, dict(env, RANK=str(r), LOCAL_RANK=str(r)), os.path.join(logdir, f"rank-{r}.log"))
                 for r in range(n)]
        logs = [os.path.join(logdir, f"rank-{r}.log") for r in range(n)]
    else:
        procs = [spawn(_command_for(launcher, n, command), env, os.path.join(logdir, "launcher.log"))]
        logs = [os.path.join(logdir, "launcher.log")]
    stop = threading.Event()
    tails = [threading.Thread(target=_tail, args=(path, f"[{r}] " if launcher == "local" else "", stop),
                              daemon=True) for r, path in enumerate(logs)]
    for t in tails:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                code = failed[0]
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"labkit: launch: timed out after {timeout:.0f} s; ending all ranks", file=sys.stderr)
                code = 124
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        code = 130
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p, grace=3.0)
        time.sleep(0.3)
        stop.set()
        for t in tails:
            t.join(2)
    if code not in (0, 124, 130):
        print(f"labkit: launch: a rank failed (status {code}); the others were ended", file=sys.stderr)
    return 0 if code == 0 else (code if 0 < code < 256 else 1)


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
