"""Gradient compression on top of naive and bucketed data parallelism (and refusals of what cannot work).

Bucketed top-k with error feedback is the flat buffer's top-k, with one difference: a bucket holds
the layers last first (the order backward produces them), and torch.topk keeps, among values of
equal magnitude at the k-th place, the ones that come first; digits has pixels whose columns are
equal within a batch, so such ties happen (after a few steps of this run). With one bucket,
bucketed top-k therefore equals the sync mode's flat top-k laid out in the bucket's order, step for
step, to 1e-6 (here: exactly). Every registered compressor runs under naive and bucketed (several
buckets) on 2 ranks, and every rank ends each step with the same averaged gradient; ``labkit
train`` runs bucketed top-k on digits through the real worker.
"""

import functools
import json

import pytest
import torch
from torch.nn import functional as F

from .conftest import run_cli

STEPS = 20
BATCH = 32


def _shard(comm, x, y):
    rows = slice(comm.rank * len(x) // comm.size, (comm.rank + 1) * len(x) // comm.size)
    return x[rows], y[rows]


def compressed_ranks(comm) -> dict:
    """What one rank records (run through ``spawn.run_ranks``)."""
    from labkit.comm.buckets import bind_flat
    from labkit.compress import CompressedCommunicator, available_compressors, make_compressor
    from labkit.parallel.data_bucketed import DataParallelBucketed
    from labkit.parallel.data_naive import DataParallelNaive
    from labkit.parallel.reference import digits_batches, make_mlp

    out = {}
    # 1. bucketed top-k (one bucket) against the sync mode's flat top-k in the bucket's order
    flat_model, bucketed_model = make_mlp(), make_mlp()
    flat_params = list(reversed(list(flat_model.parameters())))  # the bucket's order: last layer first
    flat = bind_flat(flat_params)
    flat_comm = CompressedCommunicator(comm, make_compressor("topk", ratio=0.05))
    bucketed = DataParallelBucketed(bucketed_model, comm, bucket_mb=100.0,
                                    compressor=make_compressor("topk", ratio=0.05))
    flat_opt = torch.optim.SGD(flat_model.parameters(), lr=0.05)
    bucketed_opt = torch.optim.SGD(bucketed_model.parameters(), lr=0.05)
    losses, gradient_gaps = [], []
    for x, y in digits_batches(BATCH, STEPS):
        x, y = _shard(comm, x, y)
        flat_model.zero_grad(set_to_none=False)  # as the allreduce sync mode does
        F.cross_entropy(flat_model(x), y).backward()
        flat_comm.allreduce(flat, key="grad")
        flat.div_(comm.size)
        bucketed_opt.zero_grad()
        losses.append(bucketed.forward_backward(x, y))
        gradient_gaps.append(max(float((a.grad - b.grad).abs().max())
                                 for a, b in zip(flat_model.parameters(), bucketed_model.parameters())))
        flat_opt.step()
        bucketed_opt.step()
    out["buckets"] = len(bucketed.buckets)
    out["gradient_gaps"] = gradient_gaps
    out["weight_gap"] = max(float((a - b).detach().abs().max())
                            for a, b in zip(flat_model.parameters(), bucketed_model.parameters()))
    out["losses"] = losses
    out["residual_keys"] = sorted(bucketed.compressed.compressor.memory.residuals)

    # 2. every compressor, naive and bucketed (small buckets: several messages)
    x, y = _shard(comm, *next(iter(digits_batches(BATCH, 1))))
    out["every"] = {}
    for name in available_compressors():
        for way in ("naive", "bucketed"):
            model = make_mlp()
            compressor = make_compressor(name)
            sync = (DataParallelNaive(model, comm, compressor=compressor) if way == "naive" else
                    DataParallelBucketed(model, comm, bucket_mb=0.03, compressor=compressor))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            before = comm.stats.bytes_sent
            grads = []
            for _ in range(2):
                optimizer.zero_grad()
                sync.forward_backward(x, y)
                grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
                optimizer.step()
            out["every"][name, way] = {"grads": grads, "bytes": comm.stats.bytes_sent - before,
                                       "buckets": len(sync.buckets) if way == "bucketed" else None}
    # the exact mean of the ranks' gradients at the first step, for "none"
    model = make_mlp()
    F.cross_entropy(model(x), y).backward()
    out["own_gradient"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    return out  # numpy, not tensors: a tensor would travel as shared memory of a process that has ended


def both_ranks(comm) -> dict:
    """This file's runs and test_parallel_overlap.py's, on the same two ranks."""
    from tests.test_parallel_overlap import overlap_ranks

    return {"compress": compressed_ranks(comm), "overlap": overlap_ranks(comm)}


@functools.lru_cache(maxsize=1)
def spawned() -> list:
    """One start of two ranks for both files (starting them is most of the time on 2 cores)."""
    from labkit.parallel.spawn import run_ranks

    return run_ranks(both_ranks, 2, timeout=240)


@pytest.fixture(scope="module")
def ranks():
    return [r["compress"] for r in spawned()]


def test_bucketed_topk_with_error_feedback_equals_flat_topk_in_the_bucket_order(ranks):
    for r in ranks:
        assert r["buckets"] == 1
        assert max(r["gradient_gaps"]) <= 1e-6 and r["weight_gap"] <= 1e-6, r["gradient_gaps"]
        assert r["residual_keys"] == ["bucket0"]  # error feedback kept for the bucket
        assert r["losses"][-1] < r["losses"][0] - 0.5  # it trains
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank its own shard


def test_every_compressor_runs_under_naive_and_bucketed(ranks):
    from labkit.compress import available_compressors

    mean = torch.from_numpy((ranks[0]["own_gradient"] + ranks[1]["own_gradient"]) / 2)
    for name in available_compressors():
        for way in ("naive", "bucketed"):
            cases = [r["every"][name, way] for r in ranks]
            if way == "bucketed":
                assert cases[0]["buckets"] > 1
            for step in range(2):
                g0, g1 = (torch.from_numpy(c["grads"][step]) for c in cases)
                assert torch.isfinite(g0).all() and g0.abs().sum() > 0, (name, way, step)
                torch.testing.assert_close(g0, g1, rtol=0, atol=0, msg=f"{name} {way}: ranks differ")
            assert cases[0]["bytes"] > 0
            if name == "none":
                torch.testing.assert_close(torch.from_numpy(cases[0]["grads"][0]), mean, rtol=0, atol=1e-6)
            elif name in ("fp16", "bf16"):
                torch.testing.assert_close(torch.from_numpy(cases[0]["grads"][0]), mean, rtol=1e-2, atol=1e-3)
    plain = ranks[0]["every"]["none", "bucketed"]["bytes"]
    assert ranks[0]["every"]["topk", "bucketed"]["bytes"] < plain / 4  # top-k 1 %: far fewer bytes


@pytest.mark.timeout(300)
def test_bucketed_with_a_compressor_through_labkit_train(tmp_path, no_leftovers):
    run_dir = tmp_path / "bucketed-topk"
    result = run_cli("train", "--workers", "2", "--steps", "30", "--eval-every", "100", "--log-every", "10",
                     "--seed", "0", "--run-dir", run_dir, "--data-parallel", "bucketed", "--bucket-mb", "0.01",
                     "--compression", "topk", "--compression-param", "ratio=0.05", timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["grid"] == {"data": 2, "pipeline": 1, "tensor": 1}
    # each rank's step record: every bucket compressed and sent while backward was still running
    from labkit.runs import RunDir

    records = [e for e in RunDir(run_dir).metrics(kind="event") if e.get("event") == "buckets"]
    assert sorted({(e["rank"], e["step"]) for e in records}) == [(r, s) for r in (0, 1) for s in (10, 20, 30)]
    for e in records:
        kinds = [event["kind"] for event in e["events"]]
        assert e["buckets"] > 1 and e["overlapped"] == e["buckets"], e
        assert kinds.index("backward_start") < kinds.index("exchange_start") < kinds.index("backward_end"), kinds
        assert all(event["asynchronous"] for event in e["events"] if event["kind"] == "exchange_start"), e
    assert summary["test_accuracy"] > 0.7, summary["test_accuracy"]
    # per step and rank: 4 buckets of top-k 5 % (6 bytes a value) and two scalars, far below the
    # 4 bytes a value of the plain allreduce; the broadcast and gathers of the whole model come once
    numel = sum(p.numel() for p in make_mlp_for_digits().parameters())
    assert summary["bytes_sent"] < 2 * 30 * 4 * numel / 4, summary["bytes_sent"]


def make_mlp_for_digits():
    from labkit.models import build_model

    return build_model("mlp", (1, 8, 8), 10, seed=0)


SPLIT = [dict(parallelism="model"), dict(parallelism="pipeline"), dict(parallelism="tensor"),
         dict(parallelism="hybrid"), dict(parallelism="data", data_parallel="naive"),
         dict(parallelism="data", data_parallel="bucketed")]


@pytest.mark.parametrize("settings", SPLIT, ids=lambda s: "-".join(s.values()))
def test_sync_modes_that_cannot_combine_are_refused_in_one_line(settings):
    from labkit import RunConfig
    from labkit.config import ConfigError
    from labkit.parallel import MASTER_MODES, WEIGHT_SCHEDULES
    from labkit.registry import SYNC_MODES

    for sync in SYNC_MODES.names():
        config = RunConfig(workers=4 if settings["parallelism"] == "hybrid" else 2, sync=sync, steps=5, **settings)
        if sync == "allreduce":
            config.validate()
            continue
        with pytest.raises(ConfigError) as error:
            config.validate()
        line = str(error.value)
        assert "\n" not in line and line.startswith(error.value.option + ": ")
        if SYNC_MODES.entry(sync).meta.get("validate") is not None and error.value.option != "--sync":
            continue  # the sync mode's own check spoke first
        assert error.value.option == "--sync" and f"{sync} cannot combine with" in line, line
        # why, by the family of the mode
        if sync in MASTER_MODES:
            assert "rank 0 is its master" in line, line
        elif sync in WEIGHT_SCHEDULES:
            assert "averages weights, not gradients" in line, line
        else:
            assert sync == "hogwild" and "shared in memory" in line, line
        # what to use instead
        if settings["parallelism"] == "data":
            assert f"--data-parallel {settings['data_parallel']}:" in line
            assert f"use --data-parallel flat (the default, where --sync {sync} runs as it is), or --sync allreduce" in line
        else:
            assert "(--sync allreduce)" in line


REFUSED = [("ps-sync", "naive", "rank 0 is its master"), ("local-sgd", "bucketed", "every --sync-every steps"),
           ("gossip", "naive", "ring neighbours"), ("hogwild", "bucketed", "shared in memory")]


def test_a_refused_sync_mode_ends_the_cli_with_exit_2_and_one_line(tmp_path, capsys):
    from labkit.cli import main

    result = run_cli("train", "--steps", "5", "--workers", "2", "--run-dir", tmp_path / "bad", "--data-parallel", "bucketed",
                     "--sync", "fedavg", timeout=120)  # the real exit status, once
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"labkit: error: --sync: {lines[0].split('--sync: ', 1)[1]}"], lines
    assert "fedavg cannot combine with --data-parallel bucketed: it averages weights, not gradients, once a round" in lines[0]
    for sync, way, why in REFUSED:  # the others in this process
        capsys.readouterr()
        assert main(["train", "--steps", "5", "--workers", "2", "--run-dir", str(tmp_path / "bad"), "--data-parallel", way,
                     "--sync", sync]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"labkit: error: --sync: {sync} cannot combine with "
                                                       f"--data-parallel {way}: ") and why in lines[0], lines
        assert "use --data-parallel flat" in lines[0] and captured.out == ""
    assert not (tmp_path / "bad").exists()


def test_a_hand_written_allreduce_is_refused_where_the_library_sums():
    from labkit import RunConfig
    from labkit.config import ConfigError

    RunConfig(workers=2, steps=5, allreduce_algorithm="ring").validate()  # data flat: the sync mode's buffer
    for settings in (dict(data_parallel="naive"), dict(data_parallel="bucketed"), dict(parallelism="tensor")):
        with pytest.raises(ConfigError, match="^--allreduce-algorithm: ring sums the one flat buffer of "
                                              "--data-parallel flat; .* use --allreduce-algorithm library"):
            RunConfig(workers=2, steps=5, allreduce_algorithm="ring", **settings).validate()


def test_compression_across_the_data_group_and_where_there_is_none():
    from labkit import RunConfig
    from labkit.config import ConfigError

    for settings in (dict(parallelism="hybrid"), dict(parallelism="hybrid", tensor_parallel=2),
                     dict(parallelism="data", data_parallel="bucketed"), dict(parallelism="data", data_parallel="naive")):
        RunConfig(workers=4, compression="topk", steps=5, **settings).validate()  # 2 data replicas or more
    for settings in (dict(parallelism="pipeline"), dict(parallelism="tensor")):
        with pytest.raises(ConfigError, match="^--compression: topk compresses the gradients exchanged between"):
            RunConfig(workers=2, compression="topk", steps=5, **settings).validate()
