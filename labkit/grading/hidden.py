"""Hidden tests whose content stays secret, even in feedback; a message and credit per case.

nbgrader removes a test cell's ``### BEGIN HIDDEN TESTS`` region from the release, but puts it
back to grade and then shows the whole cell, hidden region included, in the feedback students
get (nbgrader #917). So a hidden region here only names a check::

    ### BEGIN HIDDEN TESTS
    from labkit.grading.hidden import run_hidden_tests

    run_hidden_tests("ps0_warmup", "ring", ring_schedule, ring_allreduce)
    ### END HIDDEN TESTS

The check is a function of ``<course>/hidden_tests/<assignment>.py``, beside ``source/`` and never
released. It is one of two kinds:

- a plain function: one case; it passes, or it fails with the message of its AssertionError;
- a generator of cases (``yield label, run``): each case is ``run()``, a function of no
  argument, with a ``label`` that says on what it runs ("5 ranks, 23 values of float64"). Every
  case runs, whatever the others did; each one that fails prints its own line, label and
  message; the cell's points are split evenly over the cases, and the cell scores the share of
  the cases that passed (nbgrader's partial credit: a test cell whose result is a number scores
  that number). A cell where
  every case fails raises, and scores zero.

The cell's points are read from the instructor's source notebook (the graded cell that calls
this check), or given as ``points=``. Whatever goes wrong, a student sees one line per case:
never the check's source, never a traceback through it, never the expected answer unless the
message states it.
"""

import inspect
import json
import re
import runpy
import sys
from pathlib import Path

HIDDEN_TESTS_DIR = "hidden_tests"
SOURCE_DIR = "source"
_MAX_REASON = 300


class _Interrupted(Exception):
    """The cell's time limit interrupted a case: no case after it runs, the cell fails."""


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


def cell_points(course, assignment, check):
    """The points of the source notebook's graded cell that runs ``check``, or None."""
    call = re.compile(r"run_hidden_tests\(\s*['\"]" + re.escape(assignment) + r"['\"]\s*,\s*['\"]"
                      + re.escape(check) + r"['\"]")
    for path in sorted((Path(course) / SOURCE_DIR / assignment).glob("*.ipynb")):
        try:
            cells = json.loads(path.read_text())["cells"]
        except (OSError, ValueError, KeyError):
            continue
        for cell in cells:
            nbgrader = cell.get("metadata", {}).get("nbgrader", {})
            source = "".join(cell.get("source", ""))
            if nbgrader.get("grade") and call.search(source):
                return float(nbgrader.get("points", 0))
    return None


def _reason(error):
    if isinstance(error, AssertionError):
        reason = str(error) or "a check failed"
    else:  # the student's code may raise anything, SystemExit included
        reason = f"{type(error).__name__} in your code: {error}"
    reason = " ".join(reason.split())
    return reason[:_MAX_REASON] + "..." if len(reason) > _MAX_REASON else reason


def _run(function):
    """'' if ``function()`` passes, else the reason it failed, in one line."""
    try:
        function()
    except KeyboardInterrupt:
        raise _Interrupted() from None
    except BaseException as error:
        return _reason(error)
    return ""


def run_cases(check, student_code):
    """Run every case of ``check`` on the student's code: [(label, reason or '')]."""
    if not inspect.isgeneratorfunction(check):
        return [("", _run(lambda: check(*student_code)))]
    results, cases = [], check(*student_code)
    while True:
        try:
            label, function = next(cases)
        except StopIteration:
            break
        except KeyboardInterrupt:
            raise _Interrupted() from None
        except BaseException as error:  # preparing the cases called the student's code
            results.append(("preparing the cases", _reason(error)))
            break
        results.append((str(label), _run(function)))
    return results


def run_hidden_tests(assignment, check, *student_code, points=None):
    """Run the hidden check ``check`` of ``assignment`` on the student's code.

    Every case passes: nothing (the cell gets its points). Some fail: their lines are printed and
    the cell's partial score becomes its result. All fail (or the points are unknown):
    AssertionError, one line per failed case.
    """
    path = find_hidden_tests(assignment)
    if path is None:
        raise AssertionError(f"hidden tests of {assignment!r} not found: grade from the course directory")
    try:
        results = run_cases(runpy.run_path(str(path), run_name=f"hidden_tests.{assignment}")[check],
                            student_code)
    except _Interrupted:
        raise AssertionError(f"hidden test {check!r} failed: interrupted (time limit)") from None
    failed = [(label, reason) for label, reason in results if reason]
    lines = [f"hidden test {check!r} failed: " + (f"{label}: {reason}" if label else reason)
             for label, reason in failed]
    if not failed:
        if len(results) > 1:
            print(f"hidden test {check!r}: all {len(results)} cases passed")
        return None
    if points is None:
        points = cell_points(path.parent.parent, assignment, check)
    passed = len(results) - len(failed)
    if not passed or points is None:
        raise AssertionError("\n".join(lines))
    score = round(points * passed / len(results), 4)
    print("\n".join(lines))
    print(f"hidden test {check!r}: {passed} of {len(results)} cases passed, {score:g} of {points:g} points")
    # The cell's result, as if it were its last expression: nbgrader scores a test cell whose
    # output is a number with that number. Published here, it is the cell's result wherever the
    # call stands in the cell (keep it last: an error after it would not cancel the credit).
    sys.displayhook(score)
    return None
