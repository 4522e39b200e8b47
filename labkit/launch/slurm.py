"""The slurm launcher: a batch script from ``cluster/templates/``, submitted with sbatch.

srun starts the ranks (one per task; SLURM_PROCID is the rank) for the gloo and NCCL
backends; with the mpi backend, mpiexec inside the allocation starts them. The job's
state is followed with ``scontrol show job``; stopping the run cancels the job
(``scancel``), which ends every rank on every node.
"""

from __future__ import annotations

import os
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path

from ..registry import LAUNCHERS
from .base import free_port, guarded_rank

TEMPLATE = Path(__file__).resolve().parents[2] / "cluster" / "templates" / "labkit-train.sbatch"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def _available():
    if not shutil.which("sbatch"):
        return "sbatch not found: this machine is not a SLURM submit host (see cluster/README.md)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=15)
    if probe.returncode != 0:
        return f"SLURM is not answering ({probe.stderr.strip() or 'sinfo failed'}); start it with cluster/local-slurm.sh up"
    return None


def render_script(config, run_dir: Path, port: int) -> str:
    venv_bin = os.path.dirname(sys.executable)
    worker = " ".join(guarded_rank(run_dir))
    if config.backend == "mpi":
        from ..comm import mpiexec_path

        start = f"{mpiexec_path() or 'mpiexec'} -n {config.workers} {worker}"
    else:
        start = f"srun --kill-on-bad-exit=1 {worker}"
    extra = []
    if config.device == "cuda":
        extra.append("#SBATCH --gpus-per-task=1")
    extra += [f"#SBATCH {line}" for line in os.environ.get("LABKIT_SBATCH_EXTRA", "").split(";") if line.strip()]
    return string.Template(TEMPLATE.read_text()).substitute(
        name=run_dir.name[:40], workers=config.workers, run_dir=run_dir,
        time_limit=os.environ.get("LABKIT_SLURM_TIME", "01:00:00"), extra_directives="\n".join(extra),
        venv_bin=venv_bin, backend=config.backend, timeout=config.timeout, port=port,
        workdir=os.getcwd(), start_ranks=start)


class SlurmJob:
    def __init__(self, config, run):
        run_dir = run.path.resolve()
        script = run_dir / "job.sbatch"
        script.write_text(render_script(config, run_dir, free_port()))
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            (run.log_dir / "launcher.log").write_text(out.stdout + out.stderr)
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        self.job_id = out.stdout.strip().split(";")[0]
        self.description = f"SLURM job {self.job_id}"
        self._code = None

    def state(self) -> tuple[str, int | None]:
        out = subprocess.run(["scontrol", "show", "job", self.job_id], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:  # purged from the controller: it ended long ago
            return "COMPLETED", 0
        state = re.search(r"JobState=(\S+)", out.stdout).group(1)
        exit_code = re.search(r"ExitCode=(\d+):(\d+)", out.stdout)
        code = None
        if exit_code:
            code = int(exit_code.group(1)) or (128 + int(exit_code.group(2)) if int(exit_code.group(2)) else 0)
        return state, code

    def poll(self) -> int | None:
        if self._code is None:
            state, code = self.state()
            if state in DONE_STATES:
                self._code = 0 if state == "COMPLETED" else (code or 1)
        return self._code

    def stop(self, grace: float = 5.0) -> None:
        import time

        subprocess.run(["scancel", self.job_id], capture_output=True, timeout=30)
        deadline = time.monotonic() + grace + 30
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)


LAUNCHERS.register("slurm", SlurmJob, help="sbatch a job; srun (or mpiexec) starts the ranks",
                   backends=("gloo", "mpi", "nccl"), available=_available)
