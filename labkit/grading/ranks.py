"""Running a student's script as real ranks, through the course's launcher setting.

Assignments whose code runs on several ranks (ps4_communication's ring and tree allreduce)
start them with ``labkit launch``, on the launcher the course is set to use:

    LABKIT_LAUNCHER=local     (the default) N processes on this machine
    LABKIT_LAUNCHER=slurm     srun inside a SLURM allocation (a cluster's JupyterHub)
    LABKIT_LAUNCHER=mpi | torchrun

The student's notebook, the visible tests and the hidden tests all go through
:func:`run_ranks`, so a course on a cluster sets the variable once (in the JupyterHub spawner's
environment, or before ``make grade``) and every run follows. See docs/grading.md.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

LAUNCHER_VARIABLE = "LABKIT_LAUNCHER"
LAUNCHERS = ("local", "mpi", "torchrun", "slurm")


def course_launcher():
    """The launcher the course uses: $LABKIT_LAUNCHER, else ``local``."""
    launcher = os.environ.get(LAUNCHER_VARIABLE, "").strip() or "local"
    if launcher not in LAUNCHERS:
        raise ValueError(f"{LAUNCHER_VARIABLE}={launcher!r} is not a launcher; "
                         f"choose one of {', '.join(LAUNCHERS)}")
    return launcher


def _labkit_command():
    beside = Path(sys.executable).parent / "labkit"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("labkit")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from labkit.cli import main; sys.exit(main())"]


def run_ranks(n, script, *args, timeout=60):
    """Run ``python SCRIPT ARGS`` as ``n`` ranks (``labkit launch``); return (exit status, output).

    The ranks start in the current folder, with it on their import path, so a module the
    notebook wrote there (``%%writefile``) is importable on every rank. Past ``timeout``
    seconds all ranks are ended (exit status 124).
    """
    if not Path(script).is_file():
        raise FileNotFoundError(f"{script} not found in {Path.cwd().name}/")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    command = [*_labkit_command(), "launch", "-n", str(n), "--launcher", course_launcher(),
               "--timeout", str(timeout), "--", sys.executable, str(script), *map(str, args)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout + 30)
    except subprocess.TimeoutExpired as expired:
        return 124, (expired.stdout or "") + (expired.stderr or "")
    return done.returncode, done.stdout + done.stderr
