"""Feedback that teaches without leaking: hidden cases, partial credit and the self-check, in process.

run_hidden_tests on ps0_warmup's real hidden checks with a plausible mistake: each failing case is
named with what it runs on, the points are split over the cases, and nothing of the check's source
or of the solution is printed; a check of each kind (plain, generator) in a made-up course for the
edge cases; the self-check on the release nbgrader's own preprocessors make of the source. The
feedback pages of a graded class are checked in test_grading.py (its shared graded class).
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions

from labkit.grading.hidden import cell_points, run_hidden_tests
from labkit.grading.selfcheck import main as selfcheck_main
from labkit.grading.selfcheck import self_check

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "assignments"
SOURCE = COURSE / "source" / "ps0_warmup" / "ps0_warmup.ipynb"
HIDDEN = COURSE / "hidden_tests" / "ps0_warmup.py"


def namespace(mistake=None):
    """The notebook's answers run in a fresh namespace (the source's solutions, maybe mistaken)."""
    ns = {}
    for cell in nbformat.read(SOURCE, as_version=4).cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and not meta.get("grade") and meta.get("grade_id") != "explore":
            exec(mistake(cell.source) if mistake else cell.source, ns)
    return ns


def wrong_ring(source):  # np.split needs lengths the ring size divides
    return source.replace("np.array_split(", "np.split(")


def wrong_sgd(source):  # sums the workers' gradients instead of averaging them
    return source.replace(" / len(shards)", "")


def secrets():
    """Lines of the hidden checks and of the solutions that must never be shown."""
    lines = [line.strip() for line in HIDDEN.read_text().splitlines()
             if len(line.strip()) > 12 and not line.strip().startswith(("#", '"""', "def ", "import", "from"))]
    for cell in nbformat.read(SOURCE, as_version=4).cells:
        if cell.metadata.get("nbgrader", {}).get("solution"):
            for region in cell.source.split("### BEGIN SOLUTION")[1:]:
                region = region.split("### END SOLUTION")[0]
                lines += [line.strip() for line in region.splitlines() if len(line.strip()) > 12]
    assert len(lines) > 20
    return lines


def call(*args, **kwargs):
    """run_hidden_tests(...): (what it printed, the cell result it published, the exception)."""
    out, published, error = io.StringIO(), [], None
    hook, sys.displayhook = sys.displayhook, published.append
    try:
        with contextlib.redirect_stdout(out):
            run_hidden_tests(*args, **kwargs)
    except AssertionError as failure:
        error = failure
    finally:
        sys.displayhook = hook
    return out.getvalue(), published, error


@pytest.fixture
def in_ps0(monkeypatch):
    monkeypatch.chdir(SOURCE.parent)  # as nbgrader runs it: the course directory is above


def test_a_failing_case_is_named_and_the_points_are_split(in_ps0):
    ns = namespace(wrong_ring)
    printed, published, error = call("ps0_warmup", "ring", ns["ring_schedule"], ns["ring_allreduce"])
    assert error is None
    assert published == [0.8]  # 2 of the 5 rings (1 and 7 ranks divide their lengths) of 2 points
    lines = printed.strip().splitlines()
    assert lines == [
        "hidden test 'ring' failed: 2 ranks, 7 elements of float32: ValueError in your code: "
        "array split does not result in an equal division",
        "hidden test 'ring' failed: 5 ranks, 23 elements of float64: ValueError in your code: "
        "array split does not result in an equal division",
        "hidden test 'ring' failed: 6 ranks, 4 elements of float64: ValueError in your code: "
        "array split does not result in an equal division",
        "hidden test 'ring': 2 of 5 cases passed, 0.8 of 2 points",
    ]
    assert not [line for line in secrets() if line in printed]


def test_every_case_failing_scores_zero_with_one_line_per_case(in_ps0):
    ns = namespace(wrong_sgd)
    printed, published, error = call("ps0_warmup", "sgd", ns["mse_gradients"], ns["data_parallel_step"])
    assert published == [] and printed == ""
    lines = str(error).splitlines()
    assert len(lines) == 4
    assert lines[0] == ("hidden test 'sgd' failed: case 1: 4 workers, batch 12, a (1, 3) model: "
                        "4 workers do not take the whole-batch SGD step")
    assert not [line for line in secrets() if line in str(error)]


def test_every_case_passing_gets_the_points(in_ps0):
    ns = namespace()
    printed, published, error = call("ps0_warmup", "ring", ns["ring_schedule"], ns["ring_allreduce"])
    assert (error, published) == (None, [])
    assert printed.strip() == "hidden test 'ring': all 5 cases passed"


def test_points_come_from_the_source_notebook():
    assert cell_points(COURSE, "ps0_warmup", "ring") == 2
    assert cell_points(COURSE, "ps0_warmup", "sgd") == 2
    assert cell_points(COURSE, "ps0_warmup", "nothing") is None


CHECKS = '''
def plain(f):
    assert f(2) == 4, "f(2) is not 4"

def cases(f):
    for n in (1, 2, 3, 4):
        yield f"n = {n}", lambda n=n: _case(f, n)

def _case(f, n):
    if f(n) != n * n:
        raise AssertionError(f"wrong square of a number of size {n}")

def interrupted(f):
    yield "first", lambda: None
    yield "second", lambda: f()
'''


@pytest.fixture
def course(tmp_path, monkeypatch):
    """A made-up course: demo's hidden checks and a source notebook whose cell is worth 3 points."""
    (tmp_path / "nbgrader_config.py").write_text("c = get_config()\n")
    (tmp_path / "hidden_tests").mkdir()
    (tmp_path / "hidden_tests" / "demo.py").write_text(CHECKS)
    source = tmp_path / "source" / "demo"
    source.mkdir(parents=True)
    cell = nbformat.v4.new_code_cell('run_hidden_tests("demo", "cases", f)')
    cell.metadata["nbgrader"] = {"grade": True, "solution": False, "grade_id": "t", "points": 3}
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), source / "demo.ipynb")
    monkeypatch.chdir(source)
    return tmp_path


def test_plain_checks_are_one_case(course):
    assert call("demo", "plain", lambda x: x * x) == ("", [], None)
    printed, published, error = call("demo", "plain", lambda x: x + 3)
    assert str(error) == "hidden test 'plain' failed: f(2) is not 4" and published == []


def test_any_error_of_the_students_code_fails_its_case_only(course):
    def square(x):
        if x == 3:
            raise SystemExit(1)
        return x * x if x != 4 else 0

    printed, published, error = call("demo", "cases", square)
    assert error is None and published == [1.5]  # 2 of 4 cases, 3 points
    assert "n = 3: SystemExit in your code: 1" in printed
    assert "n = 4: wrong square of a number of size 4" in printed
    assert call("demo", "cases", square, points=8)[1] == [4.0]


def test_an_interrupt_fails_the_whole_cell(course):
    def stuck():
        raise KeyboardInterrupt

    printed, published, error = call("demo", "interrupted", stuck)
    assert str(error) == "hidden test 'interrupted' failed: interrupted (time limit)" and published == []


def release():
    """ps0's release notebook, made by nbgrader's own preprocessors from the source."""
    notebook = nbformat.read(SOURCE, as_version=4)
    for preprocessor in (ClearSolutions(), ClearHiddenTests()):
        notebook, _ = preprocessor.preprocess(notebook, {})
    return notebook


def test_self_check_runs_the_visible_tests_and_lists_the_hidden_groups(tmp_path):
    path = tmp_path / "ps0_warmup.ipynb"
    nbformat.write(release(), path)
    out = io.StringIO()
    ns = namespace()

    def ring_allreduce(buffers):  # as the release has it: not written yet
        raise NotImplementedError("ring_allreduce")

    ns["ring_allreduce"] = ring_allreduce
    summary = self_check(path, ns, file=out)
    text = out.getvalue()
    print(text)
    assert summary["visible"]["test_sgd"] == (1, "")
    points, reason = summary["visible"]["test_ring"]
    assert points == 2 and reason.startswith("NotImplementedError")
    assert "  test_ring         2 points    FAILED: NotImplementedError" in text
    assert "Visible tests: 1 of 2 passed (1 of 3 points" in text
    assert summary["hidden"] == {
        "test_sgd_hidden": (2, "Hidden tests: 2 to 5 workers, other shapes and learning rates, "
                               "against torch.optim.SGD on the whole batch."),
        "test_ring_hidden": (2, "Hidden tests: rings of 1 to 7 ranks, buffer lengths the ring size "
                                "does not divide, other dtypes.")}
    assert "Graded by hand: ring_cost (2 points)" in text
    assert "run_hidden_tests" not in text and not [line for line in secrets() if line in text]
    # the release the student has holds no hidden case for it to show
    assert "run_hidden_tests" not in json.dumps(nbformat.read(path, as_version=4))


def test_self_check_does_nothing_while_nbgrader_runs(monkeypatch):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    out = io.StringIO()
    assert self_check(SOURCE, {}, file=out) is None
    assert out.getvalue() == "self-check skipped while nbgrader runs\n"


def test_self_check_command_needs_a_notebook(tmp_path, capsys):
    missing = tmp_path / "nothing.ipynb"
    assert selfcheck_main([str(missing)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"labkit.grading.selfcheck: error: {missing} not found"]
