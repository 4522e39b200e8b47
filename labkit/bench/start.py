"""``labkit bench start``: from pressing Start to the first step, cold ranks against warm ones.

In one run: a 4-rank local run started cold (each rank a fresh Python that imports torch
and labkit), then the same run from a pool of warm ranks (``labkit.launch.pool``), timed
from the call that starts the run to the first training step in ``metrics.jsonl``; both
runs' final weights are compared bit for bit. Then the time of ``labkit train --help``
(a fresh process each time; the median of three after one that may fill the cache of
choices). ``--json`` prints ``cold_first_step_s``, ``warm_first_step_s``, ``help_s``,
``same_weights`` and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKERS = 4
STEPS = 20


def first_step_time(config) -> tuple[float, object]:
    """Seconds from ``launch(config)`` to the first training record of the run, and the run's
    result once it has ended."""
    from ..launch import launch
    from ..runs import MetricsTail

    t0 = time.monotonic()
    run = launch(config)
    tail = MetricsTail(run.run_dir)
    first = None
    while first is None and not run.done():
        if any(r.get("kind") == "train" for r in tail.read()):
            first = time.monotonic() - t0
        else:
            time.sleep(0.01)
    result = run.wait(timeout=300)
    if first is None and any(r.get("kind") == "train" for r in tail.read()):
        first = time.monotonic() - t0  # the run ended between two looks: an upper bound
    return first, result


def final_weights(run_dir) -> dict:
    from ..runs import RunDir

    return RunDir(run_dir).load_checkpoint()["model"]


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def help_command() -> list[str]:
    script = Path(sys.executable).with_name("labkit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "labkit.cli"]
    return [*command, "train", "--help"]


def time_help(repeats: int = 3) -> float:
    """Median seconds of ``labkit train --help`` in a fresh process (after one untimed call)."""
    times = []
    for i in range(repeats + 1):
        t0 = time.monotonic()
        done = subprocess.run(help_command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"labkit train --help failed: {done.stderr.decode(errors='replace').strip()}")
        if i:
            times.append(time.monotonic() - t0)
    return statistics.median(times)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "-"


def measure(workers: int = WORKERS, steps: int = STEPS, root: str | None = None) -> dict:
    from ..config import RunConfig
    from ..launch.pool import current_pool, start_pool, stop_pool

    if current_pool() is not None:
        stop_pool()  # the cold run must start cold
    own_root = root is None
    root = Path(root or tempfile.mkdtemp(prefix="labkit-bench-start-"))
    config = RunConfig(workers=workers, steps=steps, log_every=1, eval_every=10**6, checkpoint_every=0)
    try:
        cold_s, cold = first_step_time(config.replace(run_dir=str(root / "cold")))
        pool = start_pool(workers)
        try:
            if not pool.wait_ready(timeout=180):
                raise RuntimeError(f"the warm ranks were not ready within 180 s ({pool})")
            warm_s, warm = first_step_time(config.replace(run_dir=str(root / "warm")))
        finally:
            pool.close()
        statuses = (cold.status, warm.status)
        same = (same_weights(final_weights(cold.run_dir), final_weights(warm.run_dir))
                if statuses == ("completed", "completed") else None)
        return {"workers": workers, "steps": steps, "cold_first_step_s": cold_s, "warm_first_step_s": warm_s,
                "help_s": time_help(), "same_weights": same, "cold_status": cold.status,
                "warm_status": warm.status, "loadavg": loadavg(), "cores": os.cpu_count()}
    finally:
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="labkit bench start", description="From Start to the first step of a local run, with cold ranks "
        "and with warm ones (the same weights, checked), and the time of labkit train --help.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"ranks of each run (default {WORKERS})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps of each run (default {STEPS})")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.steps < 1:
        parser.error("--workers and --steps must be >= 1")
    row = measure(args.workers, args.steps)
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    from .runs import fmt, print_table

    print(f"Start -> first step of a {row['workers']}-rank local run ({row['steps']} steps), "
          f"and labkit train --help; load average {row['loadavg']}, {row['cores']} cores")
    print_table(["cold ranks", "warm ranks", "speed-up", "same weights", "train --help"], [[
        f"{fmt(row['cold_first_step_s'], '.2f')} s", f"{fmt(row['warm_first_step_s'], '.2f')} s",
        (f"{row['cold_first_step_s'] / row['warm_first_step_s']:.1f}x"
         if row["cold_first_step_s"] and row["warm_first_step_s"] else "-"),
        {True: "yes", False: "NO", None: "-"}[row["same_weights"]], f"{row['help_s']:.2f} s"]])
    if row["same_weights"] is False:
        print("labkit: error: bench start: the warm run's weights differ from the cold run's", file=sys.stderr)
        return 1
    return 0
