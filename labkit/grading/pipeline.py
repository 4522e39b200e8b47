"""The instructor's grading pipeline over an nbgrader course directory (``make grade``).

Every step is nbgrader's own command or API on nbgrader's own layout:

1. find the submissions, ``submitted/<student>/<assignment>/<notebook>.ipynb``;
2. ``nbgrader generate_assignment --force`` for each assignment handed in: the release, and the
   gradebook's copy of the instructor's cells (created on the first run) that autograding
   restores test cells from;
3. add every student found to the gradebook;
4. ``nbgrader autograde``, one notebook per run, each run in a process of its own (a fork of
   this one: nbgrader is imported once), with limits;
5. ``nbgrader generate_feedback --force``;
6. the score table (scores.py), printed and written as CSV.

Each autograde run gets a wall-clock limit (``GradingLimits.notebook_timeout``; past it the run is
killed and the notebook scores zero), an address-space limit inherited by the kernel and all it
starts (``GradingLimits.memory_limit_mb``; a memory blowup becomes a MemoryError in the
student's cell), and a fresh token in its environment: when the run ends every process carrying
it, whatever session it moved to, is killed (processes.py). Inside the run, GuardedExecute
(execute.py) keeps a dead or stuck kernel from stopping the notebook or passing its tests.
"""

import multiprocessing
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbgrader.api import Gradebook
from nbgrader.coursedir import CourseDirectory
from sqlalchemy.exc import SAWarning
from traitlets import Integer
from traitlets.config import Configurable, PyFileConfigLoader

from .processes import TOKEN_VARIABLE, kill_processes_with_token, new_token
from .scores import format_table, score_rows, write_csv

CONFIG_FILE = "nbgrader_config.py"


class GradingError(Exception):
    """Something that stops the pipeline; the message is one line for the instructor."""


class GradingLimits(Configurable):
    """Limits put around each ``nbgrader autograde`` run (set in nbgrader_config.py)."""

    notebook_timeout = Integer(
        600, help="Wall-clock seconds for grading one notebook; past it the run is killed."
    ).tag(config=True)
    memory_limit_mb = Integer(
        4096, help="Address-space limit (MiB) of the run and everything it starts; 0: none."
    ).tag(config=True)


@dataclass(frozen=True)
class Submission:
    """What one student handed in for one assignment."""

    student: str
    assignment: str
    notebooks: tuple  # the assignment's notebooks (ids) that were handed in
    missing: tuple  # the assignment's notebooks that were not
    extra_files: tuple  # anything else in the folder, relative to it


@dataclass
class NotebookRun:
    """How grading one submitted notebook went."""

    student: str
    assignment: str
    notebook: str
    seconds: float = 0.0
    problem: str = ""  # why it was not graded, or "" when it was
    leftovers: int = 0  # processes it left behind, killed afterwards
    notes: list = field(default_factory=list)


class Course:
    """An nbgrader course directory and its configuration."""

    def __init__(self, root):
        root = Path(root)
        if not root.is_dir():
            raise GradingError(f"course directory {root} not found")
        if not (root / CONFIG_FILE).is_file():
            raise GradingError(f"{root} is not an nbgrader course directory (no {CONFIG_FILE})")
        self.root = root.resolve()
        try:
            config = PyFileConfigLoader(CONFIG_FILE, path=str(self.root)).load_config()
        except Exception as error:
            raise GradingError(f"cannot read {root / CONFIG_FILE}: {error}") from None
        self.dirs = CourseDirectory(config=config, root=str(self.root))
        self.limits = GradingLimits(config=config)
        self.kernel_name = config.Execute.get("kernel_name", "")

    def path(self, step, student=".", assignment="."):
        """A folder of nbgrader's layout, e.g. path("submitted", "alice", "ps0_warmup")."""
        step_dir = getattr(self.dirs, f"{step}_directory")
        return Path(self.dirs.format_path(step_dir, student, assignment))

    def notebooks(self, assignment):
        """The ids of the assignment's notebooks, from source/."""
        return sorted(p.stem for p in self.path("source", ".", assignment).glob("*.ipynb"))

    def check_kernel(self):
        if not self.kernel_name:
            return
        try:
            KernelSpecManager().get_kernel_spec(self.kernel_name)
        except NoSuchKernel:
            raise GradingError(
                f"the grading kernel {self.kernel_name!r} is not installed (make setup installs it)"
            ) from None

    def find_submissions(self, only=()):
        """Every submitted/<student>/<assignment>/ of an assignment in source/."""
        submitted = self.path("submitted")
        layout = f"{submitted}/<student>/<assignment>/<notebook>.ipynb"
        for assignment in only:
            if not self.path("source", ".", assignment).is_dir():
                raise GradingError(f"no assignment {assignment!r} in {self.path('source')}")
        submissions = []
        for folder in sorted(submitted.glob("*/*")) if submitted.is_dir() else []:
            student, assignment = folder.parent.name, folder.name
            hidden = student.startswith(".") or assignment.startswith(".")
            if not folder.is_dir() or hidden or (only and assignment not in only):
                continue
            source = self.path("source", ".", assignment)
            if not source.is_dir():
                _say(f"skipping {folder}: no assignment {assignment!r} in {self.path('source')}")
                continue
            notebooks = self.notebooks(assignment)
            expected = {f"{nb}.ipynb" for nb in notebooks} | _files(source) | {"timestamp.txt"}
            submissions.append(Submission(
                student=student,
                assignment=assignment,
                notebooks=tuple(nb for nb in notebooks if (folder / f"{nb}.ipynb").is_file()),
                missing=tuple(nb for nb in notebooks if not (folder / f"{nb}.ipynb").is_file()),
                extra_files=tuple(sorted(_files(folder) - expected)),
            ))
        if not submissions:
            raise GradingError(f"no submissions to grade: expected {layout}")
        return submissions


def grade_course(course_dir, assignments=(), force=False, csv_path=None):
    """Run the whole pipeline; return the score rows (see scores.py)."""
    # nbgrader's gradebook runs the `alembic` command of its own environment (nbgrader.api),
    # which is not on PATH when this runs as .venv/bin/python without the venv activated.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # nbgrader 0.9 with SQLAlchemy 2 warns about its own session use on every submission.
    warnings.filterwarnings("ignore", category=SAWarning)
    course = Course(course_dir)
    course.check_kernel()
    submissions = course.find_submissions(assignments)
    handed_in = sorted({s.assignment for s in submissions})

    for assignment in handed_in:
        nbgrader(course, "generate_assignment", assignment, "--force")
    with Gradebook(course.dirs.db_url, course.dirs.course_id) as gradebook:
        for student in sorted({s.student for s in submissions}):
            gradebook.update_or_create_student(student)

    runs = []
    for submission in submissions:
        for notebook in submission.notebooks:
            runs.append(autograde(course, submission, notebook, force))
        for notebook in submission.missing:
            runs.append(NotebookRun(submission.student, submission.assignment, notebook,
                                    problem="not handed in"))
    for run in runs:
        if run.problem:
            zero_notebook(course, run)

    for assignment in handed_in:
        nbgrader(course, "generate_feedback", assignment, "--force", required=False)

    rows = score_rows(course, submissions, runs)
    print(format_table(rows))
    csv_path = Path(csv_path) if csv_path else course.root / "grades.csv"
    write_csv(rows, csv_path)
    _say(f"scores written to {csv_path}")
    return rows


def nbgrader(course, *args, required=True):
    """Run ``nbgrader ARGS`` in the course directory; its errors go to stderr."""
    returncode = _run_nbgrader(course, args)
    if returncode != 0:
        message = f"nbgrader {' '.join(args)} failed (exit {returncode}; messages above)"
        if required:
            raise GradingError(message)
        _say(f"warning: {message}")


def autograde(course, submission, notebook, force=False):
    """``nbgrader autograde`` of one notebook, in a process of its own, under the course's limits."""
    run = NotebookRun(submission.student, submission.assignment, notebook)
    limit = course.limits.notebook_timeout
    args = ["autograde", submission.assignment, f"--student={submission.student}",
            f"--notebook={notebook}", *(["--force"] if force else [])]
    graded = course.path("autograded", submission.student, submission.assignment) / f"{notebook}.ipynb"
    graded_before = graded.stat().st_mtime if graded.is_file() else None
    token = new_token()
    start = time.monotonic()
    try:
        returncode = _run_nbgrader(course, args, token, limit, course.limits.memory_limit_mb)
    finally:
        run.leftovers = kill_processes_with_token(token)
    run.seconds = time.monotonic() - start
    if returncode is None:
        run.problem = f"time limit: stopped after {limit} s"
    elif returncode != 0 or not graded.is_file():
        run.problem = f"not graded: nbgrader autograde failed (exit {returncode})"
    if run.problem:
        graded.unlink(missing_ok=True)  # a half-graded notebook must not become feedback
        outcome = run.problem
    elif graded.stat().st_mtime == graded_before:
        outcome = "already graded; --force grades it again"
    else:
        outcome = "graded"
    if run.leftovers:
        outcome += f"; killed {run.leftovers} leftover process(es)"
    _say(f"  {submission.student}/{submission.assignment}/{notebook}: {outcome} "
         f"({run.seconds:.1f} s)")
    return run


def _run_nbgrader(course, args, token=None, timeout=None, memory_limit_mb=0):
    """``nbgrader ARGS`` in a forked child of this process; its exit code, or None if it ran past
    ``timeout`` seconds and was killed.

    nbgrader is imported here once, before the fork, instead of once per run; whatever goes
    wrong in a run stays in its child. The child puts ``token`` in its environment, for all it
    starts to inherit, and caps its address space (and theirs) at ``memory_limit_mb``.
    """
    from nbgrader.apps.nbgraderapp import NbGraderApp

    _say("$ nbgrader " + " ".join(args))
    child = multiprocessing.get_context("fork").Process(
        target=_nbgrader_child, args=(NbGraderApp, course.root, args, token, memory_limit_mb)
    )
    child.start()
    try:
        child.join(timeout)
        timed_out = child.is_alive()
    finally:  # also when this process is interrupted
        if child.is_alive():
            child.kill()
            child.join()
    return None if timed_out else child.exitcode


def _nbgrader_child(app, root, args, token, memory_limit_mb):
    os.chdir(root)
    if token:
        os.environ[TOKEN_VARIABLE] = token
    if memory_limit_mb:
        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Errors only: nbgrader's warnings are expected ones (a hidden test cell's checksum "has
    # changed" in every submission) or end up in the score table's notes.
    app.launch_instance(argv=[*args, "--log-level=ERROR"])


def zero_notebook(course, run):
    """Score 0 on every cell of a notebook that could not be graded (as nbgrader does when one is
    missing), replacing any score left from an earlier run."""
    with Gradebook(course.dirs.db_url, course.dirs.course_id) as gradebook:
        gradebook.update_or_create_submission(run.assignment, run.student)
        notebook = gradebook.find_submission_notebook(run.notebook, run.assignment, run.student)
        for grade in notebook.grades:
            grade.auto_score = 0
            grade.needs_manual_grade = False
        gradebook.db.commit()


def _files(folder):
    """Files under folder, relative to it, leaving out checkpoints and caches."""
    skip = {".ipynb_checkpoints", "__pycache__"}
    return {
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and not skip & set(path.relative_to(folder).parts)
    }


def _say(message):
    print(message, file=sys.stderr, flush=True)
