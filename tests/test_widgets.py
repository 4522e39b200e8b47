"""The control panel without a browser: choices, validation, a live run, Stop, the table."""

import asyncio
import time

import pytest

import labkit
from labkit.config import fields_info
from labkit.data import train_size
from labkit.registry import COMPRESSORS, SYNC_MODES, Entry
from labkit.runs import RunDir
from labkit.widgets import ControlPanel, RunMetrics
from labkit.widgets.plots import learning_png, system_png

PNG = b"\x89PNG\r\n\x1a\n"


def png(image) -> bytes:
    data = bytes(image.value)
    assert data.startswith(PNG)
    return data


def tick_until(panel, condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out; status: {panel.status.value}"
        panel.tick()
        time.sleep(0.5)


def small_panel(runs_dir, steps):
    panel = ControlPanel(runs_dir=runs_dir)
    panel.form.widgets["workers"].value = 2
    panel.form.widgets["steps"].value = str(steps)
    return panel


def test_choices_are_the_registries(tmp_path):
    panel = ControlPanel(runs_dir=tmp_path)
    assert panel.form.widgets["sync"].options == tuple(SYNC_MODES.names())
    assert panel.form.widgets["compression"].options == tuple(COMPRESSORS.names())
    for info in fields_info():
        widget = panel.form.widgets.get(info["name"]) or panel.form.sync_settings.get(info["name"])
        if widget is not None and info["choices"]:
            assert widget.options == tuple(info["choices"]), info["name"]


def test_modes_and_compressors_registered_later_appear(tmp_path, monkeypatch):
    monkeypatch.setitem(COMPRESSORS._entries, "halves",
                        Entry("halves", object, "keep half", {"params": {"keep": 0.5, "exact": False}}))
    monkeypatch.setitem(SYNC_MODES._entries, "ssp", Entry("ssp", object, "stale-synchronous",
                                                           {"settings": ("staleness",)}))
    panel = ControlPanel(runs_dir=tmp_path)
    assert "halves" in panel.form.widgets["compression"].options
    panel.form.widgets["compression"].value = "halves"
    assert list(panel.form.param_widgets) == ["keep", "exact"]
    assert panel.form.compression_params() == {"keep": 0.5, "exact": False}
    assert "keep half" in panel.form.description.value

    staleness = panel.form.sync_settings["staleness"]
    assert staleness not in panel.form.settings_box.children
    panel.form.widgets["sync"].value = "ssp"
    assert list(panel.form.settings_box.children) == [staleness]


@pytest.mark.parametrize("name, bad, option, good", [
    ("backend", "mpi", "--backend", "gloo"),  # the local launcher cannot start MPI ranks
    ("backend", "nccl", "--backend", "gloo"),  # NCCL needs GPUs
    ("batch_size", "5000", "--batch-size", "32"),
    ("lr", "fast", "--lr", "0.05"),
    ("steps", "0", "--steps", "300"),
])
def test_invalid_combination_shows_message_and_disables_start(tmp_path, name, bad, option, good):
    panel = ControlPanel(runs_dir=tmp_path / "runs")
    assert panel.message.value == "" and not panel.start_button.disabled
    panel.form.widgets[name].value = bad
    assert option in panel.message.value and "Traceback" not in panel.message.value
    assert panel.start_button.disabled
    panel.start()
    assert panel.run is None and not (tmp_path / "runs").exists()
    panel.form.widgets[name].value = good
    assert panel.message.value == "" and not panel.start_button.disabled


def test_invalid_compression_parameter(tmp_path):
    panel = ControlPanel(runs_dir=tmp_path)
    panel.form.widgets["compression"].value = "topk"
    panel.form.param_widgets["ratio"].value = "2"
    assert "--compression-param" in panel.message.value and panel.start_button.disabled
    panel.form.param_widgets["ratio"].value = "0.1"
    assert panel.message.value == "" and not panel.start_button.disabled
    assert panel.form.config().compression_params == {"ratio": 0.1}


def test_panel_is_inert_until_start(tmp_path):
    panel = ControlPanel(runs_dir=tmp_path / "runs")
    assert not panel.tick() and panel.run is None and panel.task is None
    assert not (tmp_path / "runs").exists()
    png(panel.plots.learning)
    assert "Runs you start appear here" in panel.table.widget.value


def test_run_metrics_read_incrementally_and_summarize_the_ranks(tmp_path):
    run = RunDir(tmp_path)
    metrics = RunMetrics(tmp_path)
    assert not metrics.update()
    # two ranks log every 10 steps, every half second, rank 1 a quarter second after rank 0
    for k in range(1, 11):
        for rank in (0, 1):
            run.append_metrics({"t": 0.5 * k + 0.25 * rank, "step": 10 * k, "rank": rank, "kind": "train",
                                "loss": 1.0 / k + rank, "accuracy": 0.5, "samples": 320 * k,
                                "bytes_sent": 1000 * k, "compute_s": 0.1 * k, "comm_s": 0.2 * k,
                                "wait_s": 0.05 * k * rank})
        if k % 5 == 0:
            run.append_metrics({"t": 0.5 * k + 0.3, "step": 10 * k, "rank": 0, "kind": "eval",
                                "loss": 0.3, "accuracy": 0.9})
        assert metrics.update()
    assert not metrics.update()
    assert metrics.last_step == 100
    steps, times, losses = metrics.train_curve("loss")
    assert steps == list(range(10, 101, 10)) and times[0] == 0.75
    assert losses[1] == pytest.approx((0.5 + 1.5) / 2)
    assert metrics.eval_curve("accuracy") == ([50, 100], [2.8, 5.3], [0.9, 0.9])
    assert metrics.totals("bytes_sent")[1][-1] == 20000
    _, rates = metrics.throughput()
    assert rates and rates == pytest.approx([2 * 320 / 0.5] * len(rates))  # both ranks' samples
    last = metrics.rank_times()
    assert list(last) == [0, 1] and last[1]["wait_s"] == pytest.approx(0.5)
    assert learning_png(metrics, "a title").startswith(PNG) and system_png(metrics).startswith(PNG)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_start_then_ticks_draw_the_run_and_fill_the_table(tmp_path, no_leftovers):
    panel = small_panel(tmp_path, steps=40)
    placeholder = png(panel.plots.learning)
    panel.start()
    assert panel.running and panel.task is None  # no event loop here: the test ticks
    assert panel.start_button.disabled and not panel.stop_button.disabled
    tick_until(panel, lambda: not panel.running, timeout=150)
    assert panel.metrics.last_step == 40
    assert png(panel.plots.learning) != placeholder
    assert "completed" in panel.status.value
    assert not panel.start_button.disabled and panel.stop_button.disabled
    (row,) = panel.table.rows()
    assert (row["sync"], row["workers"], row["status"]) == ("allreduce", "2", "completed")
    assert float(row["test accuracy"]) > 0.5 and float(row["MB sent"]) > 0
    assert row["run"] in panel.table.widget.value
    assert panel.run.run_dir.parent == tmp_path


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stop_stops_the_run(tmp_path, no_leftovers):
    panel = small_panel(tmp_path, steps=100000)
    panel.start()
    tick_until(panel, lambda: panel.metrics.last_step > 0, timeout=120)
    panel.stop()
    assert panel.stop_button.disabled
    tick_until(panel, lambda: not panel.running, timeout=60)
    assert panel.run.status == "stopped" and "stopped" in panel.status.value
    assert panel.table.rows()[0]["status"] == "stopped"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_event_loop_task_follows_the_run_to_its_end(tmp_path, no_leftovers):
    async def start_and_follow():
        panel = small_panel(tmp_path, steps=30)
        panel.interval = 0.2
        panel.start()
        assert panel.task is not None
        await asyncio.wait_for(panel.task, timeout=150)
        return panel

    panel = asyncio.run(start_and_follow())
    assert not panel.running and panel.metrics.last_step == 30
    assert panel.table.rows()[0]["status"] == "completed"


def test_modes_with_a_master_announce_their_step_count(tmp_path, no_leftovers):
    """The master holds no data, so --epochs means more steps per worker: the bar counts to them."""
    from labkit.launch.progress import ProgressBar as _ProgressBar

    cfg = labkit.RunConfig(workers=3, sync="ps-sync", epochs=2, run_dir=str(tmp_path / "run"))
    run = labkit.launch(cfg)
    result = run.wait(timeout=240)
    assert result.status == "completed", result.error
    metrics = RunMetrics(tmp_path / "run")
    metrics.update()
    planned = cfg.total_steps(train_size("digits", None))
    assert metrics.total_steps == metrics.last_step == result.summary["steps"] > planned
    bar = _ProgressBar(run)
    bar.update()
    assert bar.bar.total == bar.bar.n == metrics.total_steps
    bar.close()
