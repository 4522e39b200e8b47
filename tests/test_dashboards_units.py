"""The computations behind the dashboards, without a browser (labkit/dashboards/).

The browser test (test_dashboards.py) checks the pages; these check the numbers they show:
the recorded allreduce schedules against the cost model, the topology model on cases worked
by hand, error feedback on real gradients, the scaling efficiency of run directories, the
pipeline bubble, and the index page listing every dashboard.
"""

import json
import re

import nbformat
import pytest

from labkit.comm.costmodel import critical_path
from labkit.dashboards import DASHBOARDS, collectives, compression, parallelism, scaling, search
from labkit.dashboards.common import PLOT_CLASS  # noqa: F401 - the tests of the pages find pictures by it

from .conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"
DASHBOARD_DIR = ROOT / "notebooks" / "dashboards"


# --- collectives -------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", collectives.ALGORITHMS)
def test_recorded_schedules_take_the_cost_models_steps(algorithm):
    for n in range(2, 9):
        s = collectives.record_schedule(algorithm, n)
        assert s["correct"], f"{algorithm} on {n} ranks did not end with the exact sum"
        assert s["steps"] == critical_path(algorithm, 1, n, full_duplex=True)[0], (algorithm, n)
        # after the last step every rank holds every rank's contribution in every chunk
        assert all(held == set(range(n)) for row in collectives.holdings(s, s["steps"]) for held in row)
        # and before the first, only its own
        assert all(held == {r} for r, row in enumerate(collectives.holdings(s, 0)) for held in row)


def test_the_ring_moves_one_chunk_per_message_around_the_ring():
    n = 5
    s = collectives.record_schedule("ring", n)
    assert len(s["messages"]) == 2 * n * (n - 1)
    assert all(m["dst"] == (m["src"] + 1) % n and len(m["chunks"]) == 1 for m in s["messages"])
    # reduce-scatter: at step k a message carries k contributions; allgather: all n
    for m in s["messages"]:
        assert len(m["carries"]) == (m["step"] if m["step"] < n else n)
    ps = collectives.record_schedule("parameter_server", n)
    assert len(ps["messages"]) == 2 * (n - 1) and all(0 in (m["src"], m["dst"]) for m in ps["messages"])


def test_topology_model_on_cases_worked_by_hand():
    nbytes = 8 * 2**20
    ring2 = collectives.record_schedule("ring", 2)
    alpha, bandwidth = collectives.LINKS["PCIe"]
    one_node = [0, 0]
    assert collectives.topology_time(ring2, nbytes, one_node, "PCIe") == pytest.approx(
        2 * (alpha + nbytes / 2 / bandwidth))
    net_alpha, net_bw = collectives.NETWORK
    assert collectives.topology_time(ring2, nbytes, [0, 1], "PCIe") == pytest.approx(
        2 * (net_alpha + nbytes / 2 / net_bw))
    assert collectives.placement(8, 4, "pack") == [0, 0, 0, 0, 1, 1, 1, 1]
    assert collectives.placement(8, 4, "spread") == [0, 1, 0, 1, 0, 1, 0, 1]
    ring8 = collectives.record_schedule("ring", 8)
    pack, spread = (collectives.placement(8, 4, how) for how in ("pack", "spread"))
    # packed, only two ring links cross nodes; spread, all eight do and share the node's link
    assert collectives.topology_time(ring8, nbytes, pack, "NVLink") < collectives.topology_time(
        ring8, nbytes, spread, "NVLink")
    assert collectives.topology_time(ring8, nbytes, [0] * 8, "NVLink") < collectives.topology_time(
        ring8, nbytes, [0] * 8, "PCIe")
    with pytest.raises(ValueError, match="pack or spread"):
        collectives.placement(4, 2, "scatter")


def test_collectives_pictures_are_pngs():
    s = collectives.record_schedule("tree", 4)
    assert collectives.schedule_png(s, 2).startswith(PNG)
    assert collectives.model_png(4, None).startswith(PNG)
    assert collectives.topology_png({a: collectives.record_schedule(a, 4) for a in collectives.ALGORITHMS},
                                    2**20, 2).startswith(PNG)
    with pytest.raises(ValueError, match="unknown algorithm"):
        collectives.record_schedule("butterfly", 4)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_measured_on_real_ranks_and_kept(tmp_path, monkeypatch, no_leftovers):
    """The two buttons that start real ranks: the α–β fit with every algorithm timed, and the
    memory of every parallelism on each rank; both kept for the next visit."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # the pytest process's own helper: started before the test's environment
    monkeypatch.setenv("LABKIT_DASHBOARDS_DIR", str(tmp_path / "measured"))
    result = collectives.measure(2, sizes=(4096, 65536), iters=2)
    assert result["alpha_s"] > 0 and result["beta_s_per_byte"] > 0
    assert {r["algorithm"] for r in result["rows"]} == set(collectives.BENCH_NAMES.values())
    assert all(r["valid"] and r["time_us"] > 0 for r in result["rows"])
    assert collectives.saved_measurement(2) == json.loads(json.dumps(result))
    assert collectives.model_png(2, result).startswith(PNG)

    memory = parallelism.measure_ranks(2, microbatches=2, timeout=150)
    ranks = memory["per_rank"]
    whole = memory["whole_model_bytes"]
    assert ranks[0]["data"]["param_bytes"] == ranks[1]["data"]["param_bytes"] == whole
    for kind in ("model", "pipeline gpipe", "pipeline 1f1b", "tensor"):  # the model is split in two
        assert sum(r[kind]["param_bytes"] for r in ranks) == pytest.approx(whole, rel=0.02), kind
        assert all(r[kind]["grad_bytes"] == r[kind]["param_bytes"] for r in ranks), kind
    assert all(r[k]["activation_bytes"] > 0 for r in ranks for k in r)
    assert all(len(t) == 2 and all(t) for t in memory["timelines"].values())  # each pipeline rank's events
    assert parallelism.saved_measurement(2)["per_rank"] == json.loads(json.dumps(ranks))
    assert parallelism.memory_png(memory, 2).startswith(PNG)


# --- compression -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grads():
    return compression.real_gradients("lenet", steps=8)


def test_every_compressor_on_a_real_gradient(grads):
    results = compression.evaluate_all(grads, 0.01)
    by = {(r["compressor"], r["error_feedback"]): r for r in results}
    full = 4 * grads["params"]
    none = by["none", False]
    assert none["error_after"][-1] == 0 and full <= none["bytes_per_step"] < full * 1.05
    assert by["fp16", False]["bytes_per_step"] < 0.55 * full
    assert by["topk", False]["bytes_per_step"] < 0.05 * full
    # error feedback sends later what it dropped: the summed update is closer after a few steps
    for name in ("topk", "onebit", "powersgd", "qsgd"):
        assert by[name, True]["error_after"][-1] < by[name, False]["error_after"][-1], name
    for name in ("topk", "onebit"):  # deterministic ones: the first step is the same with or without it
        assert by[name, True]["one_step_error"][0] == pytest.approx(by[name, False]["one_step_error"][0]), name
    assert compression.tradeoff_png(results, grads, 4, "topk").startswith(PNG)


# --- scaling -------------------------------------------------------------------------------------------
def fake_run(root, name, workers, batch, step_s, status="completed", model="mlp"):
    """A run directory as labkit writes it, with steady steps of ``step_s`` seconds on each rank."""
    path = root / name
    path.mkdir(parents=True)
    config = {"model": model, "dataset": "digits", "sync": "allreduce", "compression": "none",
              "parallelism": "data", "workers": workers, "batch_size": batch}
    (path / "config.json").write_text(json.dumps({"config": config, "world_size": workers}))
    (path / "summary.json").write_text(json.dumps({"status": status, "steps": 20}))
    lines = []
    for step in (2, 4, 6, 8, 10):
        for rank in range(workers):
            lines.append({"kind": "train", "rank": rank, "step": step, "t": 3.0 + step * step_s * (1 + 0.1 * rank)})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_scaling_efficiency_from_run_directories(tmp_path):
    fake_run(tmp_path, "a", 1, 32, 0.010)
    fake_run(tmp_path, "b", 2, 16, 0.006)          # strong, global batch 32
    fake_run(tmp_path, "c", 2, 32, 0.0125)         # weak, 32 per worker
    fake_run(tmp_path, "d", 4, 8, 0.004, status="failed")  # not counted
    runs = scaling.collect(tmp_path)
    assert sorted((r["workers"], r["batch"]) for r in runs) == [(1, 32), (2, 16), (2, 32)]
    # the slowest rank (rank 1 is 10 % slower here) sets the step time; start-up is left out
    assert {r["run_dir"][-1]: round(r["step_s"], 6) for r in runs} == {"a": 0.010, "b": 0.0066, "c": 0.01375}
    family = scaling.family_of(scaling.DEFAULT_FAMILY)
    strong = scaling.series(runs, family, "strong")
    assert list(strong) == [32, 64]
    assert scaling.efficiency(strong[32], "strong") == [(1, 1.0), (2, pytest.approx(0.010 / 0.0066 / 2))]
    weak = scaling.series(runs, family, "weak")
    assert scaling.efficiency(weak[32], "weak") == [(1, 1.0), (2, pytest.approx(0.010 / 0.01375))]
    needed = scaling.plan([1, 2, 4], 32, 32)
    assert needed == [(1, 32), (2, 16), (4, 8), (2, 32), (4, 32)]
    assert scaling.missing(runs, family, needed) == [(4, 8), (4, 32)]
    assert scaling.scaling_png(runs, family, [(4, 8)]).startswith(PNG)
    with pytest.raises(ValueError, match="does not divide"):
        scaling.plan([3], 32, 32, ("strong",))
    with pytest.raises(ValueError, match="workers: expected whole numbers"):
        scaling.parse_workers("1,two")


# --- parallelism ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", parallelism.SCHEDULES)
def test_simulated_bubble_is_the_formula(schedule):
    from labkit.parallel.pipeline import bubble_fraction_model

    for p, m in ((2, 1), (4, 4), (4, 8), (6, 3)):
        sim = parallelism.simulated_timeline(schedule, p, m, forward=0.01, backward=0.02)
        assert sim["bubble"] == pytest.approx(bubble_fraction_model(p, m)), (p, m)
        assert len(sim["ranks"]) == p and all(len(r) == 2 * m for r in sim["ranks"])
    assert parallelism.timeline_png(schedule, 3, 4, (0.01, 0.02)).startswith(PNG)
    assert parallelism.memory_png(None, 2).startswith(PNG)


def test_pipeline_runs_are_read_from_summaries(tmp_path):
    run = tmp_path / "pipe"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"parallelism": "pipeline"}, "world_size": 2}))
    (run / "summary.json").write_text(json.dumps({"status": "completed", "bubble_fraction": 0.31,
                                                  "microbatches": 4, "schedule": "gpipe",
                                                  "grid": {"data": 1, "pipeline": 2, "tensor": 1}}))
    runs = parallelism.pipeline_runs(tmp_path)
    assert runs == [{"run_dir": str(run), "stages": 2, "microbatches": 4, "schedule": "gpipe", "bubble": 0.31}]
    assert parallelism.run_timeline(runs, "gpipe", 2, 4) is None  # it recorded no timeline
    events = [[{"kind": "forward", "microbatch": 0, "start": 0.0 + s, "end": 0.1 + s}] for s in (0, 0.1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"kind": "event", "event": "timeline", "rank": s, "step": 5, "stage": s, "events": events[s],
         "bubble_fraction": 0.3}) + "\n" for s in (0, 1)))
    assert parallelism.run_timeline(runs, "gpipe", 2, 4) == (str(run), events)
    assert parallelism.run_timeline(runs, "1f1b", 2, 4) is None
    assert parallelism.timeline_png("gpipe", 2, 4, (0.01, 0.02), runs=runs).startswith(PNG)


# --- search -------------------------------------------------------------------------------------------
def test_searches_are_found_per_latency_weight(tmp_path):
    for name, weight, form in (("s0", 0.0, "add"), ("s1", 1.0, "add"), ("s2", 2.0, "mul")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"config": {"command": "nas", "latency_form": form,
                                                                "dataset": "digits"}}))
        (run / "summary.json").write_text(json.dumps({
            "status": "completed", "latency_weight": weight, "architecture": ["k3e3", "zero"],
            "candidates": [["k3e3", "k5e3"], ["k3e3", "zero"]], "probs": [[0.7, 0.3], [0.4, 0.6]],
            "latency_measured_ms": 0.5 - 0.1 * weight, "latency_predicted_ms": 0.5, "test_accuracy": 0.9}))
    (tmp_path / "s1" / "latency_table.json").write_text("{}")
    found = search.collect(tmp_path)
    assert sorted(found) == [0.0, 1.0]  # the mul-form search is another experiment
    assert search.shared_table(found) == str(tmp_path / "s1" / "latency_table.json")
    assert search.front_png(found, 1.0).startswith(PNG)
    assert search.front_png({}, 0.5).startswith(PNG)


# --- the notebooks -----------------------------------------------------------------------------------------
def test_index_links_every_dashboard():
    index = nbformat.read(DASHBOARD_DIR / "index.ipynb", as_version=4)
    text = "\n".join(c.source for c in index.cells if c.cell_type == "markdown")
    linked = set(re.findall(r"\]\(([\w.-]+\.ipynb)\)", text))
    on_disk = {p.name for p in DASHBOARD_DIR.glob("*.ipynb")} - {"index.ipynb"}
    assert linked == on_disk == {name for name, _, _ in DASHBOARDS}


@pytest.mark.parametrize("name", [name for name, _, _ in DASHBOARDS if name != "training.ipynb"])
def test_dashboard_cells_are_thin(name):
    nb = nbformat.read(DASHBOARD_DIR / name, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 1 and len(code[0].splitlines()) <= 3, code
