"""``labkit bench parallel``: every parallelism on one model and one global batch.

For data parallelism (naive, flat, bucketed, and torch DDP timed beside them in the same
run; bucketed again with each compressor of ``--compression``, its buckets compressed in their
backward hooks and their exchanges overlapping backward), model, pipeline (GPipe and 1F1B), tensor and, with 4 or more ranks, hybrid grids:
the median step time (and the CPU time of each rank's main thread), the bubble (measured: the idle share of the step, averaged over the
ranks; and the formula (p−1)/(m+p−1)), the bytes each rank sends per step and the bytes
of parameters each rank holds. Then the Knights Landing core groups: one epoch of digits
against the number of groups this machine's cores allow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

DEFAULT_COMPRESSION = "fp16,topk"


def _cases(world: int, microbatches: int, compression: tuple = ()) -> dict:
    out = {
        "data naive": dict(kind="data", data_parallel="naive"),
        "data flat": dict(kind="data", data_parallel="flat"),
        "data bucketed": dict(kind="data", data_parallel="bucketed", bucket_mb=1.0),
        "torch DDP": None,
        **{f"data bucketed {name}": dict(kind="data", data_parallel="bucketed", bucket_mb=1.0, compression=name)
           for name in compression},
        "model": dict(kind="model"),
        "pipeline gpipe": dict(kind="pipeline", microbatches=microbatches, schedule="gpipe"),
        "pipeline 1f1b": dict(kind="pipeline", microbatches=microbatches, schedule="1f1b"),
        "tensor": dict(kind="tensor"),
    }
    if world >= 4 and world % 2 == 0:
        out["hybrid data x pipeline"] = dict(kind="hybrid", microbatches=microbatches)
        out["hybrid data x tensor"] = dict(kind="hybrid", tensor_parallel_size=2)
    return out


def _comms(parallel) -> list:
    grid = parallel.grid
    seen, out = set(), []
    for c in (grid.data_comm, grid.pipeline_comm, grid.tensor_comm):
        if id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def _ddp_case(comm, model, batch: int, bucket_mb: float):
    """torch DDP on ``model``: (step function, result row) for the rows of this rank."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, process_group=comm.group, bucket_cap_mb=bucket_mb)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    rows = slice(comm.rank * batch // comm.size, (comm.rank + 1) * batch // comm.size)

    def step(x, y):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[rows]), y[rows]).backward()
        optimizer.step()

    n, nbytes = comm.size, sum(p.numel() * p.element_size() for p in model.parameters())
    row = {"grid": f"{n}x1x1", "bytes_per_step": 2 * (n - 1) * nbytes // n, "param_bytes": nbytes,
           "bubble": None, "bubble_model": None, "note": "bytes: the ring's 2(N-1)/N"}
    return step, row


def bench_rank(comm, steps: int, batch: int, hidden: tuple, microbatches: int, compression: tuple = ()) -> dict:
    """Run on every rank (through ``spawn.run_ranks``): each case in turn, the same batches.

    Bucketed data parallelism and torch DDP are timed side by side: their steps alternate
    (each goes first every other step), so a change of load on the machine slows both alike.
    Beside the wall time of a step, the CPU time of the rank's main thread (``thread_time``):
    the work each does itself, which other processes on the machine do not stretch.
    """
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 1, 8, 8, generator=g) for _ in range(steps)]
    ys = [torch.randint(0, 10, (batch,), generator=g) for _ in range(steps)]
    warmup = min(3, steps - 1)
    results = {}
    cases = _cases(comm.size, microbatches, compression)
    side_by_side = ("data bucketed", "torch DDP")
    for name in cases:
        if name == "torch DDP":
            continue  # timed with data bucketed
        # name -> (step, parallel model or None, row)
        runs = {who: _build(comm, cases, who, batch, hidden)
                for who in (side_by_side if name == "data bucketed" else (name,))}
        times = {who: [] for who in runs}
        cpu = {who: [] for who in runs}
        bubbles, sent = {who: [] for who in runs}, dict.fromkeys(runs, 0)
        order = list(runs)
        for i, (x, y) in enumerate(zip(xs, ys)):
            for who in (order if i % 2 == 0 else order[::-1]):
                step, parallel, _ = runs[who]
                comm.barrier()
                before = sum(c.stats.bytes_sent for c in _comms(parallel)) if parallel else 0
                t0, c0 = time.perf_counter(), time.thread_time()
                step(x, y)
                times[who].append(time.perf_counter() - t0)
                cpu[who].append(time.thread_time() - c0)
                if i >= warmup and parallel is not None:
                    sent[who] += sum(c.stats.bytes_sent for c in _comms(parallel)) - before
                    stats = parallel.pipeline_stats()
                    if stats:
                        bubbles[who].append(stats["bubble_fraction"])
        for who, (_, parallel, row) in runs.items():
            timing = {"step_s": statistics.median(times[who][warmup:]),
                      "cpu_s": statistics.median(cpu[who][warmup:])}
            if parallel is None:
                results[who] = {**row, **timing}
                continue
            stats = parallel.pipeline_stats()
            s = parallel.shape
            results[who] = {**timing, "grid": f"{s.data}x{s.pipeline}x{s.tensor}",
                            "bytes_per_step": sent[who] / (steps - warmup), "param_bytes": parallel.parameter_bytes(),
                            "bubble": statistics.median(bubbles[who]) if bubbles[who] else None,
                            "bubble_model": stats.get("bubble_fraction_model"),
                            "stashed_peak": stats.get("stashed_peak"), "note": ""}
    return {name: results[name] for name in cases}


def _build(comm, cases: dict, who: str, batch: int, hidden: tuple) -> tuple:
    """(step function, parallel model or None, fixed row or None) of case ``who``."""
    from ..compress import make_compressor
    from ..parallel.build import ParallelModel
    from ..parallel.reference import make_mlp

    model = make_mlp(hidden=hidden)
    if who == "torch DDP":
        step, row = _ddp_case(comm, model, batch, cases["data bucketed"]["bucket_mb"])
        return step, None, row
    settings = dict(cases[who])
    compression = settings.pop("compression", None)
    if compression:  # a compressor of its own: its error feedback is this case's
        settings["compressor"] = make_compressor(compression)
    parallel = ParallelModel(model=model, comm=comm, input_shape=(1, 8, 8), **settings)
    return _parallel_step(parallel), parallel, None


def _parallel_step(parallel):
    optimizer = torch.optim.SGD(parallel.parameters(), lr=0.01)

    def step(x, y):
        optimizer.zero_grad()
        parallel.forward_backward(x, y)
        optimizer.step()

    return step


def combine(per_rank: list[dict]) -> list[dict]:
    """One row per case: the slowest rank's step, the mean bubble, the most any rank sends
    and holds."""
    rows = []
    for name in per_rank[0]:
        cases = [r[name] for r in per_rank]
        bubbles = [c["bubble"] for c in cases if c["bubble"] is not None]
        rows.append({"parallelism": name, "grid": cases[0]["grid"],
                     "step_ms": 1000 * max(c["step_s"] for c in cases),
                     "cpu_ms": 1000 * max(c["cpu_s"] for c in cases),
                     "bubble": statistics.mean(bubbles) if bubbles else None,
                     "bubble_model": cases[0]["bubble_model"],
                     "bytes_per_step_max": max(c["bytes_per_step"] for c in cases),
                     "param_bytes_max": max(c["param_bytes"] for c in cases),
                     "param_bytes_min": min(c["param_bytes"] for c in cases),
                     "stashed_peak": [c.get("stashed_peak") for c in cases] if cases[0].get("stashed_peak") else None,
                     "note": cases[0]["note"]})
    return rows


def core_group_table(max_groups: int, epochs: int) -> list[dict]:
    from ..parallel.core_groups import available_cores, epoch_time
    from ..parallel.spawn import run_ranks

    cores = available_cores()
    rows = []
    for groups in range(1, min(max_groups, len(cores)) + 1):
        results = run_ranks(epoch_time, groups, cores, 64, epochs, timeout=300)
        rows.append({"groups": groups, "cores_per_group": [len(r["cores"]) for r in results],
                     "epoch_s": max(r["seconds"] for r in results) / epochs,
                     "final_loss": results[0]["loss"]})
    return rows


def _fmt(value, width: int) -> str:
    return format("-" if value is None else format(value, ".2f"), f">{width}")


def _problem(args) -> str | None:
    """What is wrong with the options, in one line, or None."""
    from ..compress import available_compressors

    unknown = [name for name in args.compression if name not in available_compressors() or name == "none"]
    if unknown:
        return (f"--compression {unknown[0]!r} is not a compressor; choose from "
                f"{', '.join(n for n in available_compressors() if n != 'none')}")
    if args.workers < 2:
        return "-n must be at least 2"
    if args.batch < 1 or args.hidden < 1 or args.microbatches < 1 or args.core_groups < 0:
        return "--batch, --hidden and --microbatches must be at least 1, --core-groups at least 0"
    if args.batch % (args.workers * args.microbatches):
        return (f"--batch {args.batch} must be divisible by workers x microbatches = "
                f"{args.workers * args.microbatches}")
    if args.steps < 4:
        return "--steps must be at least 4"
    return None


def _print(out: dict) -> None:
    hidden, rows, groups = out["hidden"], out["rows"], out["core_groups"]
    print(f"{out['workers']} ranks, global batch {out['batch']}, MLP 64-{'-'.join(map(str, hidden))}-10, "
          f"{out['microbatches']} micro-batches, median of {out['steps'] - 3} steps (load average {out['load_average']:.1f})")
    print(f"{'parallelism':<24} {'grid DxPxT':>10} {'step ms':>8} {'cpu ms':>7} {'bubble':>7} {'(p-1)/(m+p-1)':>13} "
          f"{'MiB sent/step':>13} {'param MiB/rank':>14}")
    for r in rows:
        params = f"{r['param_bytes_max'] / 2**20:.2f}"
        if r["param_bytes_min"] != r["param_bytes_max"]:
            params = f"{r['param_bytes_min'] / 2**20:.2f}-{params}"
        print(f"{r['parallelism']:<24} {r['grid']:>10} {r['step_ms']:8.1f} {r['cpu_ms']:7.1f} {_fmt(r['bubble'], 7)} "
              f"{_fmt(r['bubble_model'], 13)} {r['bytes_per_step_max'] / 2**20:13.2f} {params:>14}")
    print(f"data bucketed / torch DDP step time: {out['bucketed_over_ddp']:.2f}x (timed side by side, steps "
          f"alternating); main-thread CPU time: {out['bucketed_over_ddp_cpu']:.2f}x")
    if out["compressed_bytes_ratio"]:
        print("bytes sent per step, compressed over uncompressed buckets: " + ", ".join(
            f"{name} {ratio:.3f}" for name, ratio in out["compressed_bytes_ratio"].items()))
    if groups:
        print("\ncore groups (Knights Landing divide and conquer), one epoch of digits:")
        print(f"{'groups':>6} {'cores each':>12} {'epoch s':>8}")
        for g in groups:
            print(f"{g['groups']:>6} {str(g['cores_per_group']):>12} {g['epoch_s']:8.2f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labkit bench parallel", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--workers", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--steps", type=int, default=15, help="steps per parallelism (the first 3 not timed)")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--hidden", type=int, default=512, help="width of the MLP's 3 hidden layers")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--core-groups", type=int, default=4, help="up to this many core groups (0: skip)")
    parser.add_argument("--compression", default=DEFAULT_COMPRESSION, metavar="NAME,...",
                        help=f"compressors timed under bucketed data parallelism, each a row of its own "
                             f"(default {DEFAULT_COMPRESSION}; '' for none)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.compression = tuple(name.strip() for name in args.compression.split(",") if name.strip())
    problem = _problem(args)
    if problem:
        print(f"labkit: error: bench parallel: {problem}")
        return 2
    from ..parallel.spawn import run_ranks

    hidden = (args.hidden,) * 3
    per_rank = run_ranks(bench_rank, args.workers, args.steps, args.batch, hidden, args.microbatches,
                         args.compression, timeout=600)
    rows = combine(per_rank)
    groups = core_group_table(args.core_groups, 1) if args.core_groups else []
    ddp = next(r for r in rows if r["parallelism"] == "torch DDP")
    bucketed = next(r for r in rows if r["parallelism"] == "data bucketed")
    out = {"workers": args.workers, "batch": args.batch, "model": f"mlp {hidden}", "hidden": hidden, "steps": args.steps,
           "microbatches": args.microbatches, "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
           "rows": rows, "bucketed_over_ddp": bucketed["step_ms"] / ddp["step_ms"],
           "bucketed_over_ddp_cpu": bucketed["cpu_ms"] / ddp["cpu_ms"], "core_groups": groups,
           # bytes each compressed row sends per step, over the uncompressed buckets'
           "compressed_bytes_ratio": {name: next(r for r in rows if r["parallelism"] == f"data bucketed {name}")
                                      ["bytes_per_step_max"] / bucketed["bytes_per_step_max"] for name in args.compression}}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    _print(out)
    return 0
