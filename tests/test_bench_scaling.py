"""``labkit bench scaling``: bad arguments are one line; a tiny real run reports by the rules."""

import io
import json
import subprocess
from pathlib import Path

import pytest

from labkit.bench import BENCHMARKS
from labkit.bench.scaling import lo_counters, print_report, time_to_accuracy
from labkit.cli import main

from .conftest import LABKIT, ROOT

TWELVE = ["Ignore accuracy when scaling up", "Do not report test accuracy",
          "Do not report all training runs needed to tune hyperparameters",
          "Compare outdated hardware with special-purpose hardware", "Show only kernels/subsets when scaling",
          "Do not consider I/O", "Report highest ops numbers",
          "Show performance with option set A and accuracy with option set B",
          "Train on (unreasonably) large inputs", "Run training just for the right time",
          "Minibatch sizing for fun and profit: weak vs. strong scaling",
          "Select carefully how to compare to the state of the art"]


@pytest.mark.parametrize("args,message", [
    (["--workers", "0"], "argument --workers: worker counts must be >= 1, got 0"),
    (["--workers", "a,b"], "argument --workers: 'a' is not a whole number (expected worker counts like 1,2,4)"),
    (["--workers", "1,,2"], "argument --workers: expected worker counts like 1,2,4, got '1,,2'"),
    (["--workers", "2,2"], "argument --workers: each of the worker counts once, got '2,2'"),
    (["--repeats", "nan"], "argument --repeats: expected a whole number >= 1, got 'nan'"),
    (["--repeats", "0"], "argument --repeats: expected a whole number >= 1, got 0"),
    (["--target-accuracy", "2"], "argument --target-accuracy: expected a test accuracy in (0, 1], got 2"),
    (["--target-accuracy", "nan"], "argument --target-accuracy: expected a test accuracy in (0, 1], got nan"),
    (["--steps", "10", "--epochs", "1"], "argument --epochs: not allowed with argument --steps"),
    (["--workers", "1,3"], "--batch-size: strong scaling splits the global batch 64 over the workers, "
                           "and 3 does not divide it"),
    (["--lr", "-1"], "argument --lr: expected a positive finite number, got -1"),
    (["--tune-lr", "0.1,inf"], "argument --tune-lr: expected a positive finite number, got inf"),
    (["--scaling", "linear"], "argument --scaling: expected strong, weak or strong,weak, got 'linear'"),
    (["--sync", "nope"], "--sync: unknown sync mode 'nope'; choose one of "),
    (["--batch-size", "4096", "--scaling", "weak"], "--batch-size: 4096 is larger than each rank's share"),
])
def test_bad_arguments_one_line_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["bench", "scaling", *args])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"labkit: error: bench scaling: {message}"), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_workers_from_the_command_line(tmp_path):
    out = subprocess.run([*LABKIT, "bench", "scaling", "--workers", "0", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr == "labkit: error: bench scaling: argument --workers: worker counts must be >= 1, got 0\n"
    assert out.stdout == "" and not (tmp_path / "o").exists()


def test_time_to_accuracy_is_the_first_evaluation_at_the_target():
    evals = [{"t": 3.0, "step": 20, "accuracy": 0.96}, {"t": 2.0, "step": 10, "accuracy": 0.90},
             {"t": 4.0, "step": 30, "accuracy": 0.94}]
    assert time_to_accuracy(evals, 0.95) == (3.0, 0.96, 20)
    assert time_to_accuracy(evals, 0.90) == (2.0, 0.90, 10)
    assert time_to_accuracy(evals, 0.99) == (None, None, None)


def test_lo_counters_read_the_loopback_interface():
    counters = lo_counters()
    assert counters is not None and all(isinstance(c, int) and c >= 0 for c in counters)


def test_tiny_scaling_run_reports_by_the_rules(tmp_path, no_leftovers):
    assert "scaling" in BENCHMARKS
    out_dir = tmp_path / "runs"
    target = 0.8
    proc = subprocess.run([*LABKIT, "bench", "scaling", "--workers", "1,2", "--repeats", "1", "--steps", "20",
                           "--target-accuracy", str(target), "--out", str(out_dir), "--json"],
                          capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    s = report["settings"]
    assert s["workers"] == [1, 2] and s["repeats"] == 1 and s["target_accuracy"] == target and s["steps"] == 20
    assert s["cpus"] >= 1 and s["test_samples"] == 360

    rows = {(r["scaling"], r["workers"]): r for r in report["rows"]}
    assert set(rows) == {("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)}
    assert rows[("strong", 2)]["batch_per_rank"] == 32 and rows[("strong", 2)]["global_batch"] == 64
    assert rows[("weak", 2)]["batch_per_rank"] == 64 and rows[("weak", 2)]["global_batch"] == 128
    assert rows[("strong", 1)]["runs"] == rows[("weak", 1)]["runs"]  # one worker: the same run serves both
    for (kind, workers), row in rows.items():
        (run,) = row["runs"]
        assert run["status"] == "completed"
        assert Path(run["run_dir"]).parent == out_dir
        summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
        assert run["test_accuracy"] == summary["test_accuracy"] == row["test_accuracy"]["median"]
        # time to accuracy always comes with the accuracy reached then, from the run's own metrics
        tta = row["time_to_accuracy_s"]
        assert tta["min"] <= tta["median"] <= tta["max"] and 0 < tta["median"] <= summary["wall_time_s"]
        assert row["accuracy_at_target"]["median"] >= target
        assert row["load_avg_1m"]["median"] >= 0
        if workers == 1:
            assert row["speedup"] == pytest.approx(1.0) and row["efficiency"] == pytest.approx(1.0)
            assert run["bytes_counted"] == 0
        else:
            assert row["speedup"] == pytest.approx(rows[(kind, 1)]["time_to_accuracy_s"]["median"] / tta["median"])
            assert row["efficiency"] == pytest.approx(row["speedup"] / 2)
            assert run["bytes_counted"] == summary["bytes_sent"] > 0
            assert run["bytes_measured"] > 0 and run["packets_measured"] > 0
            assert run["measured_vs_counted"] == pytest.approx(
                (run["bytes_measured"] - run["bytes_counted"]) / run["bytes_counted"])

    agreement = report["bytes_agreement"]
    assert agreement["runs"] == 3  # two 2-worker runs and the determinism run
    if report["wire"]["private_namespace"]:  # lo carries only this benchmark: the 10 % holds
        assert "private network namespace" in report["wire"]["method"]
        assert agreement["within_10_percent"], agreement
    else:
        assert "SHARED" in report["wire"]["method"]

    d = report["determinism"]
    assert d["same_result"] and d["checks"][0]["runs"] == 2 and d["checks"][0]["workers"] == 2
    first, second = d["checks"][0]["final"]
    assert first == second
    assert report["runs"] == {"measured": 3, "determinism": 1, "tuning": 0, "total": 4}
    assert len(list(out_dir.iterdir())) == 4 and not report["failed"]

    checklist = report["checklist"]
    assert [c["number"] for c in checklist] == list(range(1, 13))
    assert [c["way"] for c in checklist] == TWELVE
    assert all(len(c["how_avoided"]) > 30 for c in checklist)
    assert "4 training runs in all" in checklist[2]["how_avoided"]

    table = io.StringIO()
    print_report(report, out=table)
    lines = table.getvalue().splitlines()
    assert any(line.startswith("strong   2") for line in lines)
    assert any("load average (1 min)" in line for line in lines)
    assert lines[-13] == "Twelve ways to fool the masses (Hoefler, 2018), and how this report avoids each:"
    for i, (line, way) in enumerate(zip(lines[-12:], TWELVE), 1):
        assert line.startswith(f"[x] {i:2d}. {way}: ") and len(line) > len(way) + 40, line
