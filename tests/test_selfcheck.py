"""The self-check cell at the end of every assignment, run where a student runs it.

An assignment is released by nbgrader's own preprocessors (those of `generate_assignment`); its
answers are filled in as a student would (all but one, left as released) and the notebook is run
top to bottom in a real kernel, as *Restart and Run All* does, without nbgrader's environment. The
last cell's output (the self-check) lists every visible test with its result (the unanswered one
failing), the hidden groups by name with what they cover, and the answer graded by hand; no line of
the hidden tests' source, no hidden region and no solution appears in it. Every assignment ends
with the cell, which no grading counts (while nbgrader runs a notebook the self-check does nothing:
tests/test_feedback.py).
"""

import copy
import glob
import os
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbgrader.preprocessors import (
    CheckCellMetadata,
    ClearHiddenTests,
    ClearMarkScheme,
    ClearOutput,
    ClearSolutions,
    ComputeChecksums,
    LockCells,
)

from labkit.grading.selfcheck import graded_cells

from .test_grading import COURSE, grade_id, submission

ASSIGNMENT = "ps3_compression"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"
UNANSWERED = "topk"  # the solution cell left as released: its visible test fails
SOURCES = sorted(glob.glob(str(COURSE / "source" / "ps*" / "ps*.ipynb")))


def solutions(source):
    return {grade_id(cell): "\n".join(line for line in cell.source.splitlines() if "### " not in line)
            for cell in source.cells if cell.metadata.get("nbgrader", {}).get("solution")}


def secrets(source):
    """Lines a student must never see: the hidden tests' file, hidden regions and solutions."""
    hidden = (COURSE / "hidden_tests" / f"{ASSIGNMENT}.py").read_text().splitlines()
    blocks = [cell.source for cell in source.cells
              if "BEGIN HIDDEN TESTS" in cell.source or "BEGIN SOLUTION" in cell.source]
    inside = []
    for block in blocks:
        keep = False
        for line in block.splitlines():
            if line.strip().startswith("### BEGIN"):
                keep = True
            elif line.strip().startswith("### END"):
                keep = False
            elif keep:
                inside.append(line)
    return {line.strip() for line in hidden + inside if len(line.strip()) > 12
            and not line.strip().startswith(("#", '"""', "import ", "from ", "def ", "return"))}


def released(source):
    """The release of ``source`` as `nbgrader generate_assignment` makes it: its own preprocessors,
    in its order, less the two that need a course's gradebook (SaveCells, InstantiateTests) and the
    header and footer it has none of (tests/test_assignments.py runs the command itself)."""
    notebook = copy.deepcopy(source)
    for preprocessor in (LockCells(), ClearSolutions(), ClearOutput(), CheckCellMetadata(), ComputeChecksums(),
                         ClearHiddenTests(), ClearMarkScheme(), ComputeChecksums(), CheckCellMetadata()):
        notebook, _ = preprocessor.preprocess(notebook, {})
    return notebook


@pytest.fixture(scope="module")
def checked():
    """(source, release, the self-check's output) of a released notebook, answered and run."""
    source = nbformat.read(COURSE / "source" / ASSIGNMENT / NOTEBOOK, as_version=4)
    release = released(source)
    with tempfile.TemporaryDirectory(prefix="labkit-selfcheck-") as folder:
        answers = {gid: text for gid, text in solutions(source).items() if gid != UNANSWERED}
        student = Path(folder) / "student" / ASSIGNMENT  # outside the course: no hidden tests near
        student.mkdir(parents=True)
        notebook = submission(release, answers)
        nbformat.write(notebook, student / NOTEBOOK)
        client = NotebookClient(notebook, timeout=120, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": str(student)}})
        grading = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("NBGRADER")}
        try:
            client.execute()  # as a student runs it: not under nbgrader
        finally:
            os.environ.update(grading)
        last = notebook.cells[-1]
        assert "self_check()" in last.source
        text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
        errors = [o for o in last.outputs if o.output_type == "error"]
        assert not errors, errors
        print(text)
        yield source, release, text


@pytest.mark.slow
def test_the_self_check_lists_visible_results_and_hidden_groups_only(checked):
    source, release, text = checked
    visible, hidden, by_hand = graded_cells(source)
    assert text.startswith(f"Self-check of {NOTEBOOK}: the visible tests (run now); "
                           "the hidden ones run only when graded.\n")
    tests = [gid for gid, _, _ in graded_cells(release)[0]]
    assert tests == ["test_onebit", "test_topk", "test_qsgd", "test_terngrad"]
    results = text[:text.index("Visible tests: ")].splitlines()[1:]
    assert [line.split()[0] for line in results] == tests
    for gid in tests:
        [line] = [line for line in results if line.startswith(f"  {gid} ")]
        if gid == "test_topk":
            assert "FAILED: NotImplementedError" in line, line
        else:
            assert line.endswith("passed"), line
    assert "Visible tests: 3 of 4 passed" in text
    groups = text[text.index("Hidden test groups"):text.index("Graded by hand")]
    assert [line.split()[0] for line in groups.splitlines()[1:]] == [gid for gid, _, _ in hidden] == tests
    assert all("Hidden tests: " in line for line in groups.splitlines()[1:])
    assert "Graded by hand: what_to_send (2 points)" in text
    assert "run_hidden_tests" not in nbformat.writes(release)  # nothing hidden for it to read
    leaked = [line for line in secrets(source) if line in text]
    assert not leaked and "run_hidden_tests" not in text and "BEGIN" not in text, leaked


def test_every_assignment_ends_with_a_self_check_that_is_not_graded():
    assert len(SOURCES) >= 10
    for path in SOURCES:
        cells = nbformat.read(path, as_version=4).cells
        title, check = cells[-2:]
        assert title.cell_type == "markdown" and title.source.startswith("## Check your work before submitting"), path
        assert check.cell_type == "code" and "self_check()" in check.source, path
        for cell in (title, check):
            meta = cell.metadata.get("nbgrader", {})
            assert not meta.get("grade") and not meta.get("solution"), path
        assert "HIDDEN" not in check.source and "hidden_tests" not in check.source, path
