"""nbgrader configuration of the labkit course.

nbgrader reads this file whenever it runs in this directory (`cd assignments && nbgrader ...`),
and so does the grading pipeline, `python -m labkit.grading --course assignments` (`make grade`),
which also reads the GradingLimits at the bottom. See docs/grading.md.
"""

c = get_config()  # noqa: F821 (nbgrader provides get_config when it loads this file)

c.CourseDirectory.course_id = "labkit"
# Files a notebook writes when it runs (ps4's %%writefile of the student's allreduce) are never
# copied: the release would otherwise carry an instructor's solved copy, and grading uses the
# notebook's own cell, which writes the file anew.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", "ps4_allreduce.py"]
# The gradebook is nbgrader's default, sqlite:///<this directory>/gradebook.db: it is created
# by the first `nbgrader generate_assignment` (a fresh clone has none) and is not committed.

# Every notebook is graded in the course's own kernel (`make setup` registers it by this name).
c.Execute.kernel_name = "labkit"

# Per-cell time limit in seconds. Set on both classes: users report that some nbgrader paths
# ignore the ExecutePreprocessor setting (nbgrader #1004, #1463). A cell past its limit is
# interrupted and fails; the rest of the notebook still runs.
c.ExecutePreprocessor.timeout = 60
c.Execute.timeout = 60
c.Execute.interrupt_on_timeout = True
# When the last cell is done the kernel is killed at once: nothing of a student's is worth
# waiting for (atexit hooks, threads), and nothing of it should run after grading.
c.Execute.shutdown_kernel = "immediate"

# Autograding runs nbgrader's own steps, with its Execute swapped for GuardedExecute: a cell
# that kills the kernel or ignores the interrupt fails on its own, the kernel is restarted and
# the notebook goes on; a cell that cannot run any more fails rather than passes (nbgrader #427).
# The classes are named by import path so that other nbgrader commands do not import them.
c.Autograde.autograde_preprocessors = [
    "labkit.grading.execute.GuardedExecute",
    "nbgrader.preprocessors.IgnorePattern",
    "nbconvert.preprocessors.ClearMetadataPreprocessor",
    "nbgrader.preprocessors.LimitOutput",
    "nbgrader.preprocessors.SaveAutoGrades",
    "nbgrader.preprocessors.AssignLatePenalties",
    "nbgrader.preprocessors.CheckCellMetadata",
]
c.GuardedExecute.max_kernel_restarts = 3

# Test cells a student edited are replaced by the instructor's version (nbgrader's checksums,
# always on); test cells a student deleted are put back and run rather than skipped.
c.OverwriteCells.add_missing_cells = True

# Limits the grading pipeline puts around each `nbgrader autograde` of one notebook.
# notebook_timeout: seconds of wall-clock time for the whole notebook; past it the run is
# killed and the notebook scores 0 ("time limit" in the score table).
# memory_limit_mb: address-space limit of the run and of every process it starts, the
# kernel included; a memory blowup becomes a MemoryError in the student's cell.
c.GradingLimits.notebook_timeout = 600
c.GradingLimits.memory_limit_mb = 4096

# Feedback that works offline and shows nothing of the grading machine (labkit/grading/feedback.py):
# the formulas become MathML (browsers draw it; nbgrader's page would load MathJax from a CDN),
# every absolute path in an output becomes its last part, and the page is nbgrader's feedback page
# without its MathJax script (template labkit_feedback, built on nbgrader's "feedback").
# The packages' folders are found without importing them.
import importlib.util  # noqa: E402
import os  # noqa: E402


def _package_folder(name):
    return os.path.dirname(importlib.util.find_spec(name).origin)


c.GenerateFeedback.preprocessors = [
    "nbgrader.preprocessors.GetGrades",
    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
    "labkit.grading.feedback.OfflineFeedback",
]
c.HTMLExporter.template_name = "labkit_feedback"
c.HTMLExporter.extra_template_basedirs = [
    os.path.join(_package_folder("labkit"), "grading", "templates"),
    os.path.join(_package_folder("nbgrader"), "server_extensions", "formgrader", "templates"),
]
