"""Hand-written collectives against the library, their byte counts against the formulas,
the cost model, flat gradient buffers, dead peers, and ``labkit bench allreduce``.

Each world size is one launch (``tests/collectives_rank.py check``) that runs every case
and writes one JSON report per rank: starting N processes costs far more than the cases.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from labkit.comm import costmodel
from labkit.comm.buckets import FlatGradients, GradientBuckets, bind_flat
from labkit.launch.base import free_port, kill_group, spawn

from .conftest import PYTHON, ROOT, run_cli

RANK_SCRIPT = str(ROOT / "tests" / "collectives_rank.py")
ALGORITHMS = ("ring", "tree", "recursive_doubling", "parameter_server")


# --- bytes each rank sends, from the algorithms' definitions --------------------------------
def ring_bytes(numel: int, itemsize: int, n: int, rank: int) -> int:
    """Rank r sends every chunk but (r+1) in the reduce-scatter and every chunk but (r+2)
    in the allgather; chunks are the sizes of ``tensor_split`` (the first numel % n are
    one longer)."""
    chunks = [numel // n + (1 if i < numel % n else 0) for i in range(n)]
    return (2 * numel - chunks[(rank + 1) % n] - chunks[(rank + 2) % n]) * itemsize


def expected_bytes(algorithm: str, numel: int, itemsize: int, n: int, rank: int, root: int = 0) -> int:
    size = numel * itemsize
    if n == 1:
        return 0
    if algorithm == "ring":
        return ring_bytes(numel, itemsize, n, rank)
    if algorithm == "tree":  # once up to the parent, once down to each child
        children = sum(1 for child in (2 * rank + 1, 2 * rank + 2) if child < n)
        return size * ((rank != 0) + children)
    if algorithm == "recursive_doubling":
        active = 2 ** (n.bit_length() - 1)
        steps = active.bit_length() - 1
        extra = n - active
        if rank < 2 * extra:
            return size if rank % 2 else size * (steps + 1)
        return size * steps
    return size * (n - 1) if rank == root else size  # parameter server


def launch_check(out_dir: Path, n: int, *launch_options: str) -> list[dict]:
    out_dir.mkdir()
    result = run_cli("launch", "-n", n, *launch_options, "--timeout", 200, "--",
                     PYTHON, RANK_SCRIPT, "check", out_dir, timeout=230)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out_dir / f"rank-{r}.json").read_text()) for r in range(n)]


def assert_reports(reports: list[dict], n: int, backend: str) -> None:
    for report in reports:
        assert report["size"] == n
        assert report["backend"] == (backend if n > 1 else "single")
        cases = report["cases"]
        assert {c["algorithm"] for c in cases} == set(ALGORITHMS)
        assert {c["dtype"] for c in cases} == {"torch.float32", "torch.float64"}
        for c in cases:
            where = f"rank {report['rank']} of {n}: {c}"
            assert c["ok"] and c["in_place"], where
            want = expected_bytes(c["algorithm"], c["numel"], c["itemsize"], n, report["rank"],
                                  c.get("root", 0))
            assert c["bytes_sent"] == want, where
            if c["algorithm"] == "ring" and c["numel"] % n == 0:  # the slide's 2(N-1)/N * S
                assert c["bytes_sent"] == 2 * (n - 1) * c["numel"] * c["itemsize"] // n, where
        lengths = {c["numel"] for c in cases}
        assert any(length < n for length in lengths) or n == 1
        assert any(length % n for length in lengths) or n == 1
    if n >= 3:  # the sub-communicator of the even ranks
        for report in reports:
            group = report["group"]
            assert group["member"] == (report["rank"] % 2 == 0)
            if group["member"]:
                assert group["group_size"] == (n + 1) // 2
                assert group["group_rank"] == report["rank"] // 2
                assert {c["algorithm"] for c in group["cases"]} == set(ALGORITHMS)
                for c in group["cases"]:
                    assert c["ok"] and c["members_sum_ok"], c


FAST_SIZES = (1, 2, 3)


@pytest.mark.parametrize("n", [pytest.param(n, marks=[] if n in FAST_SIZES else pytest.mark.slow)
                               for n in range(1, 9)])
@pytest.mark.timeout(240)
def test_collectives_match_library_gloo(n, no_leftovers):
    reports = launch_check(no_leftovers / "out", n)
    assert_reports(reports, n, "gloo")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_collectives_match_library_mpi(no_leftovers):
    reports = launch_check(no_leftovers / "out", 3, "--launcher", "mpi", "--backend", "mpi")
    assert_reports(reports, 3, "mpi")


# --- a peer that dies or stops answering ------------------------------------------------------
@pytest.mark.parametrize("how", [signal.SIGKILL, pytest.param(signal.SIGSTOP, marks=pytest.mark.slow)],
                         ids=["killed", "stopped"])
@pytest.mark.timeout(150)
def test_survivors_raise_peer_error(how, no_leftovers):
    """Kill (or freeze) rank 2 in the middle of ring allreduces: ranks 0 and 1 must raise
    PeerError, within LABKIT_TIMEOUT seconds when the peer is frozen, and exit."""
    n, timeout = 3, 15
    env = dict(os.environ, LABKIT_BACKEND="gloo", LABKIT_TIMEOUT=str(timeout), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE=str(n), OMP_NUM_THREADS="1")
    procs = [spawn([PYTHON, RANK_SCRIPT, "loop", str(no_leftovers)], dict(env, RANK=str(r)),
                   no_leftovers / f"rank-{r}.log") for r in range(n)]
    try:
        deadline = time.monotonic() + 90
        while not all((no_leftovers / f"started-{r}").exists() for r in range(n)):
            assert time.monotonic() < deadline, "the ranks never got going"
            assert all(p.poll() is None for p in procs), (no_leftovers / "rank-0.log").read_text()
            time.sleep(0.1)
        time.sleep(0.3)  # well inside the loop of allreduces
        os.kill(procs[2].pid, how)
        stopped_at = time.monotonic()
        for p in procs[:2]:
            p.wait(timeout=timeout + 40)
        survived = time.monotonic() - stopped_at
    finally:
        for p in procs:
            kill_group(p, grace=1.0)
    for r in range(2):
        outcome = json.loads((no_leftovers / f"rank-{r}.json").read_text())
        assert outcome["error"] == "PeerError", outcome["message"]
    assert survived < timeout + 40


# --- flat buffers and buckets -------------------------------------------------------------
def test_bind_flat_views_share_memory_with_grad():
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    params[0].grad = torch.full((3, 4), 2.0)
    flat = bind_flat(params)
    assert flat.numel() == 17
    assert torch.equal(flat[:12], torch.full((12,), 2.0))  # an existing gradient is kept
    assert torch.equal(flat[12:], torch.zeros(5))
    flat.fill_(7.0)
    assert torch.equal(params[0].grad, torch.full((3, 4), 7.0))
    params[1].grad.add_(1.0)
    assert torch.equal(flat[12:], torch.full((5,), 8.0))
    assert params[0].grad.shape == (3, 4) and params[1].grad.shape == (5,)


def test_buckets_respect_the_cap_last_layers_first():
    sizes = [100, 300, 50, 200, 400, 10]  # float32: 4 bytes each
    params = [torch.nn.Parameter(torch.zeros(s)) for s in sizes]
    cap = 1600  # bytes: 400 floats
    buckets = GradientBuckets(params, cap_bytes=cap)
    flattened = [p for group in buckets.groups for p in group]
    assert [id(p) for p in flattened] == [id(p) for p in reversed(params)]
    for group, buffer in zip(buckets.groups, buckets.buffers):
        group_bytes = sum(p.numel() * 4 for p in group)
        assert group_bytes <= cap
        assert buffer.numel() == sum(p.numel() for p in group)
        buffer.fill_(3.0)
        assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in group)
    assert len(buckets) == 4  # [10], [400], [200, 50], [300, 100]
    with pytest.raises(ValueError):
        GradientBuckets(params, cap_bytes=0)


def test_a_parameter_larger_than_the_cap_gets_a_bucket_of_its_own():
    params = [torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(1000))]
    buckets = GradientBuckets(params, cap_bytes=400)
    assert [[p.numel() for p in group] for group in buckets.groups] == [[1000], [10]]


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_backward_writes_straight_into_the_flat_buffer():
    model, reference = _model(0), _model(0)
    flat = FlatGradients(model.parameters())
    x = torch.randn(16, 6)
    for _ in range(2):  # the second backward accumulates, still into the buffer
        model(x).pow(2).sum().backward()
        reference(x).pow(2).sum().backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    assert torch.allclose(flat.buffer, expected)
    offset = 0
    for p in model.parameters():
        assert p.grad.data_ptr() == flat.buffer[offset:].data_ptr()
        offset += p.numel()


def test_check_bound_rebinds_after_set_to_none():
    model = _model(1)
    flat = FlatGradients(model.parameters())
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 6)).sum().backward()
    flat.check_bound()
    assert torch.equal(flat.buffer, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    flat.buffer.zero_()
    assert all(p.grad.abs().sum() == 0 for p in model.parameters())


# --- the cost model -------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,beta", [(50e-6, 1e-9), (2e-6, 4e-11), (1e-3, 2.5e-8)])
def test_fit_recovers_alpha_beta_from_synthetic_timings(alpha, beta):
    sizes = [4 * 4**k for k in range(3, 12)]
    times = [alpha + beta * s for s in sizes]
    fitted_alpha, fitted_beta = costmodel.least_squares(sizes, times)
    assert fitted_alpha == pytest.approx(alpha, rel=1e-9)
    assert fitted_beta == pytest.approx(beta, rel=1e-9)


def test_fit_needs_two_sizes():
    with pytest.raises(ValueError):
        costmodel.least_squares([1024, 1024], [1e-5, 1.1e-5])


@pytest.mark.parametrize("n", [2, 3, 4, 7, 8])
def test_predictions_follow_the_formulas(n):
    alpha, beta, size = 30e-6, 2e-10, 2**24
    message = alpha + size * beta
    ring = 2 * (n - 1) * alpha + 2 * (n - 1) / n * size * beta
    assert costmodel.predict("ring", size, n, alpha, beta) == pytest.approx(ring)
    assert costmodel.predict("library", size, n, alpha, beta) == pytest.approx(ring)
    assert costmodel.predict("parameter_server", size, n, alpha, beta) == pytest.approx(2 * (n - 1) * message)
    doubling_steps = {2: 1, 3: 3, 4: 2, 7: 4, 8: 3}[n]  # log2 P, + 2 to fold when N is not P
    assert costmodel.predict("recursive_doubling", size, n, alpha, beta) == pytest.approx(doubling_steps * message)
    # tree: worked out by hand from the schedule (a parent serves its children in turn)
    tree_steps = {2: 2, 3: 4, 4: 5, 7: 8, 8: 9}[n]
    assert costmodel.predict("tree", size, n, alpha, beta) == pytest.approx(tree_steps * message)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_half_duplex_counts_both_directions_of_an_exchange(n):
    alpha, beta, size = 30e-6, 2e-10, 2**24
    message = alpha + size * beta
    ring = 4 * (n - 1) * alpha + 4 * (n - 1) / n * size * beta
    assert costmodel.predict("ring", size, n, alpha, beta, full_duplex=False) == pytest.approx(ring)
    doubling_steps = {2: 2, 4: 4, 6: 4 + 2}[n]  # 2 log2 P, + 2 to fold when N is not P
    assert costmodel.predict("recursive_doubling", size, n, alpha, beta, full_duplex=False) == \
        pytest.approx(doubling_steps * message)
    for collective in ("tree", "parameter_server"):  # never send and receive in one step
        assert costmodel.predict(collective, size, n, alpha, beta, full_duplex=False) == \
            pytest.approx(costmodel.predict(collective, size, n, alpha, beta))


def test_prediction_edge_cases():
    assert costmodel.predict("ring", 2**20, 1, 1e-5, 1e-9) == 0
    with pytest.raises(ValueError):
        costmodel.predict("butterfly", 2**20, 4, 1e-5, 1e-9)
    # the ring's time hardly grows with N at large sizes, the parameter server's does
    big = 2**26
    ring = [costmodel.predict("ring", big, n, 1e-5, 1e-9) for n in (2, 8)]
    ps = [costmodel.predict("parameter_server", big, n, 1e-5, 1e-9) for n in (2, 8)]
    assert ring[1] / ring[0] < 2 < ps[1] / ps[0]


# --- the benchmark ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_allreduce_json(no_leftovers):
    result = run_cli("bench", "allreduce", "--json", "-n", 2, "--max-bytes", "16K", "--iters", 3,
                     cwd=no_leftovers, timeout=230)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["world_size"] == 2 and report["copy_gbps"] > 0
    assert {launch["backend"] for launch in report["launches"]} == {"gloo", "mpi"}
    for launch in report["launches"]:
        assert launch["alpha_s"] > 0 and launch["beta_s_per_byte"] > 0
    names = {"labkit-ring", "labkit-tree", "labkit-recursive-doubling", "labkit-ps",
             "torch.distributed", "MPI_Allreduce"}
    assert {(row["algorithm"], row["bytes"]) for row in report["rows"]} == \
        {(name, size) for name in names for size in (4096, 16384)}
    for row in report["rows"]:
        assert row["valid"], row
        assert row["algbw_gbps"] == pytest.approx(row["bytes"] / row["time_us"] / 1e3)
        assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"] * 2 * (2 - 1) / 2)
        assert row["model_us"] > 0 and 1 <= row["iters"] <= 3


@pytest.mark.parametrize("argv,option", [(["-n", "1"], "-n"),
                                         (["--min-bytes", "1M", "--max-bytes", "4K"], "--min-bytes"),
                                         (["--max-bytes", "lots"], "--max-bytes")])
def test_bench_allreduce_rejects_bad_options(argv, option, capsys):
    from labkit.bench.allreduce import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("labkit: error: ") and option in err and err.count("\n") == 1, err
