"""Compressed buckets overlap the backward pass, and take the very steps of the blocking exchange.

Two ranks train the digits MLP a few steps under bucketed data parallelism (several buckets)
twice per compressor: with the overlap (each bucket compressed in its backward hook, its
exchange started asynchronously: an allreduce of the fields for a summable compressor, an
allgather of the packets for the others) and without it (every bucket exchanged after
backward, blocking, in the same order). The weights must be the same to the last bit, and the
step record must show the exchanges starting before backward ends with the overlap, and only
after it without. QSGD is random: each run starts from the same seed.

The same two runs go again under ``mpiexec`` with the MPI backend, whose collectives started
without waiting run on the communicator's own thread (MPICH would not move them otherwise).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240

STEPS = 3
BATCH = 32
# none: the plain allreduce; fp16: summable fields; topk, onebit, qsgd: gathered packets;
# powersgd: two dependent rounds, on the compressing communicator's background thread
COMPRESSORS = {"none": {}, "fp16": {}, "topk": {"ratio": 0.05}, "onebit": {}, "qsgd": {}, "powersgd": {"rank": 2}}


def overlap_ranks(comm) -> dict:
    """Run on each of the ranks (``spawn.run_ranks``)."""
    from labkit.compress import make_compressor
    from labkit.parallel.data_bucketed import DataParallelBucketed
    from labkit.parallel.reference import digits_batches, make_mlp

    out = {}
    for name, params in COMPRESSORS.items():
        for overlap in (False, True):
            torch.manual_seed(100 + comm.rank)  # QSGD's rounding: the same draws in both runs
            # PowerSGD's matrix products on a wide model: rounding would show a thread that splits them otherwise
            model = make_mlp(hidden=(512,) * 3) if name == "powersgd" else make_mlp()
            sync = DataParallelBucketed(model, comm, bucket_mb=0.02, compressor=make_compressor(name, **params),
                                        overlap=overlap)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            losses = []
            for x, y in digits_batches(BATCH, STEPS):
                rows = slice(comm.rank * BATCH // comm.size, (comm.rank + 1) * BATCH // comm.size)
                optimizer.zero_grad()
                losses.append(sync.forward_backward(x[rows], y[rows]))
                optimizer.step()
            weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()
            out[name, overlap] = {"weights": weights, "record": sync.last_record, "buckets": len(sync.buckets),
                                  "losses": losses}
    out["initial"] = {name: torch.cat([p.detach().reshape(-1) for p in (make_mlp(hidden=(512,) * 3) if name == "powersgd"
                                                                         else make_mlp()).parameters()]).numpy()
                      for name in COMPRESSORS}
    return out


@pytest.fixture(scope="module")
def ranks():
    # the same two ranks as test_parallel_compress.py's runs
    from .test_parallel_compress import spawned

    return [r["overlap"] for r in spawned()]


@pytest.fixture(scope="module")
def mpi_ranks(tmp_path_factory):
    """The same runs on two ranks under mpiexec with the MPI backend (tests/overlap_rank.py)."""
    pytest.importorskip("mpi4py")
    from labkit.comm import mpiexec_path

    if mpiexec_path() is None:
        pytest.skip("no mpiexec")
    out = tmp_path_factory.mktemp("overlap-mpi")
    command = [sys.executable, "-m", "labkit.cli", "launch", "-n", "2", "--launcher", "mpi", "--backend", "mpi",
               "--timeout", str(TIMEOUT), "--", sys.executable, str(ROOT / "tests" / "overlap_rank.py"), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT + 30, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(2)]


def check_weights(ranks, name):
    for r in ranks:
        assert r[name, True]["buckets"] >= 3
        np.testing.assert_array_equal(r[name, True]["weights"], r[name, False]["weights"])
        assert np.abs(r[name, True]["weights"] - r["initial"][name]).max() > 1e-3  # it trained
    np.testing.assert_array_equal(ranks[0][name, True]["weights"], ranks[1][name, True]["weights"])


def _order(record: list[dict]) -> tuple[int, dict, dict]:
    """(index of backward_end, bucket -> index of its exchange_start, bucket -> that event)."""
    kinds = [e["kind"] for e in record]
    assert kinds.count("backward_end") == 1 and kinds[0] == "backward_start", kinds
    starts = {e["bucket"]: i for i, e in enumerate(record) if e["kind"] == "exchange_start"}
    events = {e["bucket"]: e for e in record if e["kind"] == "exchange_start"}
    return kinds.index("backward_end"), starts, events


def check_order(ranks, name):
    for r in ranks:
        overlapped, blocking = r[name, True], r[name, False]
        end, starts, events = _order(overlapped["record"])
        assert sorted(starts) == list(range(overlapped["buckets"]))
        assert all(i < end for i in starts.values()), overlapped["record"]  # every bucket leaves during backward
        ends = [i for i, e in enumerate(overlapped["record"]) if e["kind"] == "exchange_end"]
        assert len(ends) == overlapped["buckets"] and min(ends) > end  # and is waited for before the step
        # each bucket as soon as backward completed it: right after its bucket_ready
        for b, i in starts.items():
            assert overlapped["record"][i - 1] == {**overlapped["record"][i - 1], "kind": "bucket_ready", "bucket": b}
        assert all(e["asynchronous"] for e in events.values()), (name, events)  # left on the wire
        end, starts, _ = _order(blocking["record"])  # the baseline: nothing leaves before backward ends
        assert all(i > end for i in starts.values()), blocking["record"]


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_overlapped_buckets_give_the_blocking_weights_exactly(ranks, name):
    check_weights(ranks, name)


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_the_step_record_shows_the_exchanges_starting_during_backward(ranks, name):
    check_order(ranks, name)


@pytest.mark.timeout(TIMEOUT + 60)
def test_under_mpi_the_buckets_overlap_backward_with_the_blocking_weights(mpi_ranks):
    for name in COMPRESSORS:
        check_weights(mpi_ranks, name)
        check_order(mpi_ranks, name)
