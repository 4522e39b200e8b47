"""A race between labkit's fast ring and torch.distributed's own allreduce, in your own script.

    labkit launch -n 4 -- python examples/allreduce_race.py [--bytes 16M] [--rounds 9]
                                                          [--iters 3] [--json OUT]

Every rank sums a float32 tensor of ``--bytes`` with both allreduces on the same gloo
process group. In each of ``--rounds`` rounds the two take turns (who goes first
alternates), each with ``--iters`` back-to-back calls; a turn's time is its mean per
call on the slowest rank. Rank 0 prints every round, the medians, the bus bandwidth
2(N-1)/N * S / time of each, and the median over the rounds of the library's time
over the ring's (above 1: the ring is faster), with the load average and the threads
each rank's torch uses (``labkit launch`` gives each rank cores / N). Before timing,
both sum the same whole numbers and must agree exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import labkit.comm
from labkit.bench.allreduce import parse_bytes
from labkit.comm.collectives import fast_ring_allreduce


def library(comm, tensor):
    dist.all_reduce(tensor)
    return tensor


def slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def agree(comm, numel: int) -> bool:
    """Both allreduces give the same sum, bit for bit, on rank-dependent whole numbers."""
    data = torch.arange(numel, dtype=torch.float32).remainder_(101) + comm.rank
    ring, lib = fast_ring_allreduce(comm, data.clone()), library(comm, data.clone())
    flag = torch.tensor([1.0 if torch.equal(ring, lib) else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag == 1.0)


def race(comm, numel: int, rounds: int, iters: int) -> dict:
    contenders = {"fast ring": fast_ring_allreduce, "dist.all_reduce": library}
    buffer = torch.ones(numel)
    for function in contenders.values():  # warm-up: connections, buffers
        function(comm, buffer)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(rounds):
        order = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                contenders[name](comm, buffer)
            times[name].append(slowest((time.perf_counter() - start) / iters))
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="allreduce_race.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=parse_bytes, default="16M", help="tensor size (default 16M)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of turns (default 9)")
    parser.add_argument("--iters", type=int, default=3, help="calls per turn (default 3)")
    parser.add_argument("--json", metavar="OUT", help="rank 0 also writes the figures to OUT")
    args = parser.parse_args(argv)
    if args.bytes < 4 or args.rounds < 1 or args.iters < 1:
        parser.error("--bytes must be at least 4, --rounds and --iters at least 1")

    comm = labkit.comm.init()
    if comm.backend != "gloo":
        parser.error(f"the race runs on gloo, not {comm.backend}")
    numel, n = args.bytes // 4, comm.size
    exact = agree(comm, numel)
    times = race(comm, numel, args.rounds, args.iters)
    load = os.getloadavg()
    if comm.rank == 0:
        ring, lib = times["fast ring"], times["dist.all_reduce"]
        ratio = statistics.median(b / a for a, b in zip(ring, lib))
        busbw = {name: 2 * (n - 1) / n * numel * 4 / statistics.median(t) / 1e9 for name, t in times.items()}
        print(f"# {n} ranks, {args.bytes / 2**20:g} MB float32, {args.rounds} rounds x {args.iters} calls, "
              f"torch threads per rank {torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(f"# same sum as dist.all_reduce, bit for bit: {'yes' if exact else 'NO'}")
        print(f"{'round':>5} {'fast ring (ms)':>15} {'dist.all_reduce (ms)':>21}")
        for k, (a, b) in enumerate(zip(ring, lib)):
            print(f"{k:>5} {a * 1e3:>15.2f} {b * 1e3:>21.2f}")
        for name, t in times.items():
            print(f"# {name:<16} median {statistics.median(t) * 1e3:8.2f} ms   busbw {busbw[name]:.3f} GB/s")
        print(f"# fast ring / dist.all_reduce busbw (median of the rounds' ratios): {ratio:.2f}x")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": n, "bytes": numel * 4, "rounds": args.rounds, "iters": args.iters,
                           "threads": torch.get_num_threads(), "loadavg": list(load), "exact": exact,
                           "times_s": times, "busbw_gbps": busbw, "ratio": ratio}, f)
    dist.barrier()
    comm.close()
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
