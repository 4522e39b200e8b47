"""Grading the course with nbgrader: the instructor's pipeline and what makes it survive what
students hand in. See docs/grading.md.

    python -m labkit.grading --course assignments [--jobs N]      (make grade)

- pipeline.py  the steps, each with nbgrader's own commands and API, the limits on each run, and
               the runs in parallel (--jobs) with a progress bar and a running score table;
- gradebook.py one writer for nbgrader's sqlite gradebook: a copy per run, merged back;
- execute.py   GuardedExecute, nbgrader's Execute surviving dead and stuck kernels;
- processes.py ending every process a graded notebook started;
- hidden.py    hidden tests whose content stays out of the release and the feedback, with a
               message per failing case and partial credit per case;
- selfcheck.py the students' self-check: visible tests run, hidden groups listed;
- scores.py    the score table and its CSV.

Nothing is imported here: nbgrader imports execute.py (named in nbgrader_config.py) and grading
kernels import hidden.py (students' kernels selfcheck.py), each on its own.
"""
