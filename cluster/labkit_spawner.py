"""The course's spawner: batchspawner's SlurmSpawner with profiles and two known problems handled.

Imported by ``cluster/jupyterhub_config.py`` (``c.JupyterHub.spawner_class``). What it adds
to ``batchspawner.SlurmSpawner``:

- **Profiles** (a CPU and a GPU one by default, ``c.LabkitSlurmSpawner.profiles``): the
  spawn page offers them as a choice; the REST API takes ``{"profile": "gpu"}``. Each
  profile sets the job's cores, memory, GPUs (gres), time limit and partition.
- **A job that fails is noticed** (batchspawner #253): while the hub waits for the server
  to report its port, the job's state is followed; a job that ended (an error in the
  prologue, a missing module, a server that crashed) ends the spawn at once with the
  job's state, exit code and the last lines of its log, instead of the hub waiting for
  its start timeout.
- **A job that waits in the queue longer than the hub waits** (batchspawner #88): the
  spawn page shows the job's id, its position in the queue and SLURM's reason while it
  waits; after ``queue_timeout`` seconds (a little under ``start_timeout``) the job is
  cancelled and the spawn ends with a message that says so, rather than leaving a job in
  the queue that would start a server nobody waits for.
- **Stopping a server ends all of it**: ``stop`` cancels the job and waits (``stop_wait``)
  until SLURM has ended it, following it with ``scontrol`` as the hub (no command runs as
  the student once the job is cancelled). The job's batch script ends, as soon as SLURM's
  SIGTERM reaches it (the server runs in the background, so the trap runs at once) and again
  on its way out, every process that still carries the job's id (``SLURM_JOB_ID``): a kernel whose server
  died first, anything started in a new session, a process still dying from SLURM's
  SIGKILL. Under ``proctrack/linuxproc`` (the local cluster, containers) SLURM finds a
  job's processes through their parents only and does not wait for them to exit, so such
  processes would otherwise outlive the job; with ``proctrack/cgroup`` this only makes
  the job's end cleaner.
- The server listens on ``bind_ip`` (``0.0.0.0`` by default; ``127.0.0.1`` on the one-node
  local cluster) and the hub reaches it on the host SLURM names, or on
  ``state_exechost_exp`` when that is set.
"""

from __future__ import annotations

import asyncio
import html
import shlex
import time
from pathlib import Path

from batchspawner import JobStatus, SlurmSpawner
from traitlets import Dict, Float, Unicode, default

DEFAULT_PROFILES = {
    "cpu": {"display": "CPU: 2 cores, 4 GB, 4 hours", "nprocs": "2", "memory": "4G",
            "runtime": "04:00:00"},
    "gpu": {"display": "GPU: 1 GPU, 4 cores, 16 GB, 4 hours", "nprocs": "4", "memory": "16G",
            "gres": "gpu:1", "runtime": "04:00:00"},
}
# the request each profile may set, and the batchspawner trait it sets
PROFILE_KEYS = {"nprocs": "req_nprocs", "memory": "req_memory", "gres": "req_gres",
                "runtime": "req_runtime", "partition": "req_partition", "options": "req_options",
                "prologue": "req_prologue", "reservation": "req_reservation"}
LOG_LINES = 15  # how much of a failed job's log the spawn page shows
# a job in one of these states has not ended yet (scontrol's JobState)
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}

# batchspawner's SlurmSpawner script, with the end of the job's processes on the way out.
# (A jinja2 template: no "{" followed by "#" in it, which would open a jinja2 comment.)
BATCH_SCRIPT = """#!/bin/bash
#SBATCH --output={{homedir}}/jupyterhub_slurmspawner_%j.log
#SBATCH --job-name=spawner-jupyterhub
#SBATCH --chdir={{homedir}}
#SBATCH --export={{keepvars}}
#SBATCH --get-user-env=L
{% if partition  %}#SBATCH --partition={{partition}}
{% endif %}{% if runtime    %}#SBATCH --time={{runtime}}
{% endif %}{% if memory     %}#SBATCH --mem={{memory}}
{% endif %}{% if gres       %}#SBATCH --gres={{gres}}
{% endif %}{% if nprocs     %}#SBATCH --cpus-per-task={{nprocs}}
{% endif %}{% if reservation%}#SBATCH --reservation={{reservation}}
{% endif %}{% if options    %}#SBATCH {{options}}{% endif %}

set -euo pipefail

# On the way out (the server ended, or the job was cancelled): end every process of this
# job that is still alive. They are found by the job's id in their environment, so that
# those that left the server's process tree (a kernel whose server died first, a process
# in a new session), which SLURM's proctrack/linuxproc no longer sees, are found too.
labkit_job_pids() {  # (run in a subshell: its own pid is $BASHPID; a zombie's environ is empty)
    local files pid
    files=(/proc/[0-9]*/environ)
    for pid in $(grep -lzx "SLURM_JOB_ID=$SLURM_JOB_ID" "${files[@]}" 2>/dev/null || true); do
        pid="${pid#/proc/}"; pid="${pid%/environ}"
        [ "$pid" != $$ ] && [ "$pid" != "$BASHPID" ] && echo "$pid"
    done
    return 0
}
labkit_end_job() {  # SIGTERM, 2 s, SIGKILL, 5 s (within SLURM's KillWait when cancelled)
    local sig waits pids
    [ -n "${SLURM_JOB_ID:-}" ] || return 0
    for sig in TERM KILL; do
        pids="$(labkit_job_pids)"
        [ -z "$pids" ] && return 0
        echo "ending this job's processes left ($sig): $(echo $pids)"
        kill -s "$sig" $pids 2>/dev/null || true
        waits=8; [ "$sig" = KILL ] && waits=20
        while [ "$waits" -gt 0 ] && [ -n "$(labkit_job_pids)" ]; do sleep 0.25; waits=$((waits - 1)); done
    done
    return 0
}
trap labkit_end_job EXIT
# The server runs in the background and the script waits for it, so that a SIGTERM (scancel)
# runs the cleanup at once, well within SLURM's KillWait, rather than after the server's own
# shutdown: bash runs a trap only once its foreground command has ended.
trap 'echo SIGTERM received; labkit_end_job' TERM
{{prologue}}
{% if srun %}{{srun}} {% endif %}{{cmd}} &
wait $!
echo "jupyterhub-singleuser ended gracefully"
{{epilogue}}
"""


class LabkitSlurmSpawner(SlurmSpawner):
    profiles = Dict(DEFAULT_PROFILES, help="name -> {display, nprocs, memory, gres, runtime, "
                                          "partition, options, prologue, reservation}").tag(config=True)
    default_profile = Unicode("cpu", help="the profile of a spawn that names none").tag(config=True)
    bind_ip = Unicode("0.0.0.0", help="the address the user's server listens on").tag(config=True)
    batch_script = Unicode(BATCH_SCRIPT, help="the server's batch script (a jinja2 template; "
                           "see batchspawner's SlurmSpawner)").tag(config=True)
    stop_wait = Float(30.0, help="seconds stop() waits for the cancelled job to end (SLURM's "
                                 "KillWait and a margin)").tag(config=True)
    queue_timeout = Float(help="seconds a job may wait in the queue before the spawn gives up "
                               "(default: start_timeout - 15)").tag(config=True)

    @default("queue_timeout")
    def _queue_timeout_default(self):
        return max(5.0, self.start_timeout - 15.0)

    # --- profiles -------------------------------------------------------------------------
    @default("options_form")
    def _options_form_default(self):
        rows = []
        for i, (name, profile) in enumerate(self.profiles.items()):
            checked = " checked" if name == self.default_profile or (i == 0 and self.default_profile not in self.profiles) else ""
            label = html.escape(profile.get("display", name))
            rows.append(f'<label><input type="radio" name="profile" value="{html.escape(name)}"{checked}> '
                        f"{label}</label><br>")
        return "<p>Where should your server run?</p>" + "".join(rows)

    def options_from_form(self, formdata):
        return {"profile": formdata.get("profile", [self.default_profile])[0]}

    def apply_profile(self) -> str:
        name = (self.user_options or {}).get("profile") or self.default_profile
        if name not in self.profiles:
            raise ValueError(f"unknown profile {name!r}; choose one of: {', '.join(self.profiles)}")
        for key, value in self.profiles[name].items():
            if key in PROFILE_KEYS:
                setattr(self, PROFILE_KEYS[key], str(value))
        return name

    # --- the job --------------------------------------------------------------------------
    def log_path(self) -> Path:
        return Path(self.req_homedir) / f"jupyterhub_slurmspawner_{self.job_id}.log"

    async def _scontrol(self) -> dict:
        """The job's fields from ``scontrol show job`` (empty once SLURM forgot it)."""
        proc = await asyncio.create_subprocess_exec(
            "scontrol", "-o", "show", "job", self.job_id,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        fields = {}
        for item in out.decode(errors="replace").split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    async def queue_position(self) -> tuple[int, int] | None:
        """(position, number of waiting jobs) in the partition's queue, highest priority first."""
        args = ["squeue", "-h", "-t", "PENDING", "-S", "-p,i", "-o", "%i"]
        if self.req_partition:
            args += ["-p", self.req_partition]
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        ids = out.decode().split()
        if self.job_id not in ids:
            return None
        return ids.index(self.job_id) + 1, len(ids)

    async def job_failure(self) -> str:
        """One paragraph: how the job ended and the end of its log."""
        fields = await self._scontrol()
        state = fields.get("JobState", "gone from the queue")
        reason = fields.get("Reason", "")
        code = fields.get("ExitCode", "")
        head = f"The server's SLURM job {self.job_id} ended ({state}"
        head += f", exit code {code}" if code and code != "0:0" else ""
        head += f", reason {reason}" if reason and reason != "None" else ""
        head += ") before the server started."
        try:
            lines = self.log_path().read_text(errors="replace").splitlines()[-LOG_LINES:]
            tail = "\n".join(lines) if lines else "(empty)"
            return f"{head} The end of {self.log_path()}:\n{tail}"
        except OSError:
            return f"{head} Its log {self.log_path()} cannot be read."

    async def queue_message(self) -> str:
        fields = await self._scontrol()
        where = await self.queue_position()
        text = f"SLURM job {self.job_id} is waiting in the queue"
        if where:
            text += f" (position {where[0]} of {where[1]})"
        reason = fields.get("Reason")
        if reason and reason != "None":
            text += f", reason: {reason}"
        return text

    async def start(self):
        profile = self.apply_profile()
        self.ip = self.bind_ip
        self.port = 0
        if self.server:
            self.server.port = self.port
        await self.submit_batch_script()
        if not self.job_id:
            raise RuntimeError("the server's job was not submitted (sbatch printed no job id)")
        self.log.info("server job %s (profile %s) submitted for %s", self.job_id, profile, self.user.name)
        queued_at = time.monotonic()
        while True:
            status = await self.query_job_status()
            if status == JobStatus.RUNNING:
                break
            if status not in (JobStatus.PENDING, JobStatus.UNKNOWN):
                failure = await self.job_failure()
                self.clear_state()
                raise RuntimeError(failure)
            if time.monotonic() - queued_at > self.queue_timeout:
                message = await self.queue_message()
                job = self.job_id
                await self.cancel_batch_job()
                self.clear_state()
                raise RuntimeError(
                    f"{message} after {self.queue_timeout:.0f} s, longer than the hub waits; job {job} was "
                    "cancelled. Try again later, or choose a profile that asks for less (the CPU one).")
            await asyncio.sleep(self.startup_poll_interval)
        self.ip = self.state_gethost()
        while self.port == 0:  # batchspawner-singleuser reports its port to the hub's API
            await asyncio.sleep(self.startup_poll_interval)
            status = await self.query_job_status()
            if status not in (JobStatus.RUNNING, JobStatus.UNKNOWN) and self.port == 0:
                failure = await self.job_failure()
                self.clear_state()
                raise RuntimeError(failure)
        self.db.commit()
        self.log.info("server job %s started at %s:%s", self.job_id, self.ip, self.port)
        return self.ip, self.port

    async def job_state(self) -> str:
        """The job's state as SLURM has it now ("" once SLURM has forgotten it)."""
        return (await self._scontrol()).get("JobState", "") if self.job_id else ""

    async def stop(self, now=False):
        """Cancel the server's job, then (unless ``now``) wait until SLURM has ended it: its
        processes signalled, its batch script gone (which ends what the server left behind).
        The job is followed with scontrol as the hub, so that nothing runs as the student
        after the cancel."""
        if not self.job_id:
            return
        job = self.job_id
        self.log.info("stopping server job %s of %s", job, self.user.name)
        try:
            await self.cancel_batch_job()
        except RuntimeError as error:  # scancel of a job that has already ended
            self.log.info("scancel %s: %s", job, error)
        if now:
            return
        deadline = time.monotonic() + self.stop_wait
        state = await self.job_state()
        while state in ACTIVE_STATES and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            state = await self.job_state()
        if state in ACTIVE_STATES:
            self.log.warning("server job %s is still %s %.0f s after scancel", job, state, self.stop_wait)
        else:
            self.log.info("server job %s ended (%s)", job, state or "gone from SLURM")

    async def progress(self):
        while True:
            if self.state_ispending():
                yield {"message": await self.queue_message()}
            elif self.state_isrunning():
                yield {"message": f"SLURM job {self.job_id} is running; waiting for the server to answer"}
                return
            elif self.job_id:
                yield {"message": f"SLURM job {self.job_id}: {shlex.quote(self.job_status or 'submitted')}"}
            else:
                yield {"message": "submitting the server's job to SLURM"}
            await asyncio.sleep(1)
