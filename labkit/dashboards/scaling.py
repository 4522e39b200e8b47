"""The scaling dashboard: strong and weak scaling efficiency over the user's saved runs.

Every completed run directory under ``$LABKIT_RUNS_DIR`` (``./runs`` by default) is read
(``config.json``, ``summary.json``, ``metrics.jsonl``); runs of the same model, dataset,
sync mode, compression and parallelism form one family. A run's speed is its steady
step time: on each rank, the time between its first and its last logged training step
divided by the steps between them, so that starting the ranks and reading the data are
left out; the slowest rank counts. Then, with T(N) that step time on N workers and
global batch G,

- **strong scaling** keeps G fixed as N grows: speedup T(N0)/T(N), efficiency speedup·N0/N;
- **weak scaling** keeps the batch per worker b fixed (G = N·b): efficiency T(N0)/T(N);

both relative to the fewest workers N0 of the series. Several runs of one configuration:
the median. The button makes the runs a chosen grid lacks (tiny ones, through
``labkit.train``), so the picture fills in on this machine.
"""

from __future__ import annotations

import os
import statistics
import time

from .common import STYLE, WIDE, figure, picture, png, read_summaries, runs_dir, status_line

FAMILY_KEYS = ("model", "dataset", "sync", "compression", "parallelism")
DEFAULT_FAMILY = {"model": "mlp", "dataset": "digits", "sync": "allreduce", "compression": "none",
                  "parallelism": "data"}
TINY = {"steps": 20, "log_every": 2}


def steady_step_time(run_dir) -> float | None:
    """Seconds per step once the run is going: the slowest rank's (t_last - t_first)/(steps between)."""
    from ..runs import RunDir

    first: dict[int, dict] = {}
    last: dict[int, dict] = {}
    for r in RunDir(run_dir).iter_metrics(kind="train"):
        rank = r.get("rank", 0)
        first.setdefault(rank, r)
        last[rank] = r
    per_rank = []
    for rank, a in first.items():
        b = last[rank]
        if b["step"] > a["step"] and b["t"] > a["t"]:
            per_rank.append((b["t"] - a["t"]) / (b["step"] - a["step"]))
    return max(per_rank) if per_rank else None


def family_of(config: dict) -> tuple:
    return tuple(str(config.get(k, DEFAULT_FAMILY[k])) for k in FAMILY_KEYS)


def family_label(family: tuple) -> str:
    return " / ".join(family)


def collect(root=None) -> list[dict]:
    """One record per completed run: family, workers, batch per rank, global batch, step time."""
    runs = []
    for path, config_file, summary in read_summaries(root or runs_dir()):
        config = config_file.get("config", {})
        if summary.get("status") != "completed" or config.get("command") == "nas":
            continue
        workers = int(config_file.get("world_size") or config.get("workers") or 1)
        batch = config.get("batch_size")
        step_s = steady_step_time(path)
        if not isinstance(batch, int) or step_s is None:
            continue
        data = int(summary.get("grid", {}).get("data", workers)) if isinstance(summary.get("grid"), dict) else workers
        runs.append({"run_dir": str(path), "family": family_of(config), "workers": workers, "batch": batch,
                     "global_batch": batch * data, "step_s": step_s})
    return runs


def series(runs: list[dict], family: tuple, kind: str) -> dict:
    """{G (strong) or b (weak): [(workers, median step time, runs)] sorted by workers}."""
    if kind not in ("strong", "weak"):
        raise ValueError(f"kind must be strong or weak, got {kind!r}")
    groups: dict[int, dict[int, list]] = {}
    for r in runs:
        if r["family"] != family:
            continue
        key = r["global_batch"] if kind == "strong" else r["batch"]
        groups.setdefault(key, {}).setdefault(r["workers"], []).append(r["step_s"])
    return {key: sorted((n, statistics.median(ts), len(ts)) for n, ts in by_n.items())
            for key, by_n in sorted(groups.items())}


def efficiency(points: list[tuple], kind: str) -> list[tuple]:
    """[(workers, efficiency)] relative to the first (fewest workers) point."""
    if not points:
        return []
    n0, t0 = points[0][0], points[0][1]
    if kind == "strong":
        return [(n, (t0 / t) * n0 / n) for n, t, *_ in points]
    return [(n, t0 / t) for n, t, *_ in points]


def plan(workers: list[int], global_batch: int, batch_per_worker: int, kinds=("strong", "weak")) -> list[tuple]:
    """The (workers, batch per rank) runs a grid needs; strong splits ``global_batch`` over the workers."""
    if not workers or any(n < 1 for n in workers):
        raise ValueError(f"workers must be whole numbers >= 1, got {workers}")
    needed = []
    for kind in kinds:
        for n in workers:
            if kind == "strong":
                if global_batch % n:
                    raise ValueError(f"strong scaling splits the global batch {global_batch} over the workers, "
                                     f"and {n} does not divide it")
                needed.append((n, global_batch // n))
            else:
                needed.append((n, batch_per_worker))
    return list(dict.fromkeys(needed))


def missing(runs: list[dict], family: tuple, needed: list[tuple]) -> list[tuple]:
    have = {(r["workers"], r["batch"]) for r in runs if r["family"] == family}
    return [x for x in needed if x not in have]


def make_run(family: tuple, workers: int, batch: int, root=None, steps: int = TINY["steps"]) -> str:
    """One tiny run of ``family`` through the public API; its run directory."""
    import labkit

    settings = dict(zip(FAMILY_KEYS, family))
    config = labkit.RunConfig(**settings, workers=workers, batch_size=batch, steps=steps,
                              log_every=TINY["log_every"], eval_every=steps, checkpoint_every=0)
    if root is not None:
        os.environ["LABKIT_RUNS_DIR"] = str(root)
    result = labkit.train(config.validate(), progress=False)
    return str(result.run_dir)


def parse_workers(text: str) -> list[int]:
    try:
        out = sorted({int(p) for p in text.replace(" ", "").split(",") if p})
    except ValueError:
        raise ValueError(f"workers: expected whole numbers like 1,2,4, got {text!r}") from None
    if not out or out[0] < 1:
        raise ValueError(f"workers: expected whole numbers >= 1 like 1,2,4, got {text!r}")
    return out


def scaling_png(runs: list[dict], family: tuple, wanted: list[tuple]) -> bytes:
    from matplotlib.ticker import MaxNLocator

    fig = figure(11, 4.2)
    axes = fig.subplots(1, 2, gridspec_kw=dict(left=0.07, right=0.98, bottom=0.14, top=0.84, wspace=0.22))
    count = sum(r["family"] == family for r in runs)
    fig.suptitle(f"{family_label(family)}: {count} saved run(s) in {runs_dir()}"
                 + (f"; missing {len(wanted)}: " + ", ".join(f"{n}×{b}" for n, b in wanted) if wanted else ""),
                 fontsize=10)
    for ax, kind in zip(axes, ("strong", "weak")):
        lines = series(runs, family, kind)
        for i, (key, points) in enumerate(lines.items()):
            eff = efficiency(points, kind)
            label = f"global batch {key}" if kind == "strong" else f"{key} per worker"
            ax.plot([n for n, _ in eff], [e for _, e in eff], "o-", color=f"C{i}", label=label)
            for (n, e), (_, t, k) in zip(eff, points):
                ax.annotate(f"{t * 1e3:.0f} ms" + (f" ×{k}" if k > 1 else ""), (n, e), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="workers", ylabel="efficiency", ylim=(0, 1.3),
               title=f"{kind} scaling" + ("" if lines else " (no runs yet)"))
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=8, loc="lower left")
    return png(fig)


class ScalingDashboard:
    def __init__(self):
        import ipywidgets as w

        self.runs = collect()
        self.family = w.Dropdown(description="runs of", style=STYLE, tooltip="model / dataset / sync / compression / parallelism")
        self.workers = w.Text(value="1,2,4", description="workers", style=STYLE,
                              tooltip="the worker counts of the grid, like 1,2,4 (labkit train --workers)")
        self.global_batch = w.IntText(value=32, description="global batch", style=STYLE,
                                      tooltip="strong scaling: the global batch, split over the workers")
        self.per_worker = w.IntText(value=32, description="batch/worker", style=STYLE,
                                    tooltip="weak scaling: the batch of each worker (labkit train --batch-size)")
        self.kinds = w.Dropdown(options=[("strong and weak", ("strong", "weak")), ("strong", ("strong",)),
                                         ("weak", ("weak",))], value=("strong", "weak"), description="grid", style=STYLE,
                                tooltip="which scaling series the button completes")
        self.make = w.Button(layout=WIDE, description="Make the missing runs", icon="play",
                             tooltip=f"tiny runs ({TINY['steps']} steps each) of the chosen family, one after "
                                     "another, saved with your runs")
        self.refresh = w.Button(layout=WIDE, description="Reload runs", icon="refresh", tooltip="read the runs directory again")
        self.status = status_line()
        self.plot = picture("scaling")
        self.set_families()
        for c in (self.family, self.workers, self.global_batch, self.per_worker, self.kinds):
            c.observe(lambda _: self.draw(), "value")
        self.make.on_click(lambda _: self.make_missing())
        self.refresh.on_click(lambda _: self.reload())
        self.draw()
        self.widget = w.VBox([w.HBox([self.family, self.refresh]),
                              w.HBox([self.workers, self.global_batch, self.per_worker]),
                              w.HBox([self.kinds, self.make, self.status]), self.plot])

    def set_families(self):
        families = sorted({r["family"] for r in self.runs} | {family_of(DEFAULT_FAMILY)})
        current = self.family.value
        self.family.options = [(family_label(f), f) for f in families]
        self.family.value = current if current in families else (
            max(families, key=lambda f: sum(r["family"] == f for r in self.runs)))

    def wanted(self) -> list[tuple]:
        needed = plan(parse_workers(self.workers.value), self.global_batch.value, self.per_worker.value,
                      self.kinds.value)
        return missing(self.runs, self.family.value, needed)

    def draw(self):
        try:
            wanted = self.wanted()
        except ValueError as e:
            self.status.value = str(e)
            wanted = []
        else:
            self.status.value = ""
        self.plot.value = scaling_png(self.runs, self.family.value, wanted)

    def reload(self):
        self.runs = collect()
        self.set_families()
        self.draw()

    def make_missing(self):
        try:
            todo = self.wanted()
        except ValueError as e:
            self.status.value = str(e)
            return
        self.make.disabled = True
        try:
            for i, (n, b) in enumerate(todo, 1):
                self.status.value = f"run {i}/{len(todo)}: {n} worker(s), batch {b} each..."
                start = time.perf_counter()
                make_run(self.family.value, n, b)
                self.runs = collect()
                self.draw()
                self.status.value = f"run {i}/{len(todo)} done in {time.perf_counter() - start:.0f} s"
            if not todo:
                self.status.value = "nothing missing"
        except Exception as e:  # noqa: BLE001 - one line in the page
            self.status.value = f"a run failed: {str(e).splitlines()[0]}"
        finally:
            self.make.disabled = False

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
