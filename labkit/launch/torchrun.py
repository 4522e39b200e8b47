"""The torchrun launcher: ``torchrun --standalone --nproc-per-node N -m labkit.worker RUN_DIR``.

torchrun (torch.distributed.run) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT for every rank and ends the others when one fails.
"""

from __future__ import annotations

from ..registry import LAUNCHERS
from .base import guarded_rank, kill_group, python, rank_env, spawn


class TorchrunJob:
    def __init__(self, config, run):
        env = rank_env(config, run.path)
        env["LABKIT_RANK_LOGS"] = "1"  # each rank behind its guard, which dies with torchrun's agent
        cmd = [python(), "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc-per-node={config.workers}", "--max-restarts=0",
               "--no-python", *guarded_rank(run.path)]
        self.proc = spawn(cmd, env, run.log_dir / "launcher.log")
        self.description = f"torchrun --nproc-per-node {config.workers} (pid {self.proc.pid})"

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace: float = 5.0) -> None:
        kill_group(self.proc, grace)


LAUNCHERS.register("torchrun", TorchrunJob, help="torchrun --standalone on this machine",
                   backends=("gloo", "nccl"))
