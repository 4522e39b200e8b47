"""The score table: one row per student and assignment, from nbgrader's gradebook.

A row has the total and the score of every graded cell ("problem"), in notebook order, and notes
for the instructor: what went wrong while grading (read back from the error outputs nbgrader and
GuardedExecute leave in the autograded notebook), test cells the student edited or deleted and
nbgrader restored, files handed in that are not part of the assignment, answers still to grade
by hand.
"""

import csv
from dataclasses import dataclass, field

import nbformat
from nbgrader.api import Gradebook

from .execute import KERNEL_DIED, KERNEL_STUCK, NOT_RUN

# Error outputs worth a note, by ename.
EVENTS = {
    KERNEL_STUCK: "timed out",
    KERNEL_DIED: "kernel died",
    "MemoryError": "out of memory",
    NOT_RUN: "not run",
}


@dataclass
class ScoreRow:
    student: str
    assignment: str
    score: float
    max_score: float
    problems: dict  # problem -> (score, or None while it awaits grading by hand; max score)
    notes: list = field(default_factory=list)


def score_rows(course, submissions, runs):
    """The rows for these submissions, from the gradebook, with notes from the grading runs."""
    rows = []
    with Gradebook(course.dirs.db_url, course.dirs.course_id) as gradebook:
        for sub in submissions:
            submission = gradebook.find_submission(sub.assignment, sub.student)
            notebooks = course.notebooks(sub.assignment)
            row = ScoreRow(sub.student, sub.assignment, submission.score, submission.max_score, {})
            for name in notebooks:
                grades = {g.name: g for g in _notebook(submission, name).grades}
                for grade_id in _grade_ids(course.path("source", ".", sub.assignment) / f"{name}.ipynb"):
                    grade = grades[grade_id]
                    pending = grade.needs_manual_grade and grade.manual_score is None
                    label = grade_id if len(notebooks) == 1 else f"{name}:{grade_id}"
                    row.problems[label] = (None if pending else grade.score, grade.max_score)
            for run in runs:
                if (run.student, run.assignment) == (sub.student, sub.assignment):
                    row.notes += _run_notes(course, run)
            if sub.extra_files:
                row.notes.append("extra files: " + ", ".join(sub.extra_files))
            if any(score is None for score, _ in row.problems.values()):
                row.notes.append("to grade by hand")
            if submission.total_seconds_late > 0:
                row.notes.append(f"late by {submission.total_seconds_late / 3600:.1f} h")
            rows.append(row)
    return rows


def _notebook(submission, name):
    return next(nb for nb in submission.notebooks if nb.name == name)


def _grade_ids(path):
    """The ids of the graded cells of a notebook, in order."""
    return [
        cell.metadata.nbgrader["grade_id"]
        for cell in nbformat.read(path, as_version=4).cells
        if cell.metadata.get("nbgrader", {}).get("grade")
    ]


def _run_notes(course, run):
    prefix = "" if len(course.notebooks(run.assignment)) == 1 else f"{run.notebook}: "
    notes = []
    if run.problem:
        notes.append(run.problem)
    else:
        graded = course.path("autograded", run.student, run.assignment) / f"{run.notebook}.ipynb"
        notes += _events(nbformat.read(graded, as_version=4))
        submitted = course.path("submitted", run.student, run.assignment) / f"{run.notebook}.ipynb"
        released = course.path("release", ".", run.assignment) / f"{run.notebook}.ipynb"
        notes += _restored_cells(submitted, released)
    if run.leftovers:
        notes.append(f"killed {run.leftovers} leftover process(es)")
    return [prefix + note for note in notes]


def _events(notebook):
    """'timed out (ring)', 'kernel died (test_sgd, test_sgd_hidden)', ...: one note per event."""
    where = {}
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            event = EVENTS.get(output.get("ename")) if output.output_type == "error" else None
            if event:
                label = cell.metadata.get("nbgrader", {}).get("grade_id") or f"cell {index + 1}"
                where.setdefault(event, [])
                if label not in where[event]:
                    where[event].append(label)
    return [f"{event} ({', '.join(cells)})" for event, cells in where.items()]


def _restored_cells(submitted, released):
    """Notes on the read-only cells (tests above all) the student changed or deleted: nbgrader
    graded the submission with the instructor's version of each."""
    try:
        handed_in = _locked_cells(nbformat.read(submitted, as_version=4))
    except Exception:
        return ["the notebook handed in could not be read"]
    original = _locked_cells(nbformat.read(released, as_version=4))
    edited = [cell for cell, source in original.items() if cell in handed_in and handed_in[cell] != source]
    deleted = [cell for cell in original if cell not in handed_in]
    notes = []
    if edited:
        notes.append(f"edited cells restored ({', '.join(edited)})")
    if deleted:
        notes.append(f"deleted cells restored ({', '.join(deleted)})")
    return notes


def _locked_cells(notebook):
    return {
        cell.metadata.nbgrader["grade_id"]: cell.source
        for cell in notebook.cells
        if cell.metadata.get("nbgrader", {}).get("locked")
    }


def _number(value):
    return f"{value:g}"


def format_table(rows):
    """The rows as plain-text tables, one per assignment."""
    blocks = []
    for assignment in sorted({row.assignment for row in rows}):
        group = [row for row in rows if row.assignment == assignment]
        problems = list(group[0].problems)
        header = ["student", "score", *problems, "notes"]
        lines = [header]
        for row in group:
            cells = [f"{_number(score)}" if score is not None else "?"
                     for score, _ in row.problems.values()]
            lines.append([row.student, f"{_number(row.score)} / {_number(row.max_score)}", *cells,
                          "; ".join(row.notes)])
        maxima = ", ".join(f"{p} {_number(m)}" for p, (_, m) in group[0].problems.items())
        widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
        text = [f"{assignment} (out of: {maxima}; ? = to grade by hand)"]
        for line in lines:
            text.append("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])
        blocks.append("\n".join(t.rstrip() for t in text))
    return "\n\n".join(blocks)


def write_csv(rows, path):
    """One line per row: student, assignment, score, max_score, one column per problem
    (``<assignment>:<problem>``, empty while it awaits grading by hand), notes."""
    problems = list(dict.fromkeys(f"{row.assignment}:{p}" for row in rows for p in row.problems))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, ["student", "assignment", "score", "max_score", *problems, "notes"])
        writer.writeheader()
        for row in rows:
            line = {"student": row.student, "assignment": row.assignment,
                    "score": _number(row.score), "max_score": _number(row.max_score),
                    "notes": "; ".join(row.notes)}
            for problem, (score, _) in row.problems.items():
                line[f"{row.assignment}:{problem}"] = "" if score is None else _number(score)
            writer.writerow(line)
