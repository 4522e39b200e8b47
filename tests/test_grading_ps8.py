"""ps8_parallelism through the real grading pipeline (nbgrader generate_assignment, autograde with
hidden tests, feedback): a perfect, a blank and a wrong submission get their exact scores."""

import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from tests.test_grading import copy_course, grade_id, submission

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "assignments"
ASSIGNMENT = "ps8_parallelism"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"
PROBLEMS = ["test_schedules", "test_schedules_hidden", "test_tensor", "test_tensor_hidden", "test_grid",
            "test_grid_hidden", "test_hardware", "test_hardware_hidden"]
EXPECTED = {  # student -> (total, scores of PROBLEMS), out of 14
    "perfect": (14, [2, 3, 2, 3, 1, 1, 1, 1]),
    "blank": (0, [0, 0, 0, 0, 0, 0, 0, 0]),
    # 1F1B warms up with one forward too many (stashes p - s + 1), the row-parallel layer forgets g
    # in its forward, the core groups put the smaller groups first; only the grid is right
    "wrong": (2, [0, 0, 0, 0, 1, 1, 0, 0]),
}


def run(*command, cwd, timeout=240):
    env = {**__import__("os").environ,
           "PATH": f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)




def solutions():
    source = nbformat.read(COURSE / "source" / ASSIGNMENT / NOTEBOOK, as_version=4)
    return {grade_id(cell): "\n".join(line for line in cell.source.splitlines()
                                      if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)
            for cell in source.cells if cell.metadata.get("nbgrader", {}).get("solution")}


def wrong_answers(good):
    wrong = {
        "schedules": good["schedules"].replace("warmup = min(stages - s - 1, microbatches)",
                                               "warmup = min(stages - s, microbatches)"),
        "tensor": good["tensor"].replace("return ReduceFromTensorParallel.apply(F.linear(x, self.weight), self.comm) + self.bias",
                                         "return F.linear(x, self.weight) + self.bias"),
        "grid": good["grid"],
        "hardware": good["hardware"].replace("size = base + (1 if g < extra else 0)",
                                             "size = base + (1 if g >= groups - extra else 0)"),
    }
    for key in ("schedules", "tensor", "hardware"):
        assert wrong[key] != good[key], key  # the mistake was made
    return wrong




@pytest.fixture(scope="module")
def graded():
    with tempfile.TemporaryDirectory(prefix="labkit-grading-ps8-") as folder:
        course = copy_course(Path(folder) / "course", cell_timeout=60, notebook_timeout=150)
        result = run(sys.executable, "-m", "nbgrader", "generate_assignment", ASSIGNMENT, cwd=course)
        assert result.returncode == 0, result.stderr
        release = nbformat.read(course / "release" / ASSIGNMENT / NOTEBOOK, as_version=4)
        good = solutions()
        for student, notebook in {"perfect": submission(release, good), "blank": submission(release),
                                  "wrong": submission(release, wrong_answers(good))}.items():
            target = course / "submitted" / student / ASSIGNMENT
            target.mkdir(parents=True)
            nbformat.write(notebook, target / NOTEBOOK)
        result = run(sys.executable, "-m", "labkit.grading", "--course", str(course), cwd=ROOT, timeout=400)
        assert result.returncode == 0, result.stdout + result.stderr
        with open(course / "grades.csv", newline="") as file:
            rows = {row["student"]: row for row in csv.DictReader(file)}
        released = (course / "release" / ASSIGNMENT / NOTEBOOK).read_text()
        feedback = (course / "feedback" / "wrong" / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
        yield rows, released, feedback


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_each_submission_gets_its_exact_score(graded):
    rows = graded[0]
    assert sorted(rows) == sorted(EXPECTED)
    for student, (total, scores) in EXPECTED.items():
        row = rows[student]
        got = [row[f"{ASSIGNMENT}:{p}"] for p in PROBLEMS]
        assert (row["score"], got) == (str(total), [str(s) for s in scores]), f"{student}: {row}"
        assert row["max_score"] == "14", student


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_release_hides_solutions_and_feedback_names_the_failed_case(graded):
    _, released, feedback = graded
    for secret in ("BEGIN SOLUTION", "BEGIN HIDDEN TESTS", "hidden_tests", "warmup = min(stages - s - 1"):
        assert secret not in released, secret
    assert "wrong number of stashed micro-batches" in feedback
    assert "output differs" in feedback
