"""Grading the course with nbgrader: the instructor's pipeline and what makes it survive what
students hand in. See docs/grading.md.

    python -m labkit.grading --course assignments      (make grade)

- pipeline.py  the steps, each with nbgrader's own commands and API, and the limits on each run;
- execute.py   GuardedExecute, nbgrader's Execute surviving dead and stuck kernels;
- processes.py ending every process a graded notebook started;
- hidden.py    hidden tests whose content stays out of the release and the feedback;
- scores.py    the score table and its CSV.

Nothing is imported here: nbgrader imports execute.py (named in nbgrader_config.py) and grading
kernels import hidden.py, each on its own.
"""
