"""``python -m labkit.grading``: grade every submission of an nbgrader course directory."""

import argparse
import os
import sys
from pathlib import Path

from ..options import whole_number

PROG = "python -m labkit.grading"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage and a message
        print(f"labkit.grading: error: {message}", file=sys.stderr)
        sys.exit(2)


parse_jobs = whole_number("a whole number of notebooks at once")  # --jobs


def default_jobs():
    """One notebook at a time per core this process may use (as pipeline.default_jobs)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def main(argv=None):
    parser = _Parser(
        prog=PROG,
        description="Release, autograde and give feedback on every submission in "
        "COURSE/submitted/<student>/<assignment>/, then print the scores and write them as CSV.",
    )
    parser.add_argument("--course", default="assignments",
                        help="the nbgrader course directory (default: %(default)s)")
    parser.add_argument("--assignment", action="append", default=[], metavar="ID",
                        help="grade only this assignment (repeatable; default: all handed in)")
    parser.add_argument("--force", action="store_true",
                        help="grade again notebooks that were graded already")
    parser.add_argument("--jobs", "-j", type=parse_jobs, default=None, metavar="N",
                        help=f"notebooks graded at once (default: one per core, here {default_jobs()})")
    parser.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto",
                        help="a progress bar, or one line per notebook graded "
                        "(default: a bar when stderr is a terminal)")
    parser.add_argument("--csv", metavar="PATH",
                        help="where to write the scores (default: COURSE/grades.csv)")
    args = parser.parse_args(argv)
    progress = {"auto": None, "bar": True, "lines": False}[args.progress]
    if not Path(args.course).is_dir():  # before nbgrader is imported: a second, not ten
        print(f"labkit.grading: error: course directory {args.course} not found", file=sys.stderr)
        return 2
    from .pipeline import GradingError, grade_course

    try:
        grade_course(args.course, args.assignment, force=args.force, csv_path=args.csv,
                     jobs=args.jobs, progress=progress)
    except GradingError as error:
        print(f"labkit.grading: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labkit.grading: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
