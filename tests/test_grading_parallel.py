"""Grading in parallel (python -m labkit.grading --jobs N): the same score table as one at a time.

A small class of ps0_warmup (a cell that hangs, a kernel that crashes; every other answer right)
is graded with --jobs 1 and with --jobs 2 in two copies of the course, with short limits; the two
CSVs must be identical, row for row and note for note, and the parallel run must show its
running score table. Bad --jobs and a missing course directory end in one line and exit 2.
"""

import csv
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .test_grading import (  # noqa: F401 - release is a fixture, shared with test_grading
    ASSIGNMENT,
    NOTEBOOK,
    ROOT,
    copy_course,
    grade,
    hand_in,
    release,
    run,
    solutions,
    submission,
)

CELL_TIMEOUT = 20


def small_class(released):
    good = solutions()
    hang = {**good, "ring": "import time\n\ntime.sleep(1000)\n\n" + good["ring"]}
    crash = {**good, "sgd": "import os\n\n" + good["sgd"].replace(
        "    gradients = [", "    os._exit(1)\n    gradients = [")}
    return {
        "hang": submission(released, hang),
        "crash": submission(released, crash),
    }


@pytest.fixture(scope="module")
def both(release):  # noqa: F811 - the fixture imported above
    """The class graded one at a time and two at a time: {jobs: (result, csv text, rows, seconds)}."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="labkit-grading-") as folder:
        for jobs in (1, 2):
            course = copy_course(Path(folder) / f"course-{jobs}", cell_timeout=CELL_TIMEOUT, notebook_timeout=120)
            for student, notebook in small_class(release).items():
                hand_in(course, student, notebook)
            start = time.monotonic()
            result = grade(course, "--jobs", str(jobs))
            seconds = time.monotonic() - start
            assert result.returncode == 0, result.stdout + result.stderr[-3000:]
            text = (course / "grades.csv").read_text()
            with open(course / "grades.csv", newline="") as file:
                rows = {row["student"]: row for row in csv.DictReader(file)}
            out[jobs] = (result, text, rows, seconds)
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_parallel_scores_are_the_serial_ones(both):
    serial, parallel = both[1], both[2]
    print(f"--jobs 1: {serial[3]:.0f} s, --jobs 2: {parallel[3]:.0f} s")
    assert parallel[1] == serial[1]  # the whole CSV: scores, problems, notes
    rows = serial[2]
    assert "timed out (ring)" in rows["hang"]["notes"] and rows["hang"]["score"] == "3"
    assert "kernel died (test_sgd, test_sgd_hidden)" in rows["crash"]["notes"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_running_score_table_shows_every_notebook(both):
    result = both[2][0]
    lines = [line for line in result.stderr.splitlines() if re.match(r"\s+\[\d+/\d+\] ", line)]
    assert len(lines) == 2, result.stderr
    assert [line.split("]")[0].strip() + "]" for line in lines] == ["[1/2]", "[2/2]"]
    crash = next(line for line in lines if " crash " in line)
    assert "4 / 9 +?" in crash and "graded" in crash


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "expected a whole number of notebooks at once >= 1, got 0"),
    (["--jobs", "abc"], "expected a whole number of notebooks at once >= 1, got 'abc'"),
    (["--course", "/nowhere/course"], "course directory /nowhere/course not found"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run(sys.executable, "-m", "labkit.grading", *args, cwd=ROOT, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("labkit.grading: error: "), lines
    assert lines[0].endswith(message), lines


def test_progress_is_a_bar_or_one_line_per_notebook(capsys):
    from labkit.grading.pipeline import NotebookRun, _Progress

    run = NotebookRun("alice", "ps0_warmup", "ps0_warmup")
    lines = _Progress(2, bar=False)
    lines.done(run, "alice  7 / 9")
    lines.close()
    assert capsys.readouterr().err == "  [1/2] alice  7 / 9\n"
    bar = _Progress(2, bar=True)
    bar.done(run, "alice  7 / 9")
    bar.done(run, "bob  0 / 9")
    bar.close()
    err = capsys.readouterr().err
    assert "  [1/2] alice  7 / 9\n" in err and "  [2/2] bob  0 / 9\n" in err
    assert "2/2" in err.replace("[2/2]", "") and "notebook" in err  # the bar itself
