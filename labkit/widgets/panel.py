"""ControlPanel: choose a run with widgets, start it, watch it train, compare it with others.

    from labkit.widgets import ControlPanel
    ControlPanel()          # the last line of a cell: the panel appears under it

How the live view works: Start validates the controls and calls ``labkit.launch``, which
returns at once while the ranks train in their own processes. The panel then follows the
run with an asyncio task on the kernel's own event loop (the loop that also handles the
button clicks, on the main thread): every ``interval`` seconds it reads the lines added
to ``metrics.jsonl`` since the last look, redraws the plots and updates the status line;
when the run ends it fills in its row of the comparison table. No background thread
touches a widget, which is what keeps the updates reaching the page in Voila as well as
in JupyterLab. Without a running event loop (plain Python, a test) nothing follows the
run by itself: call ``tick()``.

With the slurm launcher (a notebook on the course's JupyterHub, whose servers are SLURM
jobs themselves), the run is a batch job that may wait in the queue: until its ranks
report, the status line says "queued" with the job's id, its position among the waiting
jobs and SLURM's reason, then on which node it started; Stop cancels the job (scancel),
queued or running. The job's state comes from the run's monitor thread
(``SlurmJob.queue_status``), so the event loop never waits on SLURM.

Until someone presses Start the panel runs nothing of its own, so a notebook that shows it
runs unattended (headless execution, autograding) exactly as if it were not there. It does
ask for a pool of warm ranks (``labkit.launch.pool``: processes that have imported torch and
labkit, so that the first step comes within a couple of seconds of Start); the pool ends with
the kernel, never changes a run's results, and ``LABKIT_WARM_RANKS=0`` turns it off.
"""

from __future__ import annotations

import asyncio
import html

import ipywidgets as w

from ..config import ConfigError, RunConfig
from ..data import train_size
from ..launch import launch
from ..launch.pool import start_pool
from ..runs import default_run_dir
from .form import ConfigForm
from .plots import LivePlots, RunMetrics
from .table import RunTable

# What the panel starts from: a run short enough to watch, logged often enough to animate.
DEFAULT_CONFIG = RunConfig(workers=4, steps=300, log_every=5, eval_every=20)


def _error_html(text: str) -> str:
    return f"<span style='color:#b00020'>&#9888; {html.escape(text)}</span>"


class ControlPanel(w.VBox):
    """Controls, Start/Stop, live plots and a table of this panel's runs.

    ``config``: the starting values (fields without a control keep theirs);
    ``runs_dir``: where the runs go (default ``$LABKIT_RUNS_DIR``, else ``runs/``);
    ``interval``: seconds between two looks at a running run.
    """

    def __init__(self, config: RunConfig | None = None, runs_dir=None, interval: float = 1.0):
        self.form = ConfigForm(config or DEFAULT_CONFIG)
        self.runs_dir = runs_dir  # None: labkit.runs.default_run_dir decides
        self.interval = interval
        self.start_button = w.Button(description="Start", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop")
        self.message = w.HTML()
        self.status = w.HTML()
        self.status.add_class("labkit-status")
        self.plots = LivePlots()
        self.table = RunTable()
        self.run = None  # the latest run started here
        self.metrics: RunMetrics | None = None
        self.task: asyncio.Task | None = None
        self._live = False  # the latest run has not been seen to end yet
        self._stopping = False  # Stop was pressed for the latest run
        self._total_steps = 0
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.form.on_change(self._check)
        super().__init__([
            self.form.box, self.message,
            w.HBox([self.start_button, self.stop_button, self.status]),
            self.plots.box, w.HTML("<b>Runs in this session</b>"), self.table.widget,
        ])
        self._check()
        # ranks that have imported torch wait for Start (LABKIT_WARM_RANKS=0: none)
        start_pool()

    @property
    def running(self) -> bool:
        return self._live

    # --- controls --------------------------------------------------------------------------
    def _check(self) -> None:
        """Show what is wrong with the controls' combination, if anything; enable the buttons."""
        problem = self.form.problem()
        self.message.value = _error_html(str(problem)) if problem else ""
        self.start_button.disabled = self._live or problem is not None
        self.stop_button.disabled = not self._live

    def start(self) -> None:
        """Launch the run the controls describe and follow it."""
        if self._live:
            return
        try:
            config = self.form.config()
            config = config.replace(run_dir=str(default_run_dir(
                config.model, config.sync, config.workers, root=self.runs_dir)))
            self.run = launch(config)
        except (ConfigError, OSError) as error:
            self.message.value = _error_html(str(error))
            return
        self.metrics = RunMetrics(self.run.run_dir)
        self._total_steps = config.total_steps(train_size(config.dataset, config.data_dir))
        self._live = True
        self._stopping = False
        self.table.add(self.run.run_dir)
        self.status.value = "starting the ranks..."
        self._check()
        self.task = self._follow_on_event_loop()

    def stop(self) -> None:
        """Ask the run to stop; the live view shows it ending."""
        if self._live:
            self.run.stop(timeout=0)
            self._stopping = True
            self.stop_button.disabled = True
            self.status.value = "stopping..."

    # --- following the run -------------------------------------------------------------------
    def _follow_on_event_loop(self) -> asyncio.Task | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # no event loop here: whoever holds the panel calls tick()
        return loop.create_task(self._follow())

    async def _follow(self) -> None:
        try:
            while self.tick():
                await asyncio.sleep(self.interval)
        except Exception as error:
            self.message.value = _error_html(f"the live view stopped: {error}")
            raise

    def tick(self) -> bool:
        """Read what the run wrote since the last tick and redraw; False once it has ended."""
        if not self._live:
            return False
        ended = self.run.done()  # asked first, so that an ended run's last lines are all read
        config = self.run.config
        if self.metrics.update():
            self.plots.draw(self.metrics, f"{config.sync}, compression {config.compression}, "
                                          f"{config.workers} workers: step {self.metrics.last_step}")
        if ended:
            self._ended()
        elif self.metrics.last_step:
            total = self.metrics.total_steps or self._total_steps
            self.status.value = f"running: step {self.metrics.last_step} of {total}{self._job_suffix()}"
        elif not self._stopping:  # say where the batch job is, if there is one
            waiting = self.queue_text()
            if waiting:
                self.status.value = waiting
        return not ended

    def queue_status(self) -> dict | None:
        """The batch job's place (``SlurmJob.queue_status``); None for launchers without a queue."""
        ask = getattr(getattr(self.run, "job", None), "queue_status", None)
        return ask() if callable(ask) else None

    def queue_text(self) -> str | None:
        """The status line of a batch job whose ranks have not reported yet."""
        q = self.queue_status()
        if not q:
            return None
        if q["state"] == "PENDING":
            text = f"queued: SLURM job {q['job_id']}"
            if q["position"]:
                text += f", position {q['position']} of {q['waiting']} in the queue"
            if q["reason"]:
                text += f" (reason: {q['reason']})"
            return text
        if q["state"] in ("RUNNING", "CONFIGURING"):
            where = f" on {q['node']}" if q["node"] else ""
            return f"SLURM job {q['job_id']} started{where}: starting the ranks..."
        return None

    def _job_suffix(self) -> str:
        q = self.queue_status()
        return f" (SLURM job {q['job_id']})" if q else ""

    def _ended(self) -> None:
        self._live = False
        summary = self.run.summary() or {}
        state = summary.get("status")
        if state == "completed":
            self.status.value = (f"completed in {summary['wall_time_s']:.1f} s: "
                                 f"test accuracy {summary['test_accuracy']:.4f}")
        elif state == "failed":
            self.status.value = _error_html(f"failed at step {self.metrics.last_step}: {summary['error']}")
        else:
            self.status.value = f"{state} at step {self.metrics.last_step}{self._job_suffix()}"
        self.table.refresh()
        self._check()
