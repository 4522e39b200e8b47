"""``python -m labkit.grading``: grade every submission of an nbgrader course directory."""

import argparse
import sys

from .pipeline import GradingError, grade_course


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m labkit.grading",
        description="Release, autograde and give feedback on every submission in "
        "COURSE/submitted/<student>/<assignment>/, then print the scores and write them as CSV.",
    )
    parser.add_argument("--course", default="assignments",
                        help="the nbgrader course directory (default: %(default)s)")
    parser.add_argument("--assignment", action="append", default=[], metavar="ID",
                        help="grade only this assignment (repeatable; default: all handed in)")
    parser.add_argument("--force", action="store_true",
                        help="grade again notebooks that were graded already")
    parser.add_argument("--csv", metavar="PATH",
                        help="where to write the scores (default: COURSE/grades.csv)")
    args = parser.parse_args(argv)
    try:
        grade_course(args.course, args.assignment, force=args.force, csv_path=args.csv)
    except GradingError as error:
        print(f"labkit.grading: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labkit.grading: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
