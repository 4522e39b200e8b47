"""The mpi launcher: ``mpiexec -n N python -m labkit.worker RUN_DIR``.

Uses the mpiexec of the mpich wheel in this environment (no system MPI needed). Each
rank reads its rank from PMI_RANK and writes its own ``logs/rank-K.log``; mpiexec's own
output goes to ``logs/launcher.log``. Works with the mpi backend and with gloo (the ranks
then meet at MASTER_ADDR:MASTER_PORT, passed through mpiexec's environment).
"""

from __future__ import annotations

import re
import signal

from ..registry import LAUNCHERS
from .base import free_port, kill_group, python, rank_env, spawn


SIGNALS = {int(s) for s in signal.Signals}


def _available():
    from ..comm import mpiexec_path

    return None if mpiexec_path() else "mpiexec not found (pip install mpich mpi4py)"


class MPIJob:
    def __init__(self, config, run):
        from ..comm import mpiexec_path

        env = rank_env(config, run.path)
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LABKIT_RANK_LOGS": "1",
                    "LOCAL_WORLD_SIZE": str(config.workers)})
        cmd = [mpiexec_path(), "-n", str(config.workers), python(), "-m", "labkit.worker", str(run.path)]
        self.log = run.log_dir / "launcher.log"
        self.proc = spawn(cmd, env, self.log)
        self.description = f"mpiexec -n {config.workers} (pid {self.proc.pid})"

    def poll(self) -> int | None:
        return self.proc.poll()

    def first_failure(self, rank_of_pid: dict[int, int]) -> tuple[int, str] | None:
        """The rank mpiexec saw die first ("BAD TERMINATION ... PID n ... EXIT CODE: c").

        mpiexec ends all the other ranks at once when one dies, so its report is the only
        reliable witness of which rank went first.
        """
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return None
        found = re.search(r"BAD TERMINATION.*?PID (\d+).*?EXIT CODE: (\d+)", text, re.S)
        if not found or int(found.group(1)) not in rank_of_pid:
            return None
        code = int(found.group(2))
        how = f"killed by {signal.Signals(code).name}" if code in SIGNALS else f"exit status {code}"
        return rank_of_pid[int(found.group(1))], how

    def stop(self, grace: float = 5.0) -> None:
        kill_group(self.proc, grace)


LAUNCHERS.register("mpi", MPIJob, help="mpiexec -n N (MPICH from the environment)",
                   backends=("mpi", "gloo", "nccl"), available=_available)
