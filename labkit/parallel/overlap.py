"""Compressed buckets with and without the overlap, timed side by side.

``python -m labkit.parallel.overlap [--compression topk ...]`` starts N ranks (``run_ranks``)
that train two copies of the same MLP with bucketed data parallelism and the same compressor,
one overlapping each bucket's exchange with the backward pass (``overlap=True``) and one
exchanging every bucket after it (``overlap=False``). Their steps alternate (each goes first
every other step, a barrier before each), so that a change of load on the machine slows both
alike; the table gives the median step time of the slowest rank, and checks that both copies
end with the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def time_overlap(comm, compression: str, params: dict, steps: int, batch: int, hidden: tuple,
                 bucket_mb: float) -> dict:
    """On every rank: {"overlap": [seconds per step], "blocking": [...], "same_weights": bool}."""
    from ..compress import make_compressor
    from .data_bucketed import DataParallelBucketed
    from .reference import make_mlp

    g = torch.Generator().manual_seed(0)
    rows = slice(comm.rank * batch // comm.size, (comm.rank + 1) * batch // comm.size)
    runs = {}
    for name, overlap in (("overlap", True), ("blocking", False)):
        model = make_mlp(hidden=hidden)
        sync = DataParallelBucketed(model, comm, bucket_mb=bucket_mb, overlap=overlap,
                                    compressor=make_compressor(compression, **params))
        runs[name] = (model, sync, torch.optim.SGD(model.parameters(), lr=0.01))
    times = {name: [] for name in runs}
    rng = dict.fromkeys(runs, torch.get_rng_state())  # each its own draws (QSGD, TernGrad round at random)
    for i in range(steps):
        x, y = torch.randn(batch, 1, 8, 8, generator=g)[rows], torch.randint(0, 10, (batch,), generator=g)[rows]
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            model, sync, optimizer = runs[name]
            torch.set_rng_state(rng[name])
            comm.barrier()
            t0 = time.perf_counter()
            optimizer.zero_grad()
            sync.forward_backward(x, y)
            optimizer.step()
            times[name].append(time.perf_counter() - t0)
            rng[name] = torch.get_rng_state()
    same = all(torch.equal(a, b) for a, b in zip(runs["overlap"][0].parameters(), runs["blocking"][0].parameters()))
    return {**times, "same_weights": same, "buckets": len(runs["overlap"][1].buckets)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.parallel.overlap", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--workers", type=int, default=2)
    parser.add_argument("--compression", nargs="+", default=["none", "topk", "onebit", "qsgd"])
    parser.add_argument("--steps", type=int, default=15, help="steps of each (the first 3 not timed)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512, help="width of the MLP's 3 hidden layers")
    parser.add_argument("--bucket-mb", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.workers < 2 or args.steps < 4 or args.batch % args.workers:
        print("labkit: error: overlap: needs -n >= 2, --steps >= 4 and --batch divisible by -n")
        return 2
    # the rank function by its module's name, also under ``python -m``
    from labkit.parallel.overlap import time_overlap

    from ..compress import available_compressors
    from .spawn import run_ranks

    unknown = [c for c in args.compression if c not in available_compressors()]
    if unknown:
        print(f"labkit: error: --compression: unknown {unknown[0]!r}; choose from {', '.join(available_compressors())}")
        return 2
    rows = []
    for compression in args.compression:
        params = {"ratio": 0.01} if compression in ("topk", "randomk") else {}
        per_rank = run_ranks(time_overlap, args.workers, compression, params, args.steps, args.batch,
                             (args.hidden,) * 3, args.bucket_mb, timeout=600)
        step = {name: 1000 * max(statistics.median(r[name][3:]) for r in per_rank) for name in ("overlap", "blocking")}
        rows.append({"compression": compression, "buckets": per_rank[0]["buckets"], "overlap_ms": step["overlap"],
                     "blocking_ms": step["blocking"], "ratio": step["overlap"] / step["blocking"],
                     "same_weights": all(r["same_weights"] for r in per_rank)})
    out = {"workers": args.workers, "batch": args.batch, "hidden": args.hidden, "bucket_mb": args.bucket_mb,
           "steps": args.steps, "load_average": os.getloadavg()[0], "rows": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.workers} ranks, MLP 64-{'-'.join([str(args.hidden)] * 3)}-10, global batch {args.batch}, buckets "
          f"of {args.bucket_mb} MiB, median of {args.steps - 3} steps (load average {out['load_average']:.1f})")
    print(f"{'compression':<12} {'buckets':>7} {'overlap ms':>10} {'after ms':>9} {'ratio':>6} {'same weights':>12}")
    for r in rows:
        print(f"{r['compression']:<12} {r['buckets']:>7} {r['overlap_ms']:10.1f} {r['blocking_ms']:9.1f} "
              f"{r['ratio']:6.2f} {str(r['same_weights']):>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
