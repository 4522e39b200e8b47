"""Hidden tests whose content stays secret, even in feedback.

nbgrader removes a test cell's ``### BEGIN HIDDEN TESTS`` region from the release, but puts it
back to grade and then shows the whole cell, hidden region included, in the feedback students
get (nbgrader #917). So a hidden region here only names a check::

    ### BEGIN HIDDEN TESTS
    from labkit.grading.hidden import run_hidden_tests

    run_hidden_tests("ps0_warmup", "ring", ring_schedule, ring_allreduce)
    ### END HIDDEN TESTS

The check is a function of ``<course>/hidden_tests/<assignment>.py``, beside ``source/`` and never
released. A failure, whatever it was, becomes one AssertionError raised from here with a
one-line reason, so neither the check's source nor a traceback through it reaches a notebook.
"""

import runpy
from pathlib import Path

HIDDEN_TESTS_DIR = "hidden_tests"
_MAX_REASON = 300


def find_hidden_tests(assignment, start=None):
    """``hidden_tests/<assignment>.py`` of the course directory above ``start`` (the cwd).

    nbgrader runs a notebook in its own folder (source/<a>/, autograded/<student>/<a>/), so the
    course directory is an ancestor. The outermost one wins: files a student hands in land in
    their own folder, below it, and cannot stand in for the instructor's.
    """
    here = Path(start or Path.cwd()).resolve()
    found = None
    for folder in (here, *here.parents):
        candidate = folder / HIDDEN_TESTS_DIR / f"{assignment}.py"
        if (folder / "nbgrader_config.py").is_file() and candidate.is_file():
            found = candidate
    return found


def run_hidden_tests(assignment, check, *student_code):
    """Run ``check(*student_code)`` from the assignment's hidden tests; raise AssertionError if it fails."""
    path = find_hidden_tests(assignment)
    if path is None:
        raise AssertionError(f"hidden tests of {assignment!r} not found: grade from the course directory")
    try:
        runpy.run_path(str(path), run_name=f"hidden_tests.{assignment}")[check](*student_code)
    except AssertionError as failure:
        reason = str(failure) or "a check failed"
    except KeyboardInterrupt:
        reason = "interrupted (time limit)"
    except BaseException as error:  # the student's code may raise anything, SystemExit included
        reason = f"{type(error).__name__} in your code: {error}"
    else:
        return
    if len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON] + "..."
    raise AssertionError(f"hidden test {check!r} failed: {reason}")
