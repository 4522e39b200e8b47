"""The self-check a student runs before submitting: the visible tests, and what else is graded.

In a cell of the released notebook (any cell, after the answers have been run)::

    from labkit.grading.selfcheck import self_check
    self_check()

Every assignment ends with such a cell ("Check your work before submitting"), which no grading
counts. A self-check cell does nothing while nbgrader runs the notebook (``NBGRADER_EXECUTION``),
nor outside a kernel (plain Python running the notebook's code prints one line). It
reads the notebook as saved (the released one: no solutions, no hidden tests), runs each
visible test cell's code in the notebook's own namespace, as the cell itself would run, and prints
one line per test cell: passed, or the first line of why it failed. Then it lists the hidden test
groups (the graded cells whose hidden region nbgrader took out of the release: their name,
points and the comment that says what they cover) and the answers graded by hand. The hidden
cases themselves are not in the release, so nothing here can run or show them; they run only
when the instructor grades.

``python -m labkit.grading.selfcheck NOTEBOOK`` prints the summary of a notebook without running
anything (the groups and points only).
"""

import contextlib
import io
import os
import sys
import traceback
from pathlib import Path

import nbformat

HIDDEN_MARK = "hidden tests"


def _nbgrader(cell):
    return cell.metadata.get("nbgrader", {})


def _code_lines(source):
    return [line for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]


def _comment(source):
    """The cell's leading comment, as one line."""
    lines = []
    for line in source.splitlines():
        if not line.strip().startswith("#"):
            break
        text = line.strip().lstrip("#").strip()
        if text and not text.startswith(("BEGIN", "END")):
            lines.append(text)
    return " ".join(lines)


def _hidden_comment(source):
    """The comment that says what a cell's hidden tests cover, as one line ('' if none): the
    comment lines from the first one that starts with "Hidden tests", wherever it is in the cell
    (after the visible checks, or leading a cell of hidden tests only). nbgrader keeps it in the
    release: it sits outside the hidden region, which nbgrader takes out."""
    lines, found = [], False
    for line in source.splitlines():
        text = line.strip()
        if not text.startswith("#"):
            if found:
                break
            continue
        text = text.lstrip("#").strip()
        if text.lower().startswith(HIDDEN_MARK):
            found = True
        if found and text and not text.startswith(("BEGIN", "END")):
            lines.append(text)
    return " ".join(lines)


def _points(value):
    return f"{value:g} point" + ("" if value == 1 else "s")


def find_notebook(start=None):
    """The notebook to check: the kernel's own (JPY_SESSION_NAME, set by Jupyter), else the
    only .ipynb of the current folder."""
    session = os.environ.get("JPY_SESSION_NAME", "")
    if session.endswith(".ipynb") and Path(session).is_file():
        return Path(session)
    found = sorted(Path(start or Path.cwd()).glob("*.ipynb"))
    if len(found) != 1:
        raise FileNotFoundError("give the notebook to check: self_check('psN_name.ipynb') "
                                f"({len(found)} notebooks here)")
    return found[0]


def graded_cells(notebook):
    """(visible tests, hidden groups, answers graded by hand) of a notebook:
    [(grade_id, points, source or description)] each."""
    visible, hidden, by_hand = [], [], []
    for cell in notebook.cells:
        meta = _nbgrader(cell)
        if not meta.get("grade"):
            continue
        gid, points = meta.get("grade_id", "?"), float(meta.get("points", 0))
        if meta.get("solution") or cell.cell_type != "code":
            by_hand.append((gid, points, ""))
            continue
        comment = _hidden_comment(cell.source) or _comment(cell.source)
        if HIDDEN_MARK in comment.lower() or "BEGIN HIDDEN TESTS" in cell.source:
            hidden.append((gid, points, comment))
        if _code_lines(cell.source) and "BEGIN HIDDEN TESTS" not in cell.source:
            visible.append((gid, points, cell.source))
    return visible, hidden, by_hand


def _run_test(source, namespace):
    """'' if the test cell's code passes in the namespace, else why not (one line)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        code = TransformerManager().transform_cell(source)  # %magics, as the cell would run
    except ImportError:
        code = source
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # what the test prints is not the summary
            exec(compile(code, "<test cell>", "exec"), namespace)
    except BaseException as error:  # the student's code may raise anything
        if isinstance(error, KeyboardInterrupt):
            raise
        message = " ".join(str(error).split()) or "a check failed"
        where = traceback.extract_tb(error.__traceback__)[-1]
        line = f" (line {where.lineno})" if where.filename == "<test cell>" else ""
        return f"{type(error).__name__}{line}: {message}"[:300]
    return ""


def self_check(notebook=None, namespace=None, run=True, file=None):
    """Run the visible tests of ``notebook`` in ``namespace`` and print the summary; return it as
    a dict: ``visible`` {grade_id: (points, reason or '')}, ``hidden`` {grade_id: (points, what)},
    ``by_hand`` {grade_id: points}."""
    file = file or sys.stdout
    if os.environ.get("NBGRADER_EXECUTION"):  # nbgrader validating or grading: the tests run anyway
        print("self-check skipped while nbgrader runs", file=file)
        return None
    if namespace is None and run:
        try:
            from IPython import get_ipython
        except ImportError:  # no IPython: not in a notebook's kernel
            get_ipython = type(None)
        shell = get_ipython()
        if shell is None:  # plain Python running the notebook's code: nothing to check here
            print("self-check skipped: it runs the tests in the notebook's kernel, call it from a cell "
                  "(python -m labkit.grading.selfcheck NOTEBOOK.ipynb lists them)", file=file)
            return None
        namespace = shell.user_ns
    path = Path(notebook) if notebook else find_notebook()
    nb = nbformat.read(path, as_version=4)
    visible, hidden, by_hand = graded_cells(nb)
    summary = {"visible": {}, "hidden": {}, "by_hand": {}}
    width = max([len(gid) for gid, _, _ in visible + hidden + by_hand] + [8])
    when = "run now" if run else "not run here"
    print(f"Self-check of {path.name}: the visible tests ({when}); the hidden ones run only when graded.",
          file=file)
    passed = points = 0.0
    for gid, value, source in visible:
        reason = _run_test(source, namespace) if run else None
        summary["visible"][gid] = (value, reason)
        if reason == "":
            passed, points = passed + 1, points + value
        state = "not run" if reason is None else "passed" if not reason else "FAILED: " + reason
        print(f"  {gid:<{width}}  {_points(value):<10}  {state}", file=file)
    if run:
        total = sum(value for _, value, _ in visible)
        print(f"Visible tests: {passed:g} of {len(visible)} passed ({points:g} of {total:g} points; "
              "a test cell that also holds hidden cases counts in full only if those pass too).", file=file)
    if hidden:
        print("Hidden test groups, run when graded (each group's points are split over its cases; "
              "each case that fails says which in your feedback):", file=file)
        for gid, value, what in hidden:
            summary["hidden"][gid] = (value, what)
            print(f"  {gid:<{width}}  {_points(value):<10}  {what}", file=file)
    if by_hand:
        print("Graded by hand: " + ", ".join(f"{gid} ({_points(value)})" for gid, value, _ in by_hand),
              file=file)
        summary["by_hand"] = {gid: value for gid, value, _ in by_hand}
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].endswith(".ipynb"):
        print("usage: python -m labkit.grading.selfcheck NOTEBOOK.ipynb", file=sys.stderr)
        return 2
    if not Path(argv[0]).is_file():
        print(f"labkit.grading.selfcheck: error: {argv[0]} not found", file=sys.stderr)
        return 2
    try:
        self_check(argv[0], run=False)
    except Exception as error:
        print(f"labkit.grading.selfcheck: error: {argv[0]} cannot be read: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
