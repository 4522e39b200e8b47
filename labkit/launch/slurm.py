"""The slurm launcher: a batch script from ``cluster/templates/``, submitted with sbatch.

srun starts the ranks (one per task; SLURM_PROCID is the rank) for the gloo and NCCL
backends; with the mpi backend, mpiexec inside the allocation starts them. The job's
state is followed with ``scontrol show job`` (at most every ``POLL_S`` seconds); while it
waits in the queue, :meth:`SlurmJob.queue_status` says where (its position among the
partition's waiting jobs, and SLURM's reason), which the control panel shows. Stopping
the run cancels the job (``scancel``), queued or running, which ends every rank on every
node.

sbatch is called without the ``SLURM_*`` variables of the caller's own job (a notebook
server that is itself a SLURM job, as under the course's JupyterHub): inherited, they
would describe the server's allocation to the training job's srun (``--cpus-per-task``
and the like) and make it ask for what its own allocation does not have.
"""

from __future__ import annotations

import os
import re
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

from ..registry import LAUNCHERS
from .base import free_port, guarded_rank

TEMPLATE = Path(__file__).resolve().parents[2] / "cluster" / "templates" / "labkit-train.sbatch"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
POLL_S = 0.5  # the job's state is asked of SLURM at most this often
# variables of the caller's own job that must not reach the training job (SLURM_CONF does)
INHERITED = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


def submit_env() -> dict:
    """The environment sbatch runs in: the caller's, without its own job's SLURM settings."""
    return {k: v for k, v in os.environ.items() if k == "SLURM_CONF" or not k.startswith(INHERITED)}


def _fields(text: str) -> dict:
    """``Key=Value`` pairs of ``scontrol -o show job`` (the first of each key)."""
    fields = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if sep:
            fields.setdefault(key, value)
    return fields


def queue_position(job_id: str, partition: str | None = None) -> tuple[int, int] | None:
    """(position, number of waiting jobs) of ``job_id`` among the pending jobs of its
    partition, highest priority first (SLURM's own order); None once it is not pending."""
    args = ["squeue", "-h", "-t", "PENDING", "-S", "-p,i", "-o", "%i"]
    if partition:
        args += ["-p", partition]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    ids = out.stdout.split()
    if job_id not in ids:
        return None
    return ids.index(job_id) + 1, len(ids)


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
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                             timeout=60, env=submit_env())
        if out.returncode != 0:
            (run.log_dir / "launcher.log").write_text(out.stdout + out.stderr)
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        self.job_id = out.stdout.strip().split(";")[0]
        self.description = f"SLURM job {self.job_id}"
        self._code = None
        self._asked = 0.0  # when SLURM was last asked
        self._queue = {"job_id": self.job_id, "state": "PENDING", "position": None, "waiting": None,
                       "reason": None, "node": None}

    def state(self) -> tuple[str, int | None]:
        """(JobState, exit code) from ``scontrol show job``; also refreshes :meth:`queue_status`."""
        out = subprocess.run(["scontrol", "-o", "show", "job", self.job_id], capture_output=True, text=True,
                             timeout=30)
        if out.returncode != 0:  # purged from the controller: it ended long ago
            self._queue = {**self._queue, "state": "COMPLETED", "position": None, "waiting": None}
            return "COMPLETED", 0
        fields = _fields(out.stdout)
        state = fields.get("JobState", "UNKNOWN")
        exit_code = re.match(r"(\d+):(\d+)", fields.get("ExitCode", ""))
        code = None
        if exit_code:
            code = int(exit_code.group(1)) or (128 + int(exit_code.group(2)) if int(exit_code.group(2)) else 0)
        where = queue_position(self.job_id, fields.get("Partition")) if state == "PENDING" else None
        reason = fields.get("Reason")
        self._queue = {  # replaced whole: readers on other threads see one state or the next
            "job_id": self.job_id, "state": state, "position": where[0] if where else None,
            "waiting": where[1] if where else None,
            "reason": None if reason in (None, "None", "(null)") else reason,
            "node": None if fields.get("NodeList") in (None, "(null)", "") else fields["NodeList"]}
        return state, code

    def queue_status(self) -> dict:
        """Where the job is, as last seen by :meth:`poll` (no call to SLURM here, so that the
        panel can ask from the kernel's event loop): ``job_id``, ``state`` (PENDING,
        RUNNING, ...), ``position`` and ``waiting`` (its place among the partition's
        pending jobs, and how many there are; None unless pending), ``reason`` (SLURM's:
        Resources, Priority, JobHeldUser...), ``node`` (where it runs)."""
        return dict(self._queue)

    def poll(self) -> int | None:
        if self._code is None and time.monotonic() - self._asked >= POLL_S:
            self._asked = time.monotonic()
            state, code = self.state()
            if state in DONE_STATES:
                self._code = 0 if state == "COMPLETED" else (code or 1)
        return self._code

    def stop(self, grace: float = 5.0) -> None:
        subprocess.run(["scancel", self.job_id], capture_output=True, timeout=30)
        deadline = time.monotonic() + grace + 30
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)


LAUNCHERS.register("slurm", SlurmJob, help="sbatch a job; srun (or mpiexec) starts the ranks",
                   backends=("gloo", "mpi", "nccl"), available=_available)
