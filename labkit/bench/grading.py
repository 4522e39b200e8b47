"""``labkit bench grading``: autograding a class, one notebook at a time against several at once.

A class of ``--students`` synthetic submissions of the course's assignments (``--assignment``,
repeatable; default ps0_warmup and ps6_numerics, taken in turn) is built from the instructor's
source notebooks and nbgrader's release: perfect answers, blank ones (the release untouched),
wrong ones (the last answer left unwritten), one that hangs (a cell that sleeps until its time
limit interrupts it) and one that kills its kernel (``os._exit``). The same class is graded twice
in two copies of the course, by the real pipeline (``python -m labkit.grading``): with
``--jobs 1``, then with ``--jobs N``. Printed: submissions per minute of each, their ratio, and
whether the two score tables (the CSV, notes included) are identical. ``--json`` prints
``serial_per_min``, ``parallel_per_min``, ``ratio``, ``identical_scores``, the times and the
load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..options import whole_number

GRADING_OUTPUTS = ("release", "submitted", "autograded", "feedback", "gradebook.db", "grades.csv",
                   "__pycache__", ".nbgrader.log")
DEFAULT_ASSIGNMENTS = ("ps0_warmup", "ps6_numerics")
LIMITS = """
c.ExecutePreprocessor.timeout = {cell}
c.Execute.timeout = {cell}
c.GradingLimits.notebook_timeout = {notebook}
"""


class BenchError(Exception):
    pass


def course_source() -> Path:
    """The course directory of this checkout (assignments/ beside the labkit package)."""
    import labkit

    root = Path(labkit.__file__).resolve().parents[1] / "assignments"
    if not (root / "nbgrader_config.py").is_file():
        raise BenchError(f"no course directory at {root} (the benchmark grades the course's assignments)")
    return root


_positive = whole_number()


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"labkit bench grading: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse(argv: list[str]) -> argparse.Namespace:
    from ..grading.pipeline import default_jobs

    parser = _Parser(prog="labkit bench grading", description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=_positive, default=16,
                        help="submissions in the class (default: %(default)s, a few minutes on 2 cores)")
    parser.add_argument("--assignment", action="append", default=[], metavar="ID",
                        help=f"an assignment to hand in (repeatable; default: {' '.join(DEFAULT_ASSIGNMENTS)})")
    parser.add_argument("--jobs", type=_positive, default=2 * default_jobs(),
                        help="notebooks graded at once in the parallel run (default: twice the cores, "
                        "here %(default)s: kernels starting and cells waiting leave cores idle)")
    parser.add_argument("--cell-timeout", type=_positive, default=20,
                        help="seconds a cell may run (the hanging submission waits this long; default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--keep", metavar="DIR", help="build the courses in DIR and keep them")
    return parser.parse_args(argv)


def _run(command, cwd, timeout):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _grade_id(cell):
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def answers(source) -> dict:
    """grade_id -> the source's answer (solution delimiters removed) of every code solution cell."""
    return {
        _grade_id(cell): "\n".join(line for line in cell.source.splitlines()
                                   if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)
        for cell in source.cells
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution")
    }


def make_submission(release, replace: dict):
    notebook = copy.deepcopy(release)
    for cell in notebook.cells:
        if _grade_id(cell) in replace:
            cell.source = replace[_grade_id(cell)]
    return notebook


def kinds(students: int) -> list[str]:
    """What each student hands in: one hang and one crash (from 5 students), the rest in turn."""
    special = ["hang", "crash"] if students >= 5 else []
    cycle = ["perfect", "blank", "wrong"]
    rest = [cycle[i % 3] for i in range(students - len(special))]
    return rest[:2] + special + rest[2:]


def build_class(course: Path, assignments: list[str], students: int) -> list[tuple[str, str, str]]:
    """Hand in the class in ``course``: [(student, assignment, kind)]."""
    import nbformat

    releases, solutions = {}, {}
    for assignment in assignments:
        result = _run([sys.executable, "-m", "nbgrader", "generate_assignment", assignment, "--force"],
                      cwd=course, timeout=600)
        if result.returncode != 0:
            raise BenchError(f"nbgrader generate_assignment {assignment} failed: {result.stderr.strip()[-300:]}")
        name = f"{assignment}.ipynb"
        releases[assignment] = nbformat.read(course / "release" / assignment / name, as_version=4)
        solutions[assignment] = answers(nbformat.read(course / "source" / assignment / name, as_version=4))
    handed_in = []
    for index, kind in enumerate(kinds(students)):
        assignment = assignments[index % len(assignments)]
        good = solutions[assignment]
        first, last = list(good)[0], list(good)[-1]
        replace = {
            "perfect": good,
            "blank": {},
            "wrong": {k: v for k, v in good.items() if k != last},
            "hang": {**good, first: "import time\n\ntime.sleep(10**6)\n\n" + good[first]},
            "crash": {**good, first: good[first] + "\n\nimport os\n\nos._exit(1)\n"},
        }[kind]
        student = f"s{index + 1:03d}-{kind}"
        folder = course / "submitted" / student / assignment
        folder.mkdir(parents=True)
        nbformat.write(make_submission(releases[assignment], replace), folder / f"{assignment}.ipynb")
        handed_in.append((student, assignment, kind))
    for folder in ("release", "gradebook.db"):  # the pipeline makes them again
        path = course / folder
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return handed_in


def grade(course: Path, jobs: int, timeout: float) -> tuple[float, str, str]:
    """Grade the course with --jobs; (seconds, the CSV, the last lines of stderr)."""
    start = time.monotonic()
    result = _run([sys.executable, "-m", "labkit.grading", "--course", str(course), "--jobs", str(jobs),
                   "--progress", "lines"], cwd=course, timeout=timeout)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise BenchError(f"grading with --jobs {jobs} failed: {result.stderr.strip()[-500:]}")
    return seconds, (course / "grades.csv").read_text(), result.stderr


def loadavg() -> str:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "?"


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="labkit-bench-grading-"))
    try:
        source = course_source()
        assignments = args.assignment or list(DEFAULT_ASSIGNMENTS)
        for assignment in assignments:
            if not (source / "source" / assignment).is_dir():
                raise BenchError(f"no assignment {assignment!r} in {source / 'source'}")
        root.mkdir(parents=True, exist_ok=True)
        serial_course, parallel_course = root / "serial", root / "parallel"
        for course in (serial_course, parallel_course):
            shutil.copytree(source, course, ignore=shutil.ignore_patterns(*GRADING_OUTPUTS))
            with open(course / "nbgrader_config.py", "a") as config:
                config.write(LIMITS.format(cell=args.cell_timeout, notebook=20 * args.cell_timeout))
        if not args.json:
            print(f"building a class of {args.students} ({', '.join(assignments)}) ...", file=sys.stderr)
        handed_in = build_class(serial_course, assignments, args.students)
        shutil.rmtree(parallel_course / "submitted", ignore_errors=True)
        shutil.copytree(serial_course / "submitted", parallel_course / "submitted")
        limit = 60 + args.students * 25 * args.cell_timeout
        load_before = loadavg()
        if not args.json:
            print("grading one at a time (--jobs 1) ...", file=sys.stderr)
        serial_s, serial_csv, _ = grade(serial_course, 1, limit)
        if not args.json:
            print(f"  {serial_s:.0f} s; grading {args.jobs} at a time (--jobs {args.jobs}) ...", file=sys.stderr)
        parallel_s, parallel_csv, _ = grade(parallel_course, args.jobs, limit)
    except BenchError as error:
        print(f"labkit bench grading: error: {error}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    n = len(handed_in)
    figures = {
        "students": n,
        "assignments": assignments,
        "kinds": {kind: sum(1 for _, _, k in handed_in if k == kind) for kind in ("perfect", "blank", "wrong", "hang", "crash")},
        "jobs": args.jobs,
        "serial_s": round(serial_s, 1),
        "parallel_s": round(parallel_s, 1),
        "serial_per_min": round(60 * n / serial_s, 2),
        "parallel_per_min": round(60 * n / parallel_s, 2),
        "ratio": round(serial_s / parallel_s, 2),
        "identical_scores": serial_csv == parallel_csv,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print_figures(figures, args)
    return 0 if figures["identical_scores"] else 1


def print_figures(figures: dict, args) -> None:
    n, assignments = figures["students"], figures["assignments"]
    serial_s, parallel_s, load_before = figures["serial_s"], figures["parallel_s"], figures["loadavg_before"]
    print(f"autograding {n} submissions of {', '.join(assignments)} "
          f"({', '.join(f'{v} {k}' for k, v in figures['kinds'].items() if v)}); "
          f"cell limit {args.cell_timeout} s; load average {load_before} before, {figures['loadavg_after']} after")
    print(f"  {'run':<22} {'seconds':>8} {'submissions/min':>16}")
    print(f"  {'serial (--jobs 1)':<22} {serial_s:>8.0f} {figures['serial_per_min']:>16.2f}")
    print(f"  {f'parallel (--jobs {args.jobs})':<22} {parallel_s:>8.0f} {figures['parallel_per_min']:>16.2f}")
    print(f"  parallel / serial: {figures['ratio']:.2f}x; score tables identical: "
          f"{'yes' if figures['identical_scores'] else 'NO'}")
