"""The ring allreduce explorer of PS0: sliders for the number of ranks and the buffer size.

A widget needs a live notebook to be any use. When nbgrader runs the notebook (validate or
autograde, which set NBGRADER_EXECUTION in the kernel's environment) no one is there to move a
slider, so the explorer prints one line and returns without creating a widget: nothing can wait
on a frontend or fail for want of one (nbgrader #1359, nbconvert #1921).
"""

import os
import sys

import ipywidgets as widgets
from IPython.display import display


def describe_ring(ring_schedule, n, megabytes):
    """The schedule ring_schedule(n) as a table, and what each rank sends for a buffer of that size."""
    schedule = ring_schedule(n)
    lines = [f"{n} ranks, {len(schedule)} steps (2(N-1) = {2 * (n - 1)})", ""]
    lines.append("step  phase           " + "".join(f"{f'rank {rank}':<10}" for rank in range(n)))
    for step, sends in enumerate(schedule):
        phase = "reduce-scatter" if step < n - 1 else "allgather"
        lines.append(f"{step:>4}  {phase:<14}  " + "".join(f"{f'chunk {c}':<10}" for c in sends))
    per_rank = 2 * (n - 1) / n * megabytes
    lines += ["", f"each rank sends 2(N-1)/N * S = {per_rank:.1f} MB of a {megabytes:g} MB buffer"]
    return "\n".join(line.rstrip() for line in lines)


def explore_ring(ring_schedule):
    """Sliders for N and S that print describe_ring; one line instead while nbgrader runs."""
    if os.environ.get("NBGRADER_EXECUTION"):
        # one write: a print is two (text, newline), which a busy kernel may send as two outputs
        sys.stdout.write("ring explorer: interactive only, skipped while nbgrader runs this notebook\n")
        return

    def show(n, megabytes):
        print(describe_ring(ring_schedule, n, megabytes))

    display(widgets.interactive(
        show,
        n=widgets.IntSlider(value=4, min=2, max=12, description="ranks N"),
        megabytes=widgets.FloatLogSlider(value=100, base=10, min=0, max=4, description="S (MB)"),
    ))
