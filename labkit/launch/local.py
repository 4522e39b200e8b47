"""The local launcher: N worker processes on this machine, rendezvous on 127.0.0.1.

When this process keeps a pool of warm ranks (``labkit.launch.pool.start_pool()``, as the
control panel does), the ranks are taken from it: they have already imported torch and
labkit, so the first step comes seconds sooner, with the same results. Without a pool, or
for the ranks the pool cannot give, each rank is a fresh ``python -m labkit.worker``.
"""

from __future__ import annotations

import os
import signal

from ..registry import LAUNCHERS
from .base import free_port, kill_group, python, rank_env, spawn
from .pool import current_pool


class LocalJob:
    """N ``python -m labkit.worker`` processes, each in its own process group."""

    def __init__(self, config, run):
        env = rank_env(config, run.path)
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                    "WORLD_SIZE": str(config.workers), "LOCAL_WORLD_SIZE": str(config.workers)})
        envs = [dict(env, RANK=str(rank), LOCAL_RANK=str(rank)) for rank in range(config.workers)]
        logs = [run.log_path(rank) for rank in range(config.workers)]
        command = [python(), "-m", "labkit.worker", str(run.path)]
        pool = current_pool()
        self.procs = pool.take(command, envs, logs) if pool is not None else []
        self.warm = len(self.procs)  # ranks that came from the pool
        for rank in range(self.warm, config.workers):
            self.procs.append(spawn(command, envs[rank], logs[rank]))
        warm = f", {self.warm} warm" if self.warm else ""
        self.description = f"{config.workers} local processes (pids {', '.join(str(p.pid) for p in self.procs)}{warm})"

    def rank_codes(self) -> dict[int, int | None]:
        return {rank: p.poll() for rank, p in enumerate(self.procs)}

    def poll(self) -> int | None:
        codes = [p.poll() for p in self.procs]
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c != 0), 0)

    def stop(self, grace: float = 5.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            kill_group(p, grace)


LAUNCHERS.register("local", LocalJob, help="N processes on this machine", backends=("gloo", "nccl"))
