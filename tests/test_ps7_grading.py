"""ps7_search graded by the real pipeline (nbgrader generate, autograde, labkit.grading): a perfect,
a blank, a wrong and a tampered submission get their exact scores."""

import csv
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from .test_grading import COURSE, copy_course, grade, grade_id, run, submission

ASSIGNMENT = "ps7_search"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"
PROBLEMS = ["test_gates", "test_gates_hidden", "test_latency", "test_latency_hidden", "test_es", "test_es_hidden",
            "test_pbt", "test_pbt_hidden"]
EXPECTED = {  # student -> (total, scores of PROBLEMS), out of 10
    "perfect": (10, [1, 2, 1, 2, 1, 1, 1, 1]),
    "blank": (0, [0, 0, 0, 0, 0, 0, 0, 0]),
    "wrong": (3, [0, 0, 1, 0, 1, 1, 0, 0]),
    "tampered": (3, [0, 0, 1, 0, 1, 1, 0, 0]),
}


def solutions():
    source = nbformat.read(COURSE / "source" / ASSIGNMENT / NOTEBOOK, as_version=4)
    return {grade_id(cell): "\n".join(line for line in cell.source.splitlines() if "### " not in line)
            for cell in source.cells if cell.metadata.get("nbgrader", {}).get("solution")}




def wrong_answers(good):
    gates = good["gates"].replace("torch.softmax(alpha.detach()[list(pair)], dim=0)",
                                  "torch.softmax(alpha.detach(), dim=0)[list(pair)]")  # no renormalization
    latency = good["latency"].replace("min(range(len(lat)), key=lambda i: lat[i])",
                                      "min(reversed(range(len(lat))), key=lambda i: lat[i])")  # ties: the last
    pbt = good["pbt"].replace("c = max(1, int(round(fraction * n)))", "c = int(fraction * n)")  # nobody copies when n < 5
    assert gates != good["gates"] and latency != good["latency"] and pbt != good["pbt"]
    return {**good, "gates": gates, "latency": latency, "pbt": pbt}


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_ps7_scores_are_exact():
    with tempfile.TemporaryDirectory(prefix="labkit-grading-") as folder:
        course = copy_course(Path(folder) / "course", cell_timeout=60)
        result = run("python", "-m", "nbgrader", "generate_assignment", ASSIGNMENT, cwd=course)
        assert result.returncode == 0, result.stderr
        release = nbformat.read(course / "release" / ASSIGNMENT / NOTEBOOK, as_version=4)
        released = "\n".join(c.source for c in release.cells)
        assert "BEGIN SOLUTION" not in released and "run_hidden_tests" not in released
        good = solutions()
        wrong = wrong_answers(good)
        tampered_tests = {"test_gates": "pass", "test_latency": "assert True", "test_pbt": "pass"}
        students = {
            "perfect": submission(release, good),
            "blank": submission(release),
            "wrong": submission(release, wrong),
            "tampered": submission(release, wrong, tampered_tests, delete=["test_pbt_hidden"]),
        }
        for student, notebook in students.items():
            target = course / "submitted" / student / ASSIGNMENT
            target.mkdir(parents=True)
            nbformat.write(notebook, target / NOTEBOOK)
        start = time.monotonic()
        result = grade(course, timeout=450)
        print(result.stdout)
        print(f"graded {len(students)} ps7 submissions in {time.monotonic() - start:.0f} s")
        assert result.returncode == 0, result.stdout + result.stderr
        with open(course / "grades.csv", newline="") as file:
            rows = {row["student"]: row for row in csv.DictReader(file)}
        assert sorted(rows) == sorted(EXPECTED)
        for student, (total, scores) in EXPECTED.items():
            row = rows[student]
            got = [row[f"{ASSIGNMENT}:{p}"] for p in PROBLEMS]
            assert (row["score"], got) == (str(total), [str(s) for s in scores]), f"{student}: {row}"
            assert row["max_score"] == "10", student
        assert "edited cells restored" in rows["tampered"]["notes"]
        assert "deleted cells restored (test_pbt_hidden)" in rows["tampered"]["notes"]
