"""The nbgrader course (assignments/) and its grading pipeline (labkit.grading).

The slow tests grade a class of made-up submissions of ps0_warmup, built from the source and
release notebooks, in a copy of the course directory with short limits, and check each one's
exact score, the notes of the score table, that tampered tests are graded in the instructor's
version, that no process a submission started survives, that neither the release nor the
feedback gives away solutions or hidden tests, and that the widget cell stays inert.
"""

import copy
import csv
import html
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

from labkit.grading.processes import TOKEN_VARIABLE, kill_processes_with_token, new_token

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "assignments"
ASSIGNMENT = "ps0_warmup"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"
HIDDEN_TESTS = COURSE / "hidden_tests" / f"{ASSIGNMENT}.py"
GRADING_OUTPUTS = ("release", "submitted", "autograded", "feedback", "gradebook.db", "grades.csv")

# Limits for the test class: short, so that it grades in a couple of minutes on two cores.
TEST_LIMITS = """
c.ExecutePreprocessor.timeout = {cell}
c.Execute.timeout = {cell}
c.GradingLimits.notebook_timeout = {notebook}
c.GradingLimits.memory_limit_mb = 3072
"""
CELL_TIMEOUT = 20

PROBLEMS = ["test_sgd", "test_sgd_hidden", "test_ring", "test_ring_hidden", "ring_cost"]
# student -> (total, scores of PROBLEMS; None: awaits grading by hand), out of 9 (2 by hand)
EXPECTED = {
    "perfect": (7, [1, 2, 2, 2, None]),
    "blank": (0, [0, 0, 0, 0, 0]),
    # partial credit: 2 of the 5 rings of the hidden ring check divide their buffer lengths
    "wrong": (3.8, [1, 0, 2, 0.8, 0]),
    "loop": (3, [1, 2, 0, 0, None]),
    "stubborn": (3, [1, 2, 0, 0, None]),
    "crash": (4, [0, 0, 2, 2, None]),
    "memory": (3, [1, 2, 0, 0, None]),
    "tampered": (3.8, [1, 0, 2, 0.8, 0]),
    "orphans": (7, [1, 2, 2, 2, None]),
    "corrupt": (0, [0, 0, 0, 0, 0]),
}


def run(*command, cwd, timeout=120):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def copy_course(destination, cell_timeout=CELL_TIMEOUT, notebook_timeout=150):
    """A copy of the course directory, without grading outputs, with the test's limits."""
    shutil.copytree(COURSE, destination,
                    ignore=shutil.ignore_patterns(*GRADING_OUTPUTS, "__pycache__"))
    with open(destination / "nbgrader_config.py", "a") as config:
        config.write(TEST_LIMITS.format(cell=cell_timeout, notebook=notebook_timeout))
    return destination


@pytest.fixture
def scratch():
    """A temporary folder of this test's own (pytest's tmp_path may be pruned by other runs)."""
    with tempfile.TemporaryDirectory(prefix="labkit-grading-") as folder:
        yield Path(folder)


def grade(course, *args, timeout=300):
    return run(sys.executable, "-m", "labkit.grading", "--course", str(course), *args,
               cwd=ROOT, timeout=timeout)


# --- building submissions ---------------------------------------------------------------------

def grade_id(cell):
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def solutions():
    """grade_id -> the source's solution, delimiters removed, for every solution cell."""
    source = nbformat.read(COURSE / "source" / ASSIGNMENT / NOTEBOOK, as_version=4)
    return {
        grade_id(cell): "\n".join(line for line in cell.source.splitlines()
                                  if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)
        for cell in source.cells if cell.metadata.get("nbgrader", {}).get("solution")
    }


def submission(release, answers=None, tests=None, delete=()):
    """A copy of the release notebook with some cells' sources replaced (answers, tests:
    grade_id -> source) and some cells deleted."""
    notebook = copy.deepcopy(release)
    replace = {**(answers or {}), **(tests or {})}
    notebook.cells = [cell for cell in notebook.cells if grade_id(cell) not in delete]
    for cell in notebook.cells:
        if grade_id(cell) in replace:
            cell.source = replace[grade_id(cell)]
    return notebook


def class_of_submissions(release):
    """student -> notebook (or raw text, for one that is not a notebook at all)."""
    good = solutions()
    wrong = {
        # sums the workers' gradients instead of averaging them: right for one worker only
        "sgd": good["sgd"].replace(" / len(shards)", ""),
        # np.split needs lengths the ring size divides
        "ring": good["ring"].replace("np.array_split(", "np.split("),
    }
    loop = {**good, "ring": "while True:\n    pass\n\n" + good["ring"]}
    stubborn = {**good, "ring": (
        "import time\n\nwhile True:  # swallows the interrupt\n    try:\n        time.sleep(0.1)\n"
        "    except KeyboardInterrupt:\n        pass\n\n" + good["ring"])}
    crash = {**good, "sgd": "import os\n\n" + good["sgd"].replace(
        "    gradients = [", "    os._exit(1)\n    gradients = [")}
    memory = {**good, "ring": good["ring"].replace(
        "    n = len(buffers)\n",
        # 5 GiB, 128 MiB at a time, untouched: only the address-space limit can stop it
        "    hog = [np.empty(1 << 24) for _ in range(40)]\n"
        "    n = len(buffers)\n")}
    orphans = {**good, "sgd": good["sgd"] + (
        "\n\nimport subprocess\n\n"
        "sleeper = subprocess.Popen(['setsid', 'sleep', '1000'])  # a new session\n"
        "with open('session.pid', 'w') as file:\n    file.write(str(sleeper.pid))\n"
        "# a double fork: sh starts sleep in the background and exits, orphaning it\n"
        "subprocess.run(['sh', '-c', 'sleep 1000 > /dev/null 2>&1 & echo $! > orphan.pid'],\n"
        "               start_new_session=True)\n")}
    tampered = {"test_sgd": "pass", "test_sgd_hidden": "pass", "test_ring": "assert True"}
    return {
        "perfect": submission(release, good),
        "blank": submission(release),
        "wrong": submission(release, wrong),
        "loop": submission(release, loop),
        "stubborn": submission(release, stubborn),
        "crash": submission(release, crash),
        "memory": submission(release, memory),
        "tampered": submission(release, wrong, tampered, delete=["test_ring_hidden"]),
        "orphans": submission(release, orphans),
        "corrupt": '{"cells": [ this is not a notebook',
    }


def hand_in(course, student, notebook):
    folder = course / "submitted" / student / ASSIGNMENT
    folder.mkdir(parents=True)
    if isinstance(notebook, str):
        (folder / NOTEBOOK).write_text(notebook)
    else:
        nbformat.write(notebook, folder / NOTEBOOK)


def alive(pid):
    """Whether pid is a live process (a zombie is dead, only not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def visible_text(path):
    """The text of an HTML page, tags removed."""
    return html.unescape(re.sub(r"<[^>]+>", "", Path(path).read_text()))


# --- fast tests -------------------------------------------------------------------------------

def test_source_notebook_validates(scratch):
    course = copy_course(scratch / "course", cell_timeout=60)
    result = run(sys.executable, "-m", "nbgrader", "validate", f"source/{ASSIGNMENT}/{NOTEBOOK}",
                 cwd=course)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success! Your notebook passes all the tests." in result.stdout, result.stdout


def test_missing_course_directory_is_one_line(scratch):
    result = grade(scratch / "nowhere")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"labkit.grading: error: course directory {scratch / 'nowhere'} not found"]


def test_no_submissions_is_one_line(scratch):
    course = copy_course(scratch / "course")
    result = grade(course)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("labkit.grading: error: no submissions"), lines
    assert not (course / "gradebook.db").exists()


def test_processes_with_the_token_are_killed_whatever_their_session():
    token = new_token()
    env = {**os.environ, TOKEN_VARIABLE: token}
    session = subprocess.Popen(["setsid", "sleep", "1000"], env=env)
    # a double fork: sh starts sleep in the background and exits, orphaning it
    subprocess.run(["sh", "-c", "sleep 1000 > /dev/null 2>&1 &"], env=env,
                   start_new_session=True, check=True)
    stranger = subprocess.Popen(["sleep", "1000"])  # no token: must be left alone
    try:
        assert kill_processes_with_token(token) == 2
        session.wait(timeout=5)
        assert alive(stranger.pid)
        assert kill_processes_with_token(token) == 0
    finally:
        stranger.kill()
        stranger.wait()


# --- grading a class --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def release():
    """The notebook students get, as nbgrader generates it."""
    with tempfile.TemporaryDirectory(prefix="labkit-grading-") as folder:
        course = copy_course(Path(folder) / "course")
        result = run(sys.executable, "-m", "nbgrader", "generate_assignment", ASSIGNMENT, cwd=course)
        assert result.returncode == 0, result.stderr
        return nbformat.read(course / "release" / ASSIGNMENT / NOTEBOOK, as_version=4)


@pytest.fixture(scope="module")
def graded(release):
    """A class of submissions, graded by the pipeline: (course, its output, CSV rows, seconds)."""
    folder = tempfile.TemporaryDirectory(prefix="labkit-grading-")
    course = copy_course(Path(folder.name) / "course")
    for student, notebook in class_of_submissions(release).items():
        hand_in(course, student, notebook)
    start = time.monotonic()
    result = grade(course, "--jobs", "3")  # in parallel: the scores are those of one at a time
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout + result.stderr
    with open(course / "grades.csv", newline="") as file:
        rows = {row["student"]: row for row in csv.DictReader(file)}
    yield course, result, rows, seconds
    folder.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_submission_gets_its_exact_score(graded):
    course, result, rows, seconds = graded
    print(result.stdout)
    print(f"graded {len(EXPECTED)} submissions in {seconds:.0f} s")
    assert sorted(rows) == sorted(EXPECTED)
    for student, (total, scores) in EXPECTED.items():
        row = rows[student]
        got = [row[f"{ASSIGNMENT}:{p}"] for p in PROBLEMS]
        want = ["" if s is None else str(s) for s in scores]
        assert (row["score"], got) == (str(total), want), f"{student}: {row}"
        assert row["max_score"] == "9", student


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_score_table_says_what_happened(graded):
    _, result, rows, _ = graded
    notes = {student: row["notes"] for student, row in rows.items()}
    assert notes["perfect"] == "to grade by hand"
    assert notes["blank"] == ""
    assert "timed out (ring)" in notes["loop"]
    assert "timed out (ring)" in notes["stubborn"]
    assert "kernel died (test_sgd, test_sgd_hidden)" in notes["crash"]
    assert "out of memory (test_ring" in notes["memory"]
    assert "edited cells restored (test_sgd, test_sgd_hidden, test_ring)" in notes["tampered"]
    assert "deleted cells restored (test_ring_hidden)" in notes["tampered"]
    assert "killed 2 leftover process(es)" in notes["orphans"]
    assert notes["corrupt"].startswith("not graded: nbgrader autograde failed")
    for student in ("perfect", "blank", "wrong"):
        assert f"\n{student} " in result.stdout  # the table is printed


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tampered_test_cells_are_graded_in_the_instructors_version(graded):
    course = graded[0]
    source = nbformat.read(course / "source" / ASSIGNMENT / NOTEBOOK, as_version=4)
    graded_nb = nbformat.read(course / "autograded" / "tampered" / ASSIGNMENT / NOTEBOOK, as_version=4)
    instructor = {grade_id(c): c.source for c in source.cells
                  if (grade_id(c) or "").startswith("test_")}
    ran = {grade_id(c): c.source for c in graded_nb.cells if grade_id(c) in instructor}
    for test, code in instructor.items():
        assert ran[test].endswith(code), test  # a restored deleted cell starts with nbgrader's note
    assert "BEGIN HIDDEN TESTS" in ran["test_ring_hidden"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_no_process_started_by_a_submission_survives(graded):
    folder = graded[0] / "autograded" / "orphans" / ASSIGNMENT
    pids = [int((folder / name).read_text()) for name in ("session.pid", "orphan.pid")]
    assert not [pid for pid in pids if alive(pid)]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_release_has_no_solutions_or_hidden_tests(graded):
    course = graded[0]
    released = course / "release" / ASSIGNMENT
    assert sorted(p.name for p in released.iterdir()) == ["ps0_explore.py", NOTEBOOK]
    text = (released / NOTEBOOK).read_text()
    source = nbformat.read(course / "source" / ASSIGNMENT / NOTEBOOK, as_version=4)
    secret_lines = [line.strip() for answer in solutions().values() for line in answer.splitlines()
                    if len(line.strip()) > 12 and "def " not in line and '"""' not in line]
    for cell in source.cells:
        if "BEGIN HIDDEN TESTS" in cell.source:
            region = cell.source.split("### BEGIN HIDDEN TESTS")[1].split("### END HIDDEN TESTS")[0]
            secret_lines += [line.strip() for line in region.splitlines() if line.strip()]
    assert secret_lines
    for line in secret_lines + ["BEGIN SOLUTION", "BEGIN HIDDEN TESTS", "hidden_tests"]:
        assert json.dumps(line)[1:-1] not in text, line


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_feedback_shows_no_hidden_test_content(graded):
    course = graded[0]
    notebook_text = (course / "source" / ASSIGNMENT / NOTEBOOK).read_text()
    hidden = [line.strip() for line in HIDDEN_TESTS.read_text().splitlines()
              if len(line.strip()) > 12 and not line.strip().startswith("#")
              and json.dumps(line.strip())[1:-1] not in notebook_text]
    pages = sorted((course / "feedback").glob(f"*/{ASSIGNMENT}/{ASSIGNMENT}.html"))
    assert len(pages) == len(EXPECTED) - 1  # every submission but the corrupt one
    for page in pages:
        leaks = [line for line in hidden if line in visible_text(page)]
        assert not leaks, f"{page}: {leaks}"
    # each failing hidden case says on what it ran and what went wrong, and nothing more
    wrong = visible_text(course / "feedback" / "wrong" / ASSIGNMENT / f"{ASSIGNMENT}.html")
    for case in ("case 1: 4 workers, batch 12, a (1, 3) model", "case 4: 3 workers, batch 6, a (1, 1) model"):
        assert f"hidden test 'sgd' failed: {case}: " in wrong, case
    assert "4 workers do not take the whole-batch SGD step" in wrong
    for case in ("2 ranks, 7 elements of float32", "5 ranks, 23 elements of float64",
                 "6 ranks, 4 elements of float64"):
        assert f"hidden test 'ring' failed: {case}: ValueError in your code" in wrong, case
    assert "hidden test 'ring' failed: 1 ranks" not in wrong  # the cases that passed are not listed
    assert "hidden test 'ring': 2 of 5 cases passed, 0.8 of 2 points" in wrong
    # a blank submission's feedback gives away no solution
    blank = visible_text(course / "feedback" / "blank" / ASSIGNMENT / f"{ASSIGNMENT}.html")
    answers = [line.strip() for answer in solutions().values() for line in answer.splitlines()
               if len(line.strip()) > 12 and "def " not in line and '"""' not in line]
    assert answers and not [line for line in answers if line in blank]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_widget_cell_is_inert_while_grading(graded):
    course = graded[0]
    for student in ("perfect", "blank", "crash"):
        notebook = nbformat.read(course / "autograded" / student / ASSIGNMENT / NOTEBOOK, as_version=4)
        explore = next(c for c in notebook.cells if grade_id(c) == "explore")
        # no widget, no error: one stdout stream (the grader merges a print split by a busy kernel)
        assert [(o.output_type, o.name) for o in explore.outputs] == [("stream", "stdout")], (
            student, explore.outputs)
        assert "skipped while nbgrader runs" in explore.outputs[0].text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_notebook_past_its_time_limit_is_stopped_and_scores_zero(scratch, release):
    # no cell runs past its own limit: only the notebook's stops it
    course = copy_course(scratch / "course", cell_timeout=300, notebook_timeout=20)
    good = solutions()
    slow = {**good, "sgd": "import time\n\ntime.sleep(200)\n\n" + good["sgd"]}
    hand_in(course, "slow", submission(release, slow))
    start = time.monotonic()
    result = grade(course)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 150
    with open(course / "grades.csv", newline="") as file:
        (row,) = csv.DictReader(file)
    assert row["score"] == "0"
    assert row["notes"].startswith("time limit: stopped after 20 s")
    assert re.search(r"killed [1-9]\d* leftover", row["notes"])  # the kernel, at least
