"""The architecture-search dashboard: ProxylessNAS's latency weight λ2 as a slider.

Each position of the slider is one real search (:func:`labkit.nas.search.run_search`: the
supernet on digits, weights and α trained in turn, the derived network retrained from
scratch, its latency measured on this machine). Searches are run directories under
``$LABKIT_RUNS_DIR`` like every run, so the dashboard reads the ones already made when it
opens and the slider answers at once from them; a λ2 without a search yet gets one on
request. Every search of the dashboard uses the same latency table (measured here by
the first one and then handed to the others with ``--latency-table``), so that their
predicted latencies compare. The searches are tiny (:data:`TINY`): enough to see the
architecture and its latency move with λ2, not to reach the accuracy of a long search.
"""

from __future__ import annotations

import time
from pathlib import Path

from .common import STYLE, WIDE, figure, picture, png, read_summaries, runs_dir, status_line

LAMBDAS = (0.0, 0.5, 1.0, 2.0, 4.0)
TINY = {"epochs": 2, "warmup_epochs": 1, "retrain_epochs": 2, "batch_size": 64}


def collect(root=None) -> dict[float, dict]:
    """λ2 -> the latest completed search with that latency weight (add form, digits) under ``root``."""
    found: dict[float, dict] = {}
    for path, config_file, summary in read_summaries(root or runs_dir()):
        config = config_file.get("config", {})
        if config.get("command") != "nas" or summary.get("status") != "completed":
            continue
        if config.get("latency_form", "add") != "add" or config.get("dataset", "digits") != "digits":
            continue
        weight = summary.get("latency_weight")
        if not isinstance(weight, (int, float)):
            continue
        found[float(weight)] = {**summary, "run_dir": str(path)}  # sorted by name: the latest wins
    return found


def shared_table(searches: dict[float, dict]) -> str | None:
    """The latency table of an earlier search, to hand to the next one."""
    for s in searches.values():
        table = Path(s["run_dir"]) / "latency_table.json"
        if table.is_file():
            return str(table)
    return None


def run_one(weight: float, searches: dict[float, dict], root=None) -> dict:
    """A tiny search at latency weight ``weight``; its summary (with ``run_dir``)."""
    from ..nas.search import NasConfig, run_search
    from ..runs import default_run_dir

    run_dir = default_run_dir("supernet", f"nas-l{weight:g}", 1, root=root or runs_dir())
    config = NasConfig(latency_weight=float(weight), latency_table=shared_table(searches), run_dir=str(run_dir),
                       **TINY)
    return run_search(config, progress=False, log=lambda *a: None)


def front_png(searches: dict[float, dict], weight: float) -> bytes:
    fig = figure(11, 4.4)
    front, probs = fig.subplots(1, 2, gridspec_kw=dict(left=0.07, right=0.97, bottom=0.14, top=0.84, wspace=0.3))
    current = searches.get(weight)
    if current:
        fig.suptitle(f"λ2 = {weight:g}: {' · '.join(current['architecture'])}; measured "
                     f"{current['latency_measured_ms']:.3f} ms (predicted {current['latency_predicted_ms']:.3f}), "
                     f"test accuracy {current['test_accuracy']:.3f}", fontsize=10)
    else:
        fig.suptitle(f"λ2 = {weight:g}: no search yet (press Run)", fontsize=10)
    weights = sorted(searches)
    xs = [searches[w]["latency_measured_ms"] for w in weights]
    ys = [searches[w]["test_accuracy"] for w in weights]
    front.plot(xs, ys, "-", color="lightgray", zorder=1)
    sc = front.scatter(xs, ys, c=weights, cmap="viridis", zorder=2, s=40)
    for w, x, y in zip(weights, xs, ys):
        front.annotate(f"λ2={w:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if current:
        front.scatter([current["latency_measured_ms"]], [current["test_accuracy"]], s=220, facecolors="none",
                      edgecolors="tab:red", linewidths=2, zorder=3)
    if weights:
        fig.colorbar(sc, ax=front, label="λ2")
    front.set(xlabel="measured latency of the derived network (ms, batch 1, this machine)",
              ylabel="test accuracy after retraining",
              title=f"{len(weights)} search(es) made" + ("" if weights else ": none yet"))
    front.grid(alpha=0.3)
    if current:
        names = sorted({c for block in current["candidates"] for c in block})
        grid = [[float("nan")] * len(current["candidates"]) for _ in names]
        for b, (cands, ps) in enumerate(zip(current["candidates"], current["probs"])):
            for c, p in zip(cands, ps):
                grid[names.index(c)][b] = p
        probs.imshow(grid, cmap="Blues", vmin=0, aspect="auto")
        for b, chosen in enumerate(current["architecture"]):
            probs.add_patch(_box(b, names.index(chosen)))
        probs.set_yticks(range(len(names)), names)
        probs.set_xticks(range(len(current["candidates"])), [f"block {b}" for b in range(len(current["candidates"]))])
        probs.set_title("softmax(α) at the end of the search (red: chosen)")
    else:
        probs.axis("off")
        probs.text(0.5, 0.5, "the architecture of this λ2 appears here after its search", ha="center",
                   va="center", transform=probs.transAxes, color="gray")
    return png(fig)


def _box(x, y):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="tab:red", linewidth=2)


class SearchDashboard:
    def __init__(self):
        import ipywidgets as w

        self.searches = collect()
        self.weight = w.SelectionSlider(options=[(f"{x:g}", x) for x in LAMBDAS], value=LAMBDAS[0],
                                        description="λ2", style=STYLE, continuous_update=False,
                                        tooltip="labkit nas --latency-weight: the weight of E[latency] (ms) in "
                                                "the loss")
        self.run_button = w.Button(layout=WIDE, description="Run this search", icon="play",
                                   tooltip=f"a tiny search at this λ2 ({TINY['epochs']} search epochs, "
                                           f"{TINY['retrain_epochs']} retraining epochs; 15-40 s), saved with "
                                           "your runs")
        self.run_all = w.Button(layout=WIDE, description="Run the missing ones", icon="forward",
                                tooltip="one tiny search for every λ2 of the slider that has none yet")
        self.status = status_line()
        self.plot = picture("search")
        self.weight.observe(lambda _: self.draw(), "value")
        self.run_button.on_click(lambda _: self.run([self.weight.value]))
        self.run_all.on_click(lambda _: self.run([x for x in LAMBDAS if x not in self.searches]))
        self.draw()
        self.widget = w.VBox([self.weight, w.HBox([self.run_button, self.run_all, self.status]), self.plot])

    def draw(self):
        self.plot.value = front_png(self.searches, self.weight.value)
        self.run_button.description = "Run again" if self.weight.value in self.searches else "Run this search"

    def run(self, weights):
        buttons = (self.run_button, self.run_all)
        for b in buttons:
            b.disabled = True
        try:
            for i, x in enumerate(weights, 1):
                self.status.value = f"search {i}/{len(weights)}: λ2 = {x:g}..."
                start = time.perf_counter()
                summary = run_one(x, self.searches)
                self.searches[x] = summary
                self.weight.value = x
                self.draw()
                self.status.value = f"λ2 = {x:g} searched in {time.perf_counter() - start:.0f} s"
            if not weights:
                self.status.value = "every λ2 has its search"
        except Exception as e:  # noqa: BLE001 - one line in the page
            self.status.value = f"the search failed: {str(e).splitlines()[0]}"
        finally:
            for b in buttons:
                b.disabled = False

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
