"""Launchers: start the N ranks of a run and watch them until they end.

    run = labkit.launch(RunConfig(workers=4))    # returns at once
    run.status, run.metrics(), run.wait(), run.stop()

Whatever the launcher (local processes, mpiexec, torchrun, SLURM), the same run
directory comes out. ``run.py`` holds the :class:`Run` handle and its monitor,
``progress.py`` the progress bar, ``command.py`` ``labkit launch -- CMD``.
"""

from . import local, mpi, slurm, torchrun  # noqa: F401 - register the launchers
from .progress import ProgressBar
from .run import Run, RunResult, launch, prepare_run_dir, train

__all__ = ["Run", "RunResult", "ProgressBar", "launch", "prepare_run_dir", "train"]
