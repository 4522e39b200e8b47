"""Asynchronous point to point (isend / irecv) on gloo and MPI, the fast ring allreduce
against the library, and the fast ring training a model as the library's allreduce does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from labkit.comm import mpiexec_path
from labkit.runs import RunDir

from .conftest import PYTHON, run_cli

RANK_SCRIPT = str(Path(__file__).with_name("p2p_rank.py"))
TIMEOUT_S = 5.0  # p2p_rank.TIMEOUT_S


def launch(out_dir: Path, what: str, n: int, *options: str) -> list[dict]:
    out_dir.mkdir()
    result = run_cli("launch", "-n", n, *options, "--timeout", 150, "--", PYTHON, RANK_SCRIPT, what, out_dir,
                     timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out_dir / f"rank-{r}.json").read_text()) for r in range(n)]


def ring_bytes(numel: int, n: int) -> int:
    """What a rank sends in the bidirectional ring: 2(N-1) chunks of each half."""
    halves = [len(h) for h in torch.arange(numel).tensor_split(2)]
    return 4 * 2 * sum(sum(len(c) for c in torch.arange(h).tensor_split(n)) * (n - 1) // n for h in halves)


def check_both(reports: list[dict], n: int) -> None:
    for report in reports:
        both = report["both_ways"]
        assert both["from_left_ok"] and both["from_right_ok"], both
        assert both["peers"] == [both["left"], both["right"], both["right"], both["left"]]
        for case in report["fast_ring"]:
            assert case["ok"] and case["in_place"], case
            if case["numel"] % (2 * n) == 0:  # the slide's 2(N-1)/N * S
                assert case["bytes_sent"] == 2 * (n - 1) * case["numel"] * 4 // n, case


@pytest.mark.timeout(200)
@pytest.mark.parametrize("n", [2, 3])
def test_isend_irecv_both_ways_and_fast_ring_gloo(tmp_path, no_leftovers, n):
    check_both(launch(tmp_path / "out", "both", n), n)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_isend_irecv_both_ways_and_fast_ring_mpi(tmp_path, no_leftovers):
    if not mpiexec_path():
        pytest.skip("no mpiexec")
    check_both(launch(tmp_path / "out", "both", 3, "--launcher", "mpi", "--backend", "mpi"), 3)


def check_dead(report: dict, silent: bool = False) -> None:
    for op in ("irecv", "isend"):
        outcome = report[op]
        assert outcome["error"] == "PeerError", outcome
        assert outcome["seconds"] < TIMEOUT_S + 3, outcome  # within its deadline
        if silent and op == "irecv":  # a live peer is given the whole deadline (gloo then
            assert outcome["seconds"] > TIMEOUT_S - 1, outcome  # closes the pair: isend fails at once)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("peer", ["dead", "silent"])
def test_dead_or_silent_peer_gives_peer_error_gloo(tmp_path, no_leftovers, peer):
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("launch", "-n", 2, "--timeout", 60, "--", PYTHON, RANK_SCRIPT, peer, out, timeout=90)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_dead(json.loads((out / "rank-0.json").read_text()), silent=peer == "silent")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dead_peer_gives_peer_error_mpi(tmp_path, no_leftovers):
    if not mpiexec_path():
        pytest.skip("no mpiexec")
    out = tmp_path / "out"
    out.mkdir()
    # -disable-auto-cleanup: mpiexec leaves rank 0 running when rank 1 is gone
    env = dict(os.environ, LABKIT_BACKEND="mpi", OMP_NUM_THREADS="1")
    proc = subprocess.run([mpiexec_path(), "-disable-auto-cleanup", "-n", "2", sys.executable, RANK_SCRIPT,
                           "dead", str(out)], env=env, capture_output=True, text=True, timeout=90)
    assert (out / "rank-0.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    check_dead(json.loads((out / "rank-0.json").read_text()))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_training_with_the_fast_ring_matches_the_library(tmp_path, no_leftovers):
    """`labkit train --workers 4 --allreduce-algorithm ring` reaches the library's accuracy;
    the sums differ only in rounding, so the final weights agree to ~1e-5."""
    finals, accuracies = {}, {}
    for algorithm in ("library", "ring"):
        run_dir = tmp_path / algorithm
        result = run_cli("train", "--workers", 4, "--steps", 60, "--allreduce-algorithm", algorithm,
                         "--run-dir", run_dir, "--quiet", timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = RunDir(run_dir).read_summary()
        accuracies[algorithm] = summary["test_accuracy"]
        finals[algorithm] = RunDir(run_dir).load_checkpoint()["model"]
    assert accuracies["ring"] == pytest.approx(accuracies["library"], abs=0.003), accuracies
    largest = max(float((finals["ring"][k] - finals["library"][k]).abs().max()) for k in finals["library"])
    assert largest < 1e-4, largest
    print(f"accuracy {accuracies}, largest weight difference {largest:.2e}")
