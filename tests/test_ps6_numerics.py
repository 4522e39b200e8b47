"""ps6_numerics graded by the real pipeline (nbgrader through labkit.grading): a perfect, a blank,
a wrong and a tampered submission each get their exact score; the release has no solutions."""

import csv
import json
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from .test_grading import COURSE, copy_course, grade, grade_id, run, submission

ASSIGNMENT = "ps6_numerics"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"
PROBLEMS = ["test_adam", "test_adam_hidden", "test_kahan", "test_kahan_hidden", "test_lns",
            "test_lns_hidden", "test_winograd", "test_winograd_hidden", "test_rounding",
            "test_rounding_hidden", "test_storage", "test_storage_hidden", "mnist_table"]
# student -> (total, scores of PROBLEMS; None: awaits grading by hand), out of 15 (2 by hand)
EXPECTED = {
    "perfect": (13, [1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, None]),
    "blank": (0, [0] * 13),
    "wrong": (5, [0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, None]),
    "tampered": (5, [0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, None]),
}
# the topics each graded cell grades, by its tags
TOPICS = {"adam": ["004.03"], "kahan": ["001.12", "001.13"], "lns": ["001.11"], "winograd": ["004.25"],
          "rounding": ["004.15", "004.21"], "storage": ["004.02", "004.06", "004.24"]}




def solutions():
    source = nbformat.read(COURSE / "source" / ASSIGNMENT / NOTEBOOK, as_version=4)
    return {grade_id(cell): "\n".join(line for line in cell.source.splitlines()
                                      if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)
            for cell in source.cells if cell.metadata.get("nbgrader", {}).get("solution")}




def wrong_answers():
    good = solutions()
    return {
        **good,
        # the table read literally: no bias correction in the step
        "adam": good["adam"].replace("m_hat = m / (1 - beta1**t)", "m_hat = m")
                            .replace("v_hat = v / (1 - beta2**t)", "v_hat = v"),
        # G for equal signs used for opposite signs too
        "lns": good["lns"].replace("g = math.log2(1 - 2**x)", "g = math.log2(1 + 2**x)"),
        # round to nearest: biased
        "rounding": good["rounding"].replace("lower + step * (rng.random(x.shape) < (x - lower) / step)",
                                             "np.round(x / step) * step"),
        # the bias forgotten
        "storage": good["storage"].replace("weights = n_in * n_out + n_out", "weights = n_in * n_out"),
    }


@pytest.fixture(scope="module")
def graded():
    with tempfile.TemporaryDirectory(prefix="labkit-ps6-") as folder:
        course = copy_course(Path(folder) / "course")
        result = run(sys.executable, "-m", "nbgrader", "generate_assignment", ASSIGNMENT, cwd=course)
        assert result.returncode == 0, result.stderr
        release = nbformat.read(course / "release" / ASSIGNMENT / NOTEBOOK, as_version=4)
        wrong = wrong_answers()
        tampered_tests = {"test_adam": "pass", "test_rounding": "assert True", "test_storage_hidden": "pass"}
        students = {
            "perfect": submission(release, solutions()),
            "blank": submission(release),
            "wrong": submission(release, wrong),
            "tampered": submission(release, wrong, tampered_tests, delete=["test_lns_hidden"]),
        }
        for student, notebook in students.items():
            target = course / "submitted" / student / ASSIGNMENT
            target.mkdir(parents=True)
            nbformat.write(notebook, target / NOTEBOOK)
        result = grade(course, "--assignment", ASSIGNMENT, timeout=400)
        assert result.returncode == 0, result.stdout + result.stderr
        with open(course / "grades.csv", newline="") as file:
            rows = {row["student"]: row for row in csv.DictReader(file)}
        yield course, release, rows


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_every_submission_gets_its_exact_score(graded):
    _, _, rows = graded
    assert sorted(rows) == sorted(EXPECTED)
    for student, (total, scores) in EXPECTED.items():
        row = rows[student]
        got = [row[f"{ASSIGNMENT}:{p}"] for p in PROBLEMS]
        assert (row["score"], got) == (str(total), ["" if s is None else str(s) for s in scores]), f"{student}: {row}"
        assert row["max_score"] == "15", student
    assert "edited cells restored (test_adam, test_rounding, test_storage_hidden)" in rows["tampered"]["notes"]
    assert "deleted cells restored (test_lns_hidden)" in rows["tampered"]["notes"]


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_release_has_no_solutions_or_hidden_tests(graded):
    _, release, _ = graded
    text = json.dumps(nbformat.writes(release))
    secret = [line.strip() for answer in solutions().values() for line in answer.splitlines()
              if len(line.strip()) > 15 and "def " not in line and '"""' not in line]
    assert secret
    for line in secret + ["BEGIN SOLUTION", "BEGIN HIDDEN TESTS"]:
        assert json.dumps(line)[1:-1] not in text, line


def test_graded_cells_carry_their_topic_tags():
    source = nbformat.read(COURSE / "source" / ASSIGNMENT / NOTEBOOK, as_version=4)
    tags = {grade_id(c): c.metadata.get("tags", []) for c in source.cells if grade_id(c)}
    for answer, topics in TOPICS.items():
        for cell in (f"test_{answer}", f"test_{answer}_hidden"):  # the graded cells
            assert tags[cell] == [f"topic-{t}" for t in topics], cell
        assert set(tags[answer]) <= {f"topic-{t}" for t in topics}, answer
    assert tags["mnist_table"] == ["topic-001.14", "topic-004.21"]
    for cell in source.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
