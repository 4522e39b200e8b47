"""Benchmarks: ``labkit bench NAME [--json]``.

Each benchmark is a module with ``main(argv) -> int`` that prints a table for people, or
JSON with ``--json``. Ratios are always against a baseline measured in the same run.
"""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "allreduce": ("labkit.bench.allreduce", "allreduce algorithms: time, algbw, busbw, cost model"),
    "compress": ("labkit.bench.compress", "compressors: throughput, ratio, error"),
    "modes": ("labkit.bench.modes", "every sync mode on digits: accuracy, time, bytes, comm fraction"),
    "lns": ("labkit.bench.lns", "the seed-001 LNS table: normal, LNS matmul, LNS everywhere, + Kahan"),
    "conv": ("labkit.bench.conv", "convolution algorithms: work, depth, multiplications, time vs torch"),
    "microbatch": ("labkit.bench.microbatch", "micro-batch x algorithm per layer under a workspace budget"),
    "latency": ("labkit.bench.latency", "ProxylessNAS latency table of this machine: every candidate, batch 1, median"),
    "parallel": ("labkit.bench.parallel", "every parallelism: step time, bubble vs formula, bytes, memory per rank"),
    "scaling": ("labkit.bench.scaling", "strong/weak scaling to a test accuracy, by the rules"),
    "grading": ("labkit.bench.grading", "autograding a class: submissions per minute, serial against parallel"),
    "start": ("labkit.bench.start", "Start to first step, cold against warm ranks, and the time of --help"),
    "faults": ("labkit.bench.faults", "every fault injected into a real run: what was kept, what was lost"),
}


def run_benchmark(name: str, argv: list[str]) -> int:
    module_name, _ = BENCHMARKS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"labkit: error: bench: {name} is not available in this installation")
            return 2
        raise
    return module.main(argv)
