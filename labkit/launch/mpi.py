"""The mpi launcher: ``mpiexec -n N python -m labkit.worker RUN_DIR``.

Uses the mpiexec of the mpich wheel in this environment (no system MPI needed). Each
rank reads its rank from PMI_RANK and writes its own ``logs/rank-K.log``; mpiexec's own
output goes to ``logs/launcher.log``. Works with the mpi backend and with gloo (the ranks
then meet at MASTER_ADDR:MASTER_PORT, passed through mpiexec's environment).
"""

from __future__ import annotations

from ..registry import LAUNCHERS, SYNC_MODES
from .base import free_port, guarded_rank, kill_group, rank_env, spawn


def _available():
    from ..comm import mpiexec_path

    return None if mpiexec_path() else "mpiexec not found (pip install mpich mpi4py)"


class MPIJob:
    def __init__(self, config, run):
        from ..comm import mpiexec_path

        env = rank_env(config, run.path)
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LABKIT_RANK_LOGS": "1",
                    "LOCAL_WORLD_SIZE": str(config.workers)})
        # When a rank dies, mpiexec ends all the others: an MPI job lives or dies as a
        # whole. Modes that survive the loss of a worker ask it not to
        # (-disable-auto-cleanup); the run's monitor still ends the job when the master
        # dies. Each rank runs behind its guard, which reports its death first.
        survives = SYNC_MODES.entry(config.sync).meta.get("survives_worker_loss", False)
        cmd = [mpiexec_path(), *(["-disable-auto-cleanup"] if survives else []),
               "-n", str(config.workers), *guarded_rank(run.path)]
        self.proc = spawn(cmd, env, run.log_dir / "launcher.log")
        self.description = f"mpiexec -n {config.workers} (pid {self.proc.pid})"

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace: float = 5.0) -> None:
        kill_group(self.proc, grace)


LAUNCHERS.register("mpi", MPIJob, help="mpiexec -n N (MPICH from the environment)",
                   backends=("mpi", "gloo", "nccl"), available=_available)
