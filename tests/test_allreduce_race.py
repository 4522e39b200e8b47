"""examples/allreduce_race.py: a user's own script under ``labkit launch`` races the fast
ring against torch.distributed's allreduce (small and quick here; the figures are in
docs/collectives.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from labkit.launch.base import host_cores

from .conftest import PYTHON

SCRIPT = str(Path(__file__).resolve().parent.parent / "examples" / "allreduce_race.py")


@pytest.mark.timeout(60)
def test_race_runs_under_launch_and_reports_both(no_leftovers, capfd):
    from labkit.cli import main  # `labkit launch`, in this process: torch is imported once less

    out = no_leftovers / "race.json"
    code = main(["launch", "-n", "2", "--timeout", "50", "--", PYTHON, SCRIPT, "--bytes", "64K",
                 "--rounds", "3", "--iters", "2", "--json", str(out)])
    result = capfd.readouterr()
    assert code == 0, result.out[-3000:] + result.err[-3000:]
    report = json.loads(out.read_text())
    assert report["exact"] and report["world_size"] == 2 and report["bytes"] == 65536
    assert report["threads"] == int(os.environ.get("OMP_NUM_THREADS", max(1, host_cores() // 2)))  # cores / N
    assert set(report["times_s"]) == {"fast ring", "dist.all_reduce"}
    assert all(len(t) == 3 and min(t) > 0 for t in report["times_s"].values())
    assert report["ratio"] > 0 and all(b > 0 for b in report["busbw_gbps"].values())
    assert "fast ring / dist.all_reduce busbw" in result.out
