"""One writer for nbgrader's gradebook while notebooks are graded in parallel.

nbgrader's gradebook is an sqlite file that every ``nbgrader autograde`` writes several times
(the submission when it starts, the scores and comments when it ends). Several runs writing it at
once fail with "database is locked" or, worse, leave one run's grades half written. So each run
gets a copy of the gradebook of its own (``--CourseDirectory.db_url``), taken after the pipeline
created every submission, and when the run ends the grading process, and it alone, copies that
notebook's rows back into the course's gradebook in one transaction: its ``submitted_notebook``,
``grade`` and ``comment`` rows, and the submission's timestamp. Ids are the same in every copy,
so a merged notebook is exactly what nbgrader would have written itself.

A gradebook that is not an sqlite file (a database server, which handles concurrent writers
itself) is written by the runs directly.
"""

import shutil
import sqlite3
import uuid
from pathlib import Path

SQLITE = "sqlite:///"


class GradebookCopies:
    """Copies of the course's gradebook for grading runs, and the merge of their results."""

    def __init__(self, db_url, scratch):
        self.db_url = db_url
        self.path = Path(db_url[len(SQLITE):]) if db_url.startswith(SQLITE) else None
        self.scratch = Path(scratch)
        self.base = None
        if self.path is not None:
            self.snapshot()

    def snapshot(self):
        """Take the copy new runs start from (the course's gradebook as it is now)."""
        if self.path is None:
            return
        self.base = self.scratch / "gradebook-base.db"
        _backup(self.path, self.base)

    def new_copy(self):
        """A fresh copy of the snapshot for one run (None: the runs share the course's database)."""
        if self.path is None:
            return None
        copy = self.scratch / f"gradebook-{uuid.uuid4().hex[:12]}.db"
        shutil.copyfile(self.base, copy)
        return copy

    def args(self, copy):
        """nbgrader arguments that point a run at its copy."""
        return [] if copy is None else [f"--CourseDirectory.db_url={SQLITE}{copy}"]

    def discard(self, copy):
        if copy is not None:
            Path(copy).unlink(missing_ok=True)

    def merge(self, copy, assignment, student, notebook):
        """Copy one graded notebook's rows from a run's copy into the course's gradebook."""
        if copy is None:
            return
        db = sqlite3.connect(self.path, timeout=60)
        try:
            db.execute("ATTACH DATABASE ? AS run", (str(copy),))
            with db:  # one transaction
                ids = _ids(db, "run", assignment, student, notebook)
                if ids is None:
                    raise RuntimeError(f"{student}/{assignment}/{notebook} is not in its gradebook copy")
                main_ids = _ids(db, "main", assignment, student, notebook)
                if main_ids is not None and main_ids[0] != ids[0]:
                    raise RuntimeError(f"{student}/{assignment}: the submission changed while it was graded")
                submission_id, notebook_id = ids
                db.execute("UPDATE main.submitted_assignment SET timestamp = "
                           "(SELECT timestamp FROM run.submitted_assignment WHERE id = ?) WHERE id = ?",
                           (submission_id, submission_id))
                for table in ("grade", "comment"):
                    if main_ids is not None:
                        db.execute(f"DELETE FROM main.{table} WHERE notebook_id = ?", (main_ids[1],))
                    db.execute(f"INSERT INTO main.{table} SELECT * FROM run.{table} WHERE notebook_id = ?",
                               (notebook_id,))
                if main_ids is not None:
                    db.execute("DELETE FROM main.submitted_notebook WHERE id = ?", (main_ids[1],))
                db.execute("INSERT INTO main.submitted_notebook SELECT * FROM run.submitted_notebook "
                           "WHERE id = ?", (notebook_id,))
        finally:
            db.close()


def _ids(db, schema, assignment, student, notebook):
    """(submitted_assignment id, submitted_notebook id) of a notebook in a schema, or None."""
    return db.execute(
        f"SELECT sa.id, sn.id FROM {schema}.submitted_assignment sa "
        f"JOIN {schema}.assignment a ON sa.assignment_id = a.id "
        f"JOIN {schema}.submitted_notebook sn ON sn.assignment_id = sa.id "
        f"JOIN {schema}.notebook n ON sn.notebook_id = n.id "
        "WHERE a.name = ? AND sa.student_id = ? AND n.name = ?",
        (assignment, student, notebook)).fetchone()


def _backup(source, destination):
    """A consistent copy of an sqlite file (sqlite's own backup, not a byte copy)."""
    src, dst = sqlite3.connect(source, timeout=60), sqlite3.connect(destination)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
