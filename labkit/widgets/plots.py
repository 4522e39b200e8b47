"""Live plots of one run, drawn from its ``metrics.jsonl`` as it grows.

The figures are drawn with matplotlib's Agg canvas straight to PNG bytes and shown in
``ipywidgets.Image`` widgets. That needs no matplotlib backend in the notebook and no
frontend extension, so the pictures look the same in JupyterLab, in Voila and in a
notebook converted to HTML (a figure displayed under a forced Agg backend shows up in
Voila as the text ``<Figure size ...>``; a PNG in an Image widget cannot). The margins
are fixed by hand: a layout engine would triple the time of a redraw.
"""

from __future__ import annotations

import bisect
import io
from collections import defaultdict

import ipywidgets as w
from matplotlib.figure import Figure

from ..runs import MetricsTail

MB = 1e6
TIMES = (("compute_s", "compute", "tab:blue"), ("comm_s", "communication", "tab:orange"),
         ("wait_s", "waiting", "tab:gray"))


class RunMetrics:
    """The train and eval records of one run, read a little more at every ``update()``."""

    def __init__(self, run_dir):
        self.tail = MetricsTail(run_dir)
        self.train: list[dict] = []
        self.eval: list[dict] = []
        self.total_steps: int | None = None  # set when a mode with a master announces it

    def update(self) -> bool:
        """Read the lines written since the last call; True when there were new records."""
        before = len(self.train) + len(self.eval)
        for record in self.tail.read():
            if record.get("kind") == "train":
                self.train.append(record)
            elif record.get("kind") == "eval":
                self.eval.append(record)
            elif record.get("event") == "total_steps" and record.get("rank") == 0:
                self.total_steps = record["steps"]
        return len(self.train) + len(self.eval) > before

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.train), default=0)

    def train_curve(self, key: str) -> tuple[list, list, list]:
        """(steps, wall times, mean of ``key`` over the ranks) for each logged step."""
        by_step = defaultdict(list)
        for record in self.train:
            by_step[record["step"]].append(record)
        steps = sorted(by_step)
        times = [max(r["t"] for r in by_step[s]) for s in steps]
        values = [sum(r[key] for r in by_step[s]) / len(by_step[s]) for s in steps]
        return steps, times, values

    def eval_curve(self, key: str) -> tuple[list, list, list]:
        return ([r["step"] for r in self.eval], [r["t"] for r in self.eval],
                [r[key] for r in self.eval])

    def totals(self, key: str) -> tuple[list, list]:
        """(t, sum over ranks of each rank's latest cumulative ``key``) at every train record."""
        latest: dict[int, float] = {}
        times, totals = [], []
        for record in sorted(self.train, key=lambda r: r["t"]):
            latest[record["rank"]] = record.get(key, 0) or 0
            times.append(record["t"])
            totals.append(sum(latest.values()))
        return times, totals

    def throughput(self) -> tuple[list, list]:
        """Samples per second over all ranks, averaged over a sliding window.

        The window is a second, or a fifth of the run so far while that is shorter.
        """
        times, samples = self.totals("samples")
        window = min(1.0, (times[-1] - times[0]) / 5) if times else 0
        points_t, rates = [], []
        for i, t in enumerate(times):
            j = bisect.bisect_left(times, t - window)
            if window > 0 and t - times[j] >= window / 2:
                points_t.append(t)
                rates.append((samples[i] - samples[j]) / (t - times[j]))
        return points_t, rates

    def rank_times(self) -> dict[int, dict]:
        """Each rank's latest record (its cumulative compute, communication and waiting time)."""
        last: dict[int, dict] = {}
        for record in self.train:
            if record["step"] >= last.get(record["rank"], {}).get("step", -1):
                last[record["rank"]] = record
        return dict(sorted(last.items()))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def learning_png(metrics: RunMetrics | None, title: str = "") -> bytes:
    """Loss and accuracy (train: mean over ranks; test: rank 0) against steps and wall time."""
    fig = Figure(figsize=(10, 5.2), dpi=80)
    axes = fig.subplots(2, 2, gridspec_kw=dict(left=0.07, right=0.98, bottom=0.09, top=0.92,
                                                 hspace=0.35, wspace=0.18))
    fig.suptitle(title or "Start a run to see its learning curves")
    for row, (key, label) in enumerate((("loss", "loss"), ("accuracy", "accuracy"))):
        for col, xlabel in enumerate(("step", "wall time (s)")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if metrics is None:
                continue
            steps, times, values = metrics.train_curve(key)
            ax.plot(steps if col == 0 else times, values, lw=1, label="train")
            steps, times, values = metrics.eval_curve(key)
            ax.plot(steps if col == 0 else times, values, "o-", ms=4, label="test")
            if row == 1:
                ax.set_ylim(0, 1.02)
            if row == col == 0:
                ax.legend(loc="upper right")
    return _png(fig)


def system_png(metrics: RunMetrics | None) -> bytes:
    """Throughput, bytes sent, and each rank's compute / communication / waiting time."""
    fig = Figure(figsize=(10, 3.3), dpi=80)
    rate_ax, bytes_ax, time_ax = fig.subplots(1, 3, gridspec_kw=dict(
        left=0.08, right=0.98, bottom=0.27, top=0.9, wspace=0.3))
    rate_ax.set(title="throughput (all ranks)", xlabel="wall time (s)", ylabel="samples / s")
    bytes_ax.set(title="bytes sent (all ranks)", xlabel="wall time (s)", ylabel="MB")
    time_ax.set(title="time per rank", xlabel="seconds", ylabel="rank")
    for ax in (rate_ax, bytes_ax, time_ax):
        ax.grid(alpha=0.3)
    if metrics is not None:
        rate_ax.plot(*metrics.throughput(), lw=1)
        times, sent = metrics.totals("bytes_sent")
        bytes_ax.step(times, [b / MB for b in sent], where="post")
        ranks = metrics.rank_times()
        left = [0.0] * len(ranks)
        for key, label, color in TIMES:
            widths = [r.get(key, 0) or 0 for r in ranks.values()]
            time_ax.barh(list(ranks), widths, left=left, label=label, color=color)
            left = [a + b for a, b in zip(left, widths)]
        time_ax.set_yticks(list(ranks))
        # set by hand: a segment of zero width (no waiting) leaves a sticky edge at the end of
        # the longest bar, and autoscaling then draws that bar to (and past) the axis' edge
        time_ax.set_xlim(0, max(left, default=0) * 1.08 or 1.0)
        time_ax.set_ylim(max(ranks, default=0) + 0.6, min(ranks, default=0) - 0.6)  # rank 0 on top
        if ranks:
            fig.legend(*time_ax.get_legend_handles_labels(), loc="lower right", ncol=3,
                       fontsize="small", frameon=False)
    return _png(fig)


class LivePlots:
    """Two images, the learning curves and the system view, redrawn by ``draw()``."""

    def __init__(self):
        self.learning = w.Image(format="png", layout=w.Layout(max_width="800px", width="100%"))
        self.system = w.Image(format="png", layout=w.Layout(max_width="800px", width="100%"))
        self.learning.add_class("labkit-learning-plot")
        self.system.add_class("labkit-system-plot")
        self.box = w.VBox([self.learning, self.system])
        self.draw(None)

    def draw(self, metrics: RunMetrics | None, title: str = "") -> None:
        self.learning.value = learning_png(metrics, title)
        self.system.value = system_png(metrics)
