"""ps9_performance: a performance question graded from run directories (labkit/grading/performance.py).

Real runs are made once (``labkit train``, 70 steps each), whatever the machine's load: the solution's
strong-scaling pair (the commands written in its solution cell) and a pair with the default's small
batch, which does not scale. With them, a right, a blank and a wrong submission are graded by the real
pipeline (nbgrader autograde, labkit.grading) and get their exact scores; the grading of each pair is
repeated five times and gives the same verdict each time (grading reads the runs, never times
anything); the right runs made to look as if a busy machine slowed their 2-worker run, and the small
ones as if it slowed their 1-worker run, keep their verdicts (the configuration decides, the timings
are reported); and run directories that are not what the question asks for are refused with one line
naming what is wrong.
"""

import csv
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

from labkit.grading.performance import RunCheckError, read_run, strong_scaling

from .test_grading import COURSE, copy_course, grade, grade_id, submission
from .test_selfcheck import released

ASSIGNMENT = "ps9_performance"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"
HIDDEN = COURSE / "hidden_tests" / f"{ASSIGNMENT}.py"
PROBLEMS = ["test_efficiency", "test_runs", "test_target", "scaling_answer"]
EXPECTED = {  # student -> (total, scores of PROBLEMS; None: awaits grading by hand), out of 9
    "perfect": (7, ["2", "2", "3", ""]),
    "blank": (0, ["0", "0", "0", "0"]),
    "wrong": (2, ["0", "2", "0", ""]),
}
SMALL_BATCH = {"1024": "32", "512": "16"}  # the default batch per worker: a step too small to split

# make test runs two workers (--dist loadgroup): one makes the runs, once, for all the tests here
pytestmark = pytest.mark.xdist_group("ps9_runs")


def source_cells():
    source = nbformat.read(COURSE / "source" / ASSIGNMENT / NOTEBOOK, as_version=4)
    return {grade_id(cell): cell for cell in source.cells if grade_id(cell)}


def solutions():
    return {gid: "\n".join(line for line in cell.source.splitlines() if "### " not in line)
            for gid, cell in source_cells().items() if cell.metadata.nbgrader.get("solution")}


def commands():
    """The `labkit train` command lines written in the solution's runs cell."""
    lines = [line.lstrip("# ").strip() for line in source_cells()["runs"].source.splitlines()]
    found = [shlex.split(line) for line in lines if "labkit train" in line]
    assert len(found) == 2, lines
    return found


def make_run(command, folder, replace=None):
    """Run one ``OMP_NUM_THREADS=1 labkit train ...`` line in ``folder`` (with some values replaced)."""
    env_assignments = [word for word in command if re.match(r"^[A-Z_]+=", word)]
    words = [replace.get(w, w) if replace else w for w in command[len(env_assignments):]]
    assert words[:2] == ["labkit", "train"], words
    env = {**os.environ, **dict(a.split("=", 1) for a in env_assignments)}
    result = subprocess.run([sys.executable, "-m", "labkit.cli", *words[1:], "--quiet"], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs():
    """{"right": folder, "small": folder}, each holding runs/w1 and runs/w2, made once each on the
    machine as it is (loaded or not: the verdict does not depend on it). The two pairs are made at
    the same time, each pair's runs one after the other: they load each other, which moves their
    timings and nothing else."""
    with tempfile.TemporaryDirectory(prefix="labkit-ps9-") as base:
        start = time.monotonic()
        made = {"right": Path(base) / "right", "small": Path(base) / "small"}

        def make_pair(name, replace):
            made[name].mkdir()
            for command in commands():
                make_run(command, made[name], replace)

        with ThreadPoolExecutor(2) as pool:
            for pair in [pool.submit(make_pair, "right", None), pool.submit(make_pair, "small", SMALL_BATCH)]:
                pair.result()
        print(f"runs made in {time.monotonic() - start:.0f} s, load average {os.getloadavg()[0]:.1f}; "
              + "; ".join(f"{name}: {strong_scaling(RUNS_ANSWER, within=folder).report()}"
                          for name, folder in made.items()))
        yield made


def hidden_checks():
    return runpy.run_path(str(HIDDEN), run_name="hidden_tests.ps9_performance")


def verdict(check, folder, runs_answer):
    """'pass' or the failure message of one hidden check, run in the submission's folder."""
    here = Path.cwd()
    os.chdir(folder)
    try:
        check(runs_answer)
        return "pass"
    except AssertionError as failure:
        return str(failure)
    finally:
        os.chdir(here)


RUNS_ANSWER = {1: ["runs/w1"], 2: ["runs/w2"]}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scores_are_exact(runs):
    with tempfile.TemporaryDirectory(prefix="labkit-grading-") as folder:
        course = copy_course(Path(folder) / "course", cell_timeout=60)
        # the release as nbgrader's preprocessors make it (grading runs generate_assignment itself:
        # its release is compared with this one below)
        release = released(nbformat.read(COURSE / "source" / ASSIGNMENT / NOTEBOOK, as_version=4))
        good = solutions()
        wrong = {**good, "efficiency": good["efficiency"].replace("(workers * statistics.median", "(statistics.median")}
        assert wrong["efficiency"] != good["efficiency"]
        students = {"perfect": (submission(release, good), runs["right"]),
                    "blank": (submission(release), None),
                    "wrong": (submission(release, wrong), runs["small"])}
        for student, (notebook, run_folder) in students.items():
            target = course / "submitted" / student / ASSIGNMENT
            target.mkdir(parents=True)
            nbformat.write(notebook, target / NOTEBOOK)
            if run_folder:
                shutil.copytree(run_folder / "runs", target / "runs")
        start = time.monotonic()
        result = grade(course, timeout=500)
        print(result.stdout)
        print(f"graded {len(students)} ps9 submissions in {time.monotonic() - start:.0f} s")
        assert result.returncode == 0, result.stdout + result.stderr
        release_made = nbformat.read(course / "release" / ASSIGNMENT / NOTEBOOK, as_version=4)
        assert [c.source for c in release_made.cells] == [c.source for c in release.cells]
        text = "\n".join(c.source for c in release_made.cells)
        assert "BEGIN SOLUTION" not in text and "run_hidden_tests" not in text and "MIN_BATCH" not in text
        assert "--batch-size 1024" not in text
        with open(course / "grades.csv", newline="") as file:
            rows = {row["student"]: row for row in csv.DictReader(file)}
        for student, (total, scores) in EXPECTED.items():
            row = rows[student]
            got = [row[f"{ASSIGNMENT}:{p}"] for p in PROBLEMS]
            assert (row["score"], got) == (str(total), scores), f"{student}: {row}"
            assert row["max_score"] == "9", student
        feedback = (course / "feedback" / "wrong" / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
        # the verdict, with the counts that decided it and what was measured, in the student's feedback
        assert "target not met: each of the 2 workers computes 16 samples per step" in feedback
        assert "measured: 1 worker:" in feedback
        assert "MIN_BATCH" not in feedback


@pytest.mark.slow
def test_the_same_runs_get_the_same_grade_five_times(runs):
    checks = hidden_checks()
    for name, target in (("right", "pass"), ("small", "target not met: ")):
        verdicts = {(check, verdict(checks[check], runs[name], RUNS_ANSWER))
                    for _ in range(5) for check in ("runs", "target")}
        assert len(verdicts) == 2, verdicts  # one verdict per check, five times over
        assert dict(verdicts)["runs"] == "pass", verdicts
        assert dict(verdicts)["target"].startswith(target), verdicts
    small = strong_scaling(RUNS_ANSWER, within=runs["small"], dataset="digits")
    assert (small.batch_per_worker, small.workers) == (16, 2)
    assert small.bytes_per_step > 0


def stretch_times(run_dir, factor):
    """Make a run look as if a busy machine ran it ``factor`` times slower: every record's time."""
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({**r, "t": r["t"] * factor} if "t" in r else r) + "\n"
                               for r in records))


@pytest.mark.slow
def test_a_busy_machine_neither_fails_a_right_answer_nor_passes_a_wrong_one(runs, tmp_path):
    """The timings a loaded machine gives move the measured efficiency, not the verdict."""
    checks = hidden_checks()
    right, small = tmp_path / "right", tmp_path / "small"
    shutil.copytree(runs["right"], right)
    shutil.copytree(runs["small"], small)
    stretch_times(right / "runs" / "w2", 4.0)  # its 2 workers waited for busy cores
    stretch_times(small / "runs" / "w1", 10.0)  # its 1 worker was the one slowed
    slowed = strong_scaling(RUNS_ANSWER, within=right)
    flattered = strong_scaling(RUNS_ANSWER, within=small)
    assert slowed.efficiency < 0.55 < flattered.efficiency, (slowed.report(), flattered.report())
    assert verdict(checks["target"], right, RUNS_ANSWER) == "pass"
    message = verdict(checks["target"], small, RUNS_ANSWER)
    assert message.startswith("target not met: each of the 2 workers computes 16 samples per step"), message
    assert f"efficiency {flattered.efficiency:.2f}" in message  # the measurement is reported, not trusted


def broken_copy(runs, tmp_path, change):
    """A copy of the right runs with ``change(folder)`` applied; the message strong_scaling gives."""
    folder = tmp_path / "sub"
    shutil.copytree(runs["small"], folder)
    answer = change(folder)
    answer = answer if isinstance(answer, dict) else RUNS_ANSWER
    with pytest.raises(RunCheckError) as failure:
        strong_scaling(answer, within=folder, dataset="digits", model="mlp")
    message = str(failure.value)
    assert "\n" not in message
    return message


def edit_json(path, **fields):
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


@pytest.mark.slow
def test_runs_that_are_not_what_is_asked_are_refused(runs, tmp_path):
    def w2(folder):
        return folder / "runs" / "w2"

    cases = {
        "keys 1 and 2": lambda f: {1: ["runs/w1"]},
        "relative to the notebook's folder": lambda f: {1: [str(f / "runs/w1")], 2: ["runs/w2"]},
        "inside it": lambda f: {1: ["runs/../runs/w1"], 2: ["runs/w2"]},
        "is a symbolic link": lambda f: (shutil.move(w2(f), f / "elsewhere"), os.symlink(f / "elsewhere", w2(f)))[-1],
        "no such run directory": lambda f: shutil.rmtree(w2(f)),
        "summary.json is not JSON": lambda f: (w2(f) / "summary.json").write_text("{"),
        "did not complete": lambda f: edit_json(w2(f) / "summary.json", status="failed"),
        "ran 2 worker(s), listed under 1": lambda f: {1: ["runs/w2"], 2: ["runs/w1"]},
        "strong scaling keeps the global batch": lambda f: (
            shutil.copytree(runs["right"] / "runs" / "w1", f / "runs" / "big"), {1: ["runs/big"], 2: ["runs/w2"]})[-1],
        "rank 0 saw 1120 samples in 70 steps of batch 32": lambda f: edit_json(
            w2(f) / "config.json", config={**json.loads((w2(f) / "config.json").read_text())["config"], "batch_size": 32}),
        "the last training record is step 70, not 80": lambda f: edit_json(
            w2(f) / "config.json", config={**json.loads((w2(f) / "config.json").read_text())["config"], "steps": 80}),
        "differ in lr": lambda f: edit_json(
            w2(f) / "config.json", config={**json.loads((w2(f) / "config.json").read_text())["config"], "lr": 0.5}),
        "line 3 of metrics.jsonl is not JSON": lambda f: (w2(f) / "metrics.jsonl").write_text(
            "\n".join((w2(f) / "metrics.jsonl").read_text().splitlines()[:2] + ["{not json"]) + "\n"),
        "expected one from each of its 2 workers": lambda f: (w2(f) / "metrics.jsonl").write_text("".join(
            line + "\n" for line in (w2(f) / "metrics.jsonl").read_text().splitlines() if '"rank":1' not in line)),
    }
    for expected, change in cases.items():
        message = broken_copy(runs, tmp_path, change)
        assert expected in message, (expected, message)
        shutil.rmtree(tmp_path / "sub")
    with pytest.raises(RunCheckError, match="at least 50 are needed"):
        strong_scaling(RUNS_ANSWER, within=runs["small"], min_intervals=50)
    with pytest.raises(RunCheckError, match="the question asks for 'mnist'"):
        strong_scaling(RUNS_ANSWER, within=runs["small"], dataset="mnist")
    assert len(read_run("runs/w1", runs["small"]).step_seconds) == 5  # 7 records, 6 intervals, warm-up dropped
