"""``labkit bench modes``: every sync mode on the same problem, side by side.

Each registered sync mode trains the MLP on digits with the same number of workers and
its default settings; the table gives the test accuracy, the wall time (and its ratio to
synchronous allreduce, measured in the same run), the bytes sent by all ranks and the
fraction of the ranks' busy time spent communicating.
"""

from __future__ import annotations

import argparse

from .runs import dump_json, fmt, print_table, run_all


def main(argv: list[str]) -> int:
    from ..config import RunConfig
    from ..registry import SYNC_MODES

    parser = argparse.ArgumentParser(prog="labkit bench modes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--launcher", default="local")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--modes", default=",".join(SYNC_MODES.names()),
                        help="comma-separated sync modes (default: all registered)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in SYNC_MODES]
    if unknown:
        parser.error(f"unknown sync mode(s): {', '.join(unknown)}")
    if "allreduce" in modes:  # the baseline first
        modes.remove("allreduce")
        modes.insert(0, "allreduce")
    configs = [RunConfig(workers=args.workers, launcher=args.launcher, backend=args.backend, sync=m).validate()
               for m in modes]
    rows = run_all(configs, modes)
    base = next((r["wall_time_s"] for r in rows if r["label"] == "allreduce" and r["wall_time_s"]), None)
    for r in rows:
        r["time_vs_allreduce"] = r["wall_time_s"] / base if base and r["wall_time_s"] else None
    if args.json:
        dump_json(rows)
        return 0
    print(f"{args.workers} workers, {args.launcher} launcher, {args.backend} backend, MLP on digits, default steps")
    print_table(["mode", "status", "test_acc", "wall_s", "x allreduce", "bytes_sent", "comm_frac"],
                [[r["label"], r["status"], fmt(r["test_accuracy"], ".4f"), fmt(r["wall_time_s"], ".1f"),
                  fmt(r["time_vs_allreduce"], ".2f"), fmt(r["bytes_sent"], ",d"), fmt(r["comm_fraction"], ".2f")]
                 for r in rows])
    return 0 if all(r["status"] == "completed" for r in rows) else 1
