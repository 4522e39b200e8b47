"""The graded assignments ps1..ps5 (assignments/source/), through the real grading pipeline.

One class of four made-up students hands in every assignment: perfect (the source's solutions),
blank (the release untouched), wrong (one plausible mistake per assignment, which a test must catch)
and tampered (the same mistake, with the test cells edited to `pass` and one deleted). All twenty
notebooks are graded in one `make grade` pass (python -m labkit.grading) in a copy of the course;
the tests check each one's exact score per problem, that the release holds no solution and no hidden
test, and that the feedback renders its formulas without a network and shows no path of the grading
machine. Every notebook validates with its solutions (nbgrader validate is what `graded` implies for
`perfect`: full marks on every autograded cell).
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from .test_grading import grade_id, submission

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "assignments"
GRADING_OUTPUTS = ("release", "submitted", "autograded", "feedback", "gradebook.db", "grades.csv")
TEST_LIMITS = """
c.ExecutePreprocessor.timeout = 90
c.Execute.timeout = 90
c.GradingLimits.notebook_timeout = 400
c.GradingLimits.memory_limit_mb = 3072
"""

# assignment -> (the solution cell and the text that makes it wrong, the graded cell that must fail)
MISTAKES = {
    # equation (2) with the worker's updated weights instead of those the master received
    "ps1_easgd": ("easgd", ("center_update(center, [weights], lr, rho)",
                            "center_update(center, [workers[i]], lr, rho)"), "test_easgd"),
    # 1/3 for every neighbour: right on rings of 3 or more, not doubly stochastic on 2 or 1 node
    "ps2_consistency": ("gossip", ("mixing[i, j] = 1 / len(group)", "mixing[i, j] = 1 / 3"), "test_gossip"),
    # rounding to the nearest level: the right levels, but biased
    "ps3_compression": ("qsgd", ("torch.floor(scaled + torch.rand(x.shape, generator=generator, dtype=x.dtype))",
                                 "torch.round(scaled)"), "test_qsgd"),
    # every server sends the whole model to every worker, however many servers
    "ps4_communication": ("traffic", ("return S, workers * S / servers", "return S, workers * S"), "test_traffic"),
    # the lower rank of the interval not clipped to 1: wrong for few samples
    "ps5_measurement": ("measure", ("j = min(n, max(1, math.floor((n - z * math.sqrt(n)) / 2)))",
                                    "j = math.floor((n - z * math.sqrt(n)) / 2)"), "test_measure"),
}
ASSIGNMENTS = sorted(MISTAKES)
STUDENTS = ("perfect", "blank", "wrong", "tampered")


def run(*command, cwd, timeout=120):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def copy_course(destination):
    shutil.copytree(COURSE, destination, ignore=shutil.ignore_patterns(*GRADING_OUTPUTS, "__pycache__"))
    with open(destination / "nbgrader_config.py", "a") as config:
        config.write(TEST_LIMITS)
    return destination




def source_notebook(assignment):
    return nbformat.read(COURSE / "source" / assignment / f"{assignment}.ipynb", as_version=4)


def graded_cells(assignment):
    """[(grade_id, points, autograded)] of the source notebook, in order."""
    return [(grade_id(c), c.metadata.nbgrader["points"], c.cell_type == "code")
            for c in source_notebook(assignment).cells if c.metadata.get("nbgrader", {}).get("grade")]


def solutions(assignment):
    """grade_id -> the source's solution with the nbgrader delimiters removed."""
    return {grade_id(c): "\n".join(line for line in c.source.splitlines()
                                   if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)
            for c in source_notebook(assignment).cells if c.metadata.get("nbgrader", {}).get("solution")}


def solution_regions(assignment):
    """The text between BEGIN and END SOLUTION, region by region."""
    return [region.split("### END SOLUTION")[0] for cell in source_notebook(assignment).cells
            if cell.metadata.get("nbgrader", {}).get("solution") for region in cell.source.split("### BEGIN SOLUTION")[1:]]


def code_cells(assignment):
    return {grade_id(c) for c in source_notebook(assignment).cells if c.cell_type == "code"}




def class_of(assignment, release):
    good = solutions(assignment)
    cell, (right, mistaken), _ = MISTAKES[assignment]
    assert good[cell].count(right) == 1, f"{assignment}: the mistake no longer applies to cell {cell}"
    code_answers = {gid: text for gid, text in good.items() if gid in code_cells(assignment)}
    wrong = {**code_answers, cell: good[cell].replace(right, mistaken)}
    tests = [gid for gid, _, auto in graded_cells(assignment) if auto]
    return {
        "perfect": submission(release, good),
        "blank": submission(release),
        "wrong": submission(release, wrong),
        "tampered": submission(release, wrong, {t: "pass" for t in tests[:-1]}, delete=tests[-1:]),
    }


def expected(assignment, student):
    """(total, {problem: score or None while it awaits grading by hand})."""
    failing = MISTAKES[assignment][2]
    scores = {}
    for gid, points, auto in graded_cells(assignment):
        if student == "blank":
            scores[gid] = 0
        elif not auto:
            scores[gid] = None if student == "perfect" else 0
        else:
            scores[gid] = 0 if student in ("wrong", "tampered") and gid == failing else points
    return sum(s or 0 for s in scores.values()), scores


@pytest.fixture(scope="module")
def graded():
    """Every assignment handed in by the four students, graded in one pass."""
    folder = tempfile.TemporaryDirectory(prefix="labkit-assignments-")
    course = copy_course(Path(folder.name) / "course")
    for assignment in ASSIGNMENTS:
        result = run(sys.executable, "-m", "nbgrader", "generate_assignment", assignment, "--force", cwd=course)
        assert result.returncode == 0, result.stderr
        release = nbformat.read(course / "release" / assignment / f"{assignment}.ipynb", as_version=4)
        for student, notebook in class_of(assignment, release).items():
            target = course / "submitted" / student / assignment
            target.mkdir(parents=True)
            nbformat.write(notebook, target / f"{assignment}.ipynb")
    start = time.monotonic()
    result = run(sys.executable, "-m", "labkit.grading", "--course", str(course), cwd=ROOT, timeout=1500)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    with open(course / "grades.csv", newline="") as file:
        rows = {(row["student"], row["assignment"]): row for row in csv.DictReader(file)}
    yield course, result, rows, seconds
    folder.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_submission_gets_its_exact_score(graded):
    course, result, rows, seconds = graded
    print(result.stdout)
    print(f"graded {len(rows)} notebooks in {seconds:.0f} s")
    assert sorted(rows) == sorted((s, a) for s in STUDENTS for a in ASSIGNMENTS)
    for (student, assignment), row in rows.items():
        total, scores = expected(assignment, student)
        got = {gid: row[f"{assignment}:{gid}"] for gid in scores}
        want = {gid: "" if s is None else f"{s:g}" for gid, s in scores.items()}
        assert (row["score"], got) == (f"{total:g}", want), f"{student}/{assignment}: {row}"
        assert row["max_score"] == f"{sum(p for _, p, _ in graded_cells(assignment)):g}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_scores_are_the_documented_ones(graded):
    """The numbers docs/grading.md gives: 12 of 14 autograded (+2 by hand), 0, 9, 9."""
    rows = graded[2]
    for assignment in ASSIGNMENTS:
        assert [rows[(s, assignment)]["score"] for s in STUDENTS] == ["12", "0", "9", "9"], assignment
        assert rows[("tampered", assignment)]["notes"].startswith("edited cells restored"), assignment
        assert "deleted cells restored" in rows[("tampered", assignment)]["notes"], assignment


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_release_has_no_solutions_or_hidden_tests(graded):
    course = graded[0]
    for assignment in ASSIGNMENTS:
        released = course / "release" / assignment
        files = sorted(p.name for p in released.iterdir())
        assert files == sorted(p.name for p in (COURSE / "source" / assignment).iterdir()
                               if p.name != "__pycache__"), assignment
        text = (released / f"{assignment}.ipynb").read_text()
        secret = [line.strip() for answer in solution_regions(assignment) for line in answer.splitlines()
                  if len(line.strip()) > 16 and not line.strip().startswith(("def ", "class ", '"""', "%%", "#"))]
        hidden = (COURSE / "hidden_tests" / f"{assignment}.py").read_text()
        source = (COURSE / "source" / assignment / f"{assignment}.ipynb").read_text()
        secret += [line.strip() for line in hidden.splitlines() if len(line.strip()) > 24
                   and not line.strip().startswith(("#", "import", "from", '"""', "def "))
                   and json.dumps(line.strip())[1:-1] not in source]  # visible tests are no secret
        assert secret, assignment
        for line in secret + ["BEGIN SOLUTION", "BEGIN HIDDEN TESTS", "run_hidden_tests"]:
            assert json.dumps(line)[1:-1] not in text, f"{assignment}: {line}"
        assert not (released / "hidden_tests").exists()
        for path in released.rglob("*"):  # no file of the release, notebook or not, is solved
            if path.is_file():
                assert "BEGIN SOLUTION" not in path.read_text(errors="replace"), path


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_feedback_renders_math_offline_and_shows_no_path(graded):
    course = graded[0]
    machine_paths = {str(course), str(ROOT), sys.prefix, str(Path.home()), tempfile.gettempdir() + "/"}
    pages = sorted((course / "feedback").glob("*/*/*.html"))
    assert len(pages) == len(STUDENTS) * len(ASSIGNMENTS)
    for page in pages:
        text = page.read_text()
        assert not re.search(r"https?://[^\"'\s]*mathjax", text, re.I), f"{page}: loads MathJax from the network"
        assert "<script src=\"http" not in text, f"{page}: loads a script from the network"
        assert "<math" in text and "$$" not in text, f"{page}: formulas not rendered"
        leaks = [path for path in machine_paths if path in text]
        assert not leaks, f"{page}: shows {leaks}"
    # the failing hidden test names its case; its traceback names files, not where they are
    wrong = (course / "feedback" / "wrong" / "ps2_consistency" / "ps2_consistency.html").read_text()
    assert "hidden test &#39;gossip&#39; failed: ring_mixing_matrix(1)" in wrong or \
        "hidden test 'gossip' failed: ring_mixing_matrix(1)" in wrong
    assert "hidden.py" in wrong
