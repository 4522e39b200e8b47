"""The parallelism dashboard: the pipeline's timeline and bubble, and memory per rank.

- **Timeline.** For p stages, M micro-batches and a schedule (GPipe or 1F1B,
  :mod:`labkit.parallel.pipeline`), ``simulate`` plays the schedule with the forward and
  backward times of a real micro-batch of labkit's MLP, timed here, cut into p equal
  stages; :func:`labkit.parallel.gantt.draw_timeline` draws it. Beside it, the bubble
  against M: the formula (p−1)/(M+p−1), the simulation, and what the user's pipeline runs
  measured (``bubble_fraction`` of every pipeline run under ``$LABKIT_RUNS_DIR``).
- **Real ranks.** :func:`measure_ranks` starts N gloo ranks
  (:func:`labkit.parallel.spawn.run_ranks`) and, for each parallelism, builds
  ``ParallelModel`` on the same MLP, runs two training steps and reports per rank the
  bytes of parameters and gradients it holds and the activation bytes autograd kept for
  the backward pass (the peak of stashed micro-batches for pipelines), with the timeline
  each pipeline rank recorded. The result is kept, so the next visit draws it at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..parallel.gantt import draw_timeline
from ..parallel.pipeline import bubble_fraction_model, make_schedule, simulate
from .common import (
    STYLE,
    WIDE,
    figure,
    legend_outside,
    picture,
    png,
    read_json,
    read_summaries,
    results_dir,
    runs_dir,
    status_line,
    write_json,
)

HIDDEN = (128, 128, 128, 128, 128)  # six linear layers: up to 6 stages
BATCH = 64
SCHEDULES = ("gpipe", "1f1b")


def micro_batch_times(microbatches: int, batch: int = BATCH, hidden=HIDDEN, repeats: int = 10) -> tuple[float, float]:
    """(forward, backward) seconds of one micro-batch through the whole MLP: the fastest of
    ``repeats`` (on a busy machine the other processes only ever add time)."""
    from ..parallel.reference import make_mlp

    model = make_mlp(hidden=hidden)
    x = torch.randn(max(1, batch // microbatches), 1, 8, 8)
    y = torch.zeros(len(x), dtype=torch.long)
    fwd, bwd = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return min(fwd[1:]), min(bwd[1:])


def simulated_timeline(schedule: str, stages: int, microbatches: int, forward: float, backward: float) -> dict:
    """The schedule played on a clock with per-stage times forward/p and backward/p."""
    sim = simulate(make_schedule(schedule, stages, microbatches), forward / stages, backward / stages)
    ranks = [[{"kind": "forward" if k == "F" else "backward", "microbatch": i, "start": s, "end": e}
              for k, i, s, e in events] for events in sim["events"]]
    return {"ranks": ranks, "bubble": sim["bubble"], "makespan": sim["makespan"], "peak_stashed": sim["peak_stashed"]}


def pipeline_runs(root=None) -> list[dict]:
    """(stages, micro-batches, schedule, measured bubble) of the user's completed pipeline runs."""
    out = []
    for path, _config, summary in read_summaries(root or runs_dir()):
        if summary.get("status") != "completed" or summary.get("bubble_fraction") is None:
            continue
        grid = summary.get("grid") or {}
        out.append({"run_dir": str(path), "stages": grid.get("pipeline"), "microbatches": summary.get("microbatches"),
                    "schedule": summary.get("schedule"), "bubble": summary["bubble_fraction"]})
    return out


def run_timeline(runs: list[dict], schedule: str, stages: int, microbatches: int) -> tuple[str, list] | None:
    """(run directory, per-stage events) of the user's latest pipeline run with these settings that
    recorded a timeline (:func:`labkit.parallel.gantt.timeline_from_run`), or None."""
    from ..parallel.gantt import timeline_from_run

    for r in reversed(runs or []):
        if (r["stages"], r["microbatches"], r["schedule"]) == (stages, microbatches, schedule):
            ranks = timeline_from_run(r["run_dir"])["ranks"]
            if len(ranks) == stages:
                return r["run_dir"], ranks
    return None


def timeline_png(schedule: str, stages: int, microbatches: int, times: tuple[float, float],
                 measured: dict | None = None, runs: list[dict] | None = None) -> bytes:
    fig = figure(11, 4.4)
    gantt, curve = fig.subplots(1, 2, gridspec_kw=dict(left=0.08, right=0.98, bottom=0.13, top=0.86, wspace=0.22,
                                                       width_ratios=(1.6, 1)))
    sim = simulated_timeline(schedule, stages, microbatches, *times)
    model = bubble_fraction_model(stages, microbatches)
    real = (measured or {}).get("timelines", {}).get(f"{schedule} m{microbatches}")
    saved = run_timeline(runs, schedule, stages, microbatches)
    if real and len(real) == stages:
        draw_timeline(gantt, real, title=f"{schedule}, {stages} real ranks, {microbatches} micro-batches")
        gantt.set_xlabel("seconds since the start of the step (measured)")
    elif saved:
        draw_timeline(gantt, saved[1], title=f"{schedule}, {stages} stages, {microbatches} micro-batches: "
                                             f"your run {Path(saved[0]).name}")
        gantt.set_xlabel("seconds since the start of the step (its last recorded step)")
    else:
        draw_timeline(gantt, sim["ranks"], title=f"{schedule}, {stages} stages, {microbatches} micro-batches "
                                                 f"(simulated, times of this machine)")
        gantt.set_xlabel("seconds since the start of the step")
    fig.suptitle(f"bubble: simulated {sim['bubble']:.2f}, formula (p−1)/(M+p−1) = {model:.2f}; "
                 f"peak stashed micro-batches per stage {sim['peak_stashed']}", fontsize=10)
    ms = list(range(1, 17))
    curve.plot(ms, [bubble_fraction_model(stages, m) for m in ms], "-", color="gray", label="formula")
    curve.plot(ms, [simulate(make_schedule(schedule, stages, m), 1.0, 2.0)["bubble"] for m in ms], ".",
               color="tab:blue", label="simulated")
    mine = [r for r in runs or [] if r["stages"] == stages and r["schedule"] == schedule and r["microbatches"]]
    if mine:
        curve.plot([r["microbatches"] for r in mine], [r["bubble"] for r in mine], "s", color="tab:red",
                   label=f"your runs ({len(mine)})")
    curve.axvline(microbatches, color="gray", ls=":", lw=1)
    curve.set(xlabel="micro-batches M", ylabel="bubble (idle share)", title=f"{stages} stages, {schedule}",
              ylim=(0, 1))
    curve.grid(alpha=0.3)
    curve.legend(fontsize=8)
    return png(fig)


# --- real ranks -----------------------------------------------------------------------------------
def _cases(world: int) -> dict:
    out = {"data": dict(kind="data"), "model": dict(kind="model"),
           "pipeline gpipe": dict(kind="pipeline", schedule="gpipe"),
           "pipeline 1f1b": dict(kind="pipeline", schedule="1f1b"), "tensor": dict(kind="tensor")}
    if world >= 4 and world % 2 == 0:
        out["hybrid data×pipeline"] = dict(kind="hybrid")
    return out


class _Saved:
    def __init__(self):
        self.bytes = 0

    def pack(self, t):
        self.bytes += t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t):
        return t


def memory_rank(comm, microbatches: int, batch: int = BATCH, hidden=HIDDEN) -> dict:
    """On every rank (through ``run_ranks``): each parallelism, two steps; what this rank holds."""
    from ..parallel.build import ParallelModel
    from ..parallel.reference import make_mlp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    out = {}
    for name, settings in _cases(comm.size).items():
        settings = dict(settings)
        kind = settings.pop("kind")
        parallel = ParallelModel(kind, make_mlp(hidden=hidden), comm, (1, 8, 8), microbatches=microbatches,
                                 **settings)
        for _ in range(2):  # the second step is the one reported (the first warms up)
            for p in parallel.parameters():
                p.grad = None
            saved = _Saved()
            comm.barrier()
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                parallel.forward_backward(x, y)
        stats = parallel.pipeline_stats()
        activations = saved.bytes
        if stats.get("stashed_bytes_peak") is not None and stats["stashed_bytes_peak"] > 0:
            activations = stats["stashed_bytes_peak"]  # the pipeline's own hooks saw these
        grads = sum(p.grad.numel() * p.grad.element_size() for p in parallel.parameters() if p.grad is not None)
        s = parallel.shape
        out[name] = {"grid": f"{s.data}x{s.pipeline}x{s.tensor}", "param_bytes": parallel.parameter_bytes(),
                     "grad_bytes": grads, "activation_bytes": activations,
                     "events": stats.get("events") if kind == "pipeline" else None}
    return out


def measure_path(world: int):
    return results_dir("parallelism") / f"memory-n{world}.json"


def measure_ranks(world: int, microbatches: int, timeout: float = 240) -> dict:
    """Run :func:`memory_rank` on ``world`` real ranks; keep and return the per-rank figures."""
    import os

    from ..parallel.reference import make_mlp
    from ..parallel.spawn import run_ranks

    load = os.getloadavg()[0]
    start = time.perf_counter()
    per_rank = run_ranks(memory_rank, world, microbatches, timeout=timeout)
    whole = sum(p.numel() * p.element_size() for p in make_mlp(hidden=HIDDEN).parameters())
    result = {"world": world, "microbatches": microbatches, "batch": BATCH, "hidden": list(HIDDEN),
              "whole_model_bytes": whole, "per_rank": per_rank, "load_avg_1m": load,
              "seconds": time.perf_counter() - start,
              "timelines": {f"{c.split()[1]} m{microbatches}": [r[c]["events"] for r in per_rank]
                            for c in ("pipeline gpipe", "pipeline 1f1b")}}
    write_json(measure_path(world), result)
    return result


def saved_measurement(world: int) -> dict | None:
    data = read_json(measure_path(world))
    return data if isinstance(data, dict) and isinstance(data.get("per_rank"), list) else None


def memory_png(measured: dict | None, world: int) -> bytes:
    fig = figure(11, 3.8)
    ax = fig.subplots(1, 1, gridspec_kw=dict(left=0.07, right=0.74, bottom=0.2, top=0.86))
    if measured is None:
        ax.set_title(f"memory per rank on {world} real ranks: not measured yet (press Measure)")
        ax.text(0.5, 0.5, "no measurement yet", transform=ax.transAxes, ha="center", color="gray")
        return png(fig)
    per_rank = measured["per_rank"]
    cases = list(per_rank[0])
    n = len(per_rank)
    width = 0.8 / n
    kib = 1024
    for r, rank in enumerate(per_rank):
        xs = [i + (r - (n - 1) / 2) * width for i in range(len(cases))]
        params = [rank[c]["param_bytes"] / kib for c in cases]
        grads = [rank[c]["grad_bytes"] / kib for c in cases]
        acts = [rank[c]["activation_bytes"] / kib for c in cases]
        ax.bar(xs, params, width, color="tab:blue", edgecolor="white", label="parameters" if r == 0 else None)
        ax.bar(xs, grads, width, bottom=params, color="tab:cyan", edgecolor="white",
               label="gradients" if r == 0 else None)
        ax.bar(xs, acts, width, bottom=[a + b for a, b in zip(params, grads)], color="tab:orange",
               edgecolor="white", label="activations kept for backward" if r == 0 else None)
    whole = measured["whole_model_bytes"] / kib
    ax.axhline(whole, color="gray", ls=":", lw=1)
    ax.text(-0.45, whole, "whole model's parameters", fontsize=7, va="bottom", color="gray")
    ax.set_xticks(range(len(cases)), [f"{c}\n{per_rank[0][c]['grid']}" for c in cases], fontsize=8)
    ax.set(ylabel="KiB per rank (one bar per rank)",
           title=f"measured on {n} gloo ranks, batch {measured['batch']}, {measured['microbatches']} micro-batches "
                 f"(load {measured['load_avg_1m']:.1f})")
    legend_outside(ax)
    return png(fig)


class ParallelismDashboard:
    def __init__(self):
        import ipywidgets as w

        self.stages = w.IntSlider(value=4, min=2, max=6, description="stages", style=STYLE,
                                  tooltip="p: pipeline stages (labkit train --pipeline-stages)")
        self.microbatches = w.IntSlider(value=4, min=1, max=16, description="micro-batches", style=STYLE,
                                        tooltip="M: micro-batches per mini-batch (labkit train --microbatches)")
        self.schedule = w.ToggleButtons(options=SCHEDULES, value="1f1b", description="schedule",
                                        tooltip="labkit train --schedule")
        self.timeline = picture("parallelism-timeline")
        self.ranks = w.Dropdown(options=[2, 4], value=2, description="ranks", style=STYLE,
                                tooltip="real ranks to start for the memory measurement")
        self.measure_button = w.Button(layout=WIDE, description="Measure on real ranks", icon="stopwatch",
                                       tooltip="start the ranks, run every parallelism two steps, record what each "
                                               "rank holds and the pipeline timelines (about 10-30 s)")
        self.status = status_line()
        self.memory = picture("parallelism-memory")
        self.times: dict[int, tuple] = {}
        self.runs = pipeline_runs()
        for c in (self.stages, self.microbatches, self.schedule):
            c.observe(lambda _: self.draw_timeline(), "value")
        self.ranks.observe(lambda _: self.draw_all(), "value")
        self.measure_button.on_click(lambda _: self.on_measure())
        self.draw_all()
        self.widget = w.VBox([w.HTML("<h3>The pipeline: timeline and bubble</h3>"),
                              w.HBox([self.stages, self.microbatches]), self.schedule, self.timeline,
                              w.HTML("<h3>Memory per rank, for each parallelism</h3>"),
                              w.HBox([self.ranks, self.measure_button, self.status]), self.memory])

    def draw_all(self):
        self.draw_timeline()
        self.memory.value = memory_png(saved_measurement(self.ranks.value), self.ranks.value)

    def draw_timeline(self):
        m = self.microbatches.value
        if m not in self.times:
            self.times[m] = micro_batch_times(m)
        measured = saved_measurement(self.ranks.value)
        if measured and (measured["world"] != self.stages.value or measured["microbatches"] != m):
            measured = None
        self.timeline.value = timeline_png(self.schedule.value, self.stages.value, m, self.times[m], measured,
                                           self.runs)

    def on_measure(self):
        self.measure_button.disabled = True
        n, m = self.ranks.value, self.microbatches.value
        self.status.value = f"running every parallelism on {n} ranks, {m} micro-batches..."
        try:
            result = measure_ranks(n, m)
            self.status.value = f"measured in {result['seconds']:.0f} s (load {result['load_avg_1m']:.1f})"
            self.stages.value = n
        except Exception as e:  # noqa: BLE001 - one line in the page
            self.status.value = f"measurement failed: {str(e).splitlines()[0]}"
        finally:
            self.measure_button.disabled = False
        self.draw_all()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
