"""The instructor's grading pipeline over an nbgrader course directory (``make grade``).

Every step is nbgrader's own command or API on nbgrader's own layout:

1. find the submissions, ``submitted/<student>/<assignment>/<notebook>.ipynb``;
2. ``nbgrader generate_assignment --force`` for each assignment handed in: the release, and the
   gradebook's copy of the instructor's cells (created on the first run) that autograding
   restores test cells from;
3. add every student found to the gradebook, and create every submission in it;
4. ``nbgrader autograde``, one notebook per run, ``--jobs`` runs at once (default: one per core),
   each in a process of its own (a fork of this one: nbgrader is imported once) with limits and
   its own copy of the gradebook, merged back by this process alone when the run ends
   (gradebook.py); a progress bar, or one line per notebook, shows each score as it comes;
5. ``nbgrader generate_feedback --force``, one submission per run, as many at once;
6. the score table (scores.py), printed and written as CSV.

Each autograde run gets a wall-clock limit (``GradingLimits.notebook_timeout``; past it the run is
killed and the notebook scores zero), an address-space limit inherited by the kernel and all it
starts (``GradingLimits.memory_limit_mb``; a memory blowup becomes a MemoryError in the
student's cell), and a fresh token in its environment: when the run ends every process carrying
it, whatever session it moved to, is killed (processes.py). Inside the run, GuardedExecute
(execute.py) keeps a dead or stuck kernel from stopping the notebook or passing its tests. A run
that hangs or crashes holds its own slot only; the scores do not depend on ``--jobs``.
"""

import multiprocessing
import multiprocessing.connection
import os
import resource
import sys
import tempfile
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

from .gradebook import GradebookCopies
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
    outcome: str = ""  # what happened, in words
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


def default_jobs():
    """How many notebooks to grade at once by default: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def grade_course(course_dir, assignments=(), force=False, csv_path=None, jobs=None, progress=None):
    """Run the whole pipeline; return the score rows (see scores.py).

    ``jobs`` notebooks are graded at once (default: one per core), each in a process of its own
    under the course's limits, with its own copy of the gradebook; this process alone writes the
    course's gradebook, merging each copy's grades as its run ends (gradebook.py). ``progress``:
    a bar (tqdm) or one line per notebook; default: a bar when stderr is a terminal.
    """
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise GradingError(f"--jobs must be 1 or more, not {jobs}")
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
        # Every submission exists before any run starts, so that the copies the runs write
        # share its ids with the course's gradebook (and the merge is row for row).
        for sub in submissions:
            folder = course.path("submitted", sub.student, sub.assignment)
            timestamp = course.dirs.get_existing_timestamp(str(folder))
            gradebook.update_or_create_submission(
                sub.assignment, sub.student, **({"timestamp": timestamp} if timestamp else {}))

    tasks = [(submission, notebook) for submission in submissions for notebook in submission.notebooks]
    with tempfile.TemporaryDirectory(prefix="labkit-grading-") as scratch:
        store = GradebookCopies(course.dirs.db_url, scratch)
        runs = run_all(course, tasks, jobs, force, store, progress)
        for submission in submissions:
            for notebook in submission.missing:
                runs.append(NotebookRun(submission.student, submission.assignment, notebook,
                                        problem="not handed in"))
        for run in runs:
            if run.problem:
                zero_notebook(course, run)
        graded = sorted({(r.assignment, r.student) for r in runs if not r.problem})
        feedback_all(course, graded, jobs, store)

    rows = score_rows(course, submissions, runs)
    print(format_table(rows))
    csv_path = Path(csv_path) if csv_path else course.root / "grades.csv"
    write_csv(rows, csv_path)
    _say(f"scores written to {csv_path}")
    return rows


def nbgrader(course, *args, required=True):
    """Run ``nbgrader ARGS`` in the course directory; its errors go to stderr."""
    _say("$ nbgrader " + " ".join(args))
    child = _start_nbgrader(course, args)
    child.join()
    returncode = child.exitcode
    if returncode != 0:
        message = f"nbgrader {' '.join(args)} failed (exit {returncode}; messages above)"
        if required:
            raise GradingError(message)
        _say(f"warning: {message}")


@dataclass
class _Slot:
    """One ``nbgrader autograde`` run in progress."""

    run: NotebookRun
    child: multiprocessing.Process
    token: str
    deadline: float
    started: float
    graded: Path
    graded_before: float
    copy: str


def run_all(course, tasks, jobs, force, store, progress=None):
    """Autograde every (submission, notebook) of ``tasks``, ``jobs`` at a time; the runs, in order.

    Each run is a forked child of this process with a fresh token, the course's memory limit and
    a deadline; a child past its deadline is killed, and whatever any run left behind is killed
    when it ends. A run that hangs or crashes holds only its own slot.
    """
    runs = [None] * len(tasks)
    waiting = list(enumerate(tasks))
    active = {}
    bar = _Progress(len(tasks), progress)
    limit = course.limits.notebook_timeout
    try:
        while waiting or active:
            while waiting and len(active) < jobs:
                index, (submission, notebook) = waiting.pop(0)
                active[index] = _start_autograde(course, submission, notebook, force, store, limit)
            now = time.monotonic()
            timeout = max(0.0, min(slot.deadline for slot in active.values()) - now)
            # a child's sentinel may turn ready before it has exited (a grading run can close
            # inherited descriptors): whether it is done is asked of the process itself
            multiprocessing.connection.wait([s.child.sentinel for s in active.values()], min(timeout, 1.0))
            now = time.monotonic()
            for index, slot in list(active.items()):
                if not slot.child.is_alive() or now >= slot.deadline:
                    del active[index]
                    runs[index] = _finish_autograde(course, slot, store, limit)
                    bar.done(runs[index], _score_line(course, runs[index]))
    finally:  # also when this process is interrupted: nothing a run started outlives it
        for slot in active.values():
            if slot.child.is_alive():
                slot.child.kill()
            slot.child.join()
            kill_processes_with_token(slot.token)
        bar.close()
    return runs


def _start_autograde(course, submission, notebook, force, store, limit):
    run = NotebookRun(submission.student, submission.assignment, notebook)
    graded = course.path("autograded", submission.student, submission.assignment) / f"{notebook}.ipynb"
    copy = store.new_copy()
    args = ["autograde", submission.assignment, f"--student={submission.student}",
            f"--notebook={notebook}", *(["--force"] if force else []), *store.args(copy)]
    token = new_token()
    started = time.monotonic()
    child = _start_nbgrader(course, args, token, course.limits.memory_limit_mb)
    return _Slot(run, child, token, started + limit, started, graded,
                 graded.stat().st_mtime if graded.is_file() else None, copy)


def _finish_autograde(course, slot, store, limit):
    """End one run: kill it if it is still going, kill what it left, merge its grades."""
    run, child = slot.run, slot.child
    timed_out = child.is_alive()
    if timed_out:
        child.kill()
    child.join()
    run.leftovers = kill_processes_with_token(slot.token)
    run.seconds = time.monotonic() - slot.started
    if timed_out:
        run.problem = f"time limit: stopped after {limit} s"
    elif child.exitcode != 0 or not slot.graded.is_file():
        run.problem = f"not graded: nbgrader autograde failed (exit {child.exitcode})"
    if run.problem:
        slot.graded.unlink(missing_ok=True)  # a half-graded notebook must not become feedback
        run.outcome = run.problem
    else:
        store.merge(slot.copy, run.assignment, run.student, run.notebook)
        unchanged = slot.graded.stat().st_mtime == slot.graded_before
        run.outcome = "already graded; --force grades it again" if unchanged else "graded"
    store.discard(slot.copy)
    if run.leftovers:
        run.outcome += f"; killed {run.leftovers} leftover process(es)"
    return run


def _score_line(course, run):
    """One line of the running score table."""
    score = "-" if run.problem else store_score(course, run)
    return (f"{run.student:<14} {run.assignment}/{run.notebook:<20} {score:>12}  "
            f"{run.outcome} ({run.seconds:.1f} s)")


def store_score(course, run):
    """'7 / 9' (and how many points await grading by hand) of a graded notebook, from the gradebook."""
    with Gradebook(course.dirs.db_url, course.dirs.course_id) as gradebook:
        notebook = gradebook.find_submission_notebook(run.notebook, run.assignment, run.student)
        text = f"{notebook.score:g} / {notebook.max_score:g}"
        if notebook.needs_manual_grade:
            text += " +?"
    return text


class _Progress:
    """A progress bar (tqdm) on a terminal, else one numbered line per notebook graded."""

    def __init__(self, total, bar=None):
        self.total, self.count = total, 0
        self.bar = None
        if (sys.stderr.isatty() if bar is None else bar) and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="notebook", file=sys.stderr, dynamic_ncols=True)

    def done(self, run, line):
        self.count += 1
        line = f"  [{self.count:>{len(str(self.total))}}/{self.total}] {line}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
            self.bar.update(1)
        else:
            _say(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def feedback_all(course, graded, jobs, store):
    """``nbgrader generate_feedback --force`` for every graded (assignment, student), ``jobs`` at a
    time, each run reading its own copy of the final gradebook."""
    if not graded:
        return
    _say(f"$ nbgrader generate_feedback --force ({len(graded)} submission(s), {jobs} at a time)")
    waiting, active, failed = list(graded), {}, []
    store.snapshot()
    try:
        while waiting or active:
            while waiting and len(active) < jobs:
                assignment, student = waiting.pop(0)
                copy = store.new_copy()
                args = ["generate_feedback", assignment, f"--student={student}", "--force", *store.args(copy)]
                active[(assignment, student)] = (_start_nbgrader(course, args), copy)
            multiprocessing.connection.wait([c.sentinel for c, _ in active.values()], 1.0)
            for key, (child, copy) in list(active.items()):
                if not child.is_alive():
                    child.join()
                    store.discard(copy)
                    del active[key]
                    if child.exitcode != 0:
                        failed.append(f"{key[1]}/{key[0]}")
    finally:
        for child, _ in active.values():
            if child.is_alive():
                child.kill()
            child.join()
    if failed:
        _say(f"warning: nbgrader generate_feedback failed for {', '.join(failed)} (messages above)")


def _start_nbgrader(course, args, token=None, memory_limit_mb=0):
    """``nbgrader ARGS`` in a forked child of this process, started.

    nbgrader is imported here once, before the fork, instead of once per run; whatever goes
    wrong in a run stays in its child. The child puts ``token`` in its environment, for all it
    starts to inherit, and caps its address space (and theirs) at ``memory_limit_mb``.
    """
    from nbgrader.apps.nbgraderapp import NbGraderApp

    child = multiprocessing.get_context("fork").Process(
        target=_nbgrader_child, args=(NbGraderApp, course.root, args, token, memory_limit_mb)
    )
    child.start()
    return child


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
