"""``labkit bench scaling``: strong and weak scaling, timed to a test accuracy, by the rules.

For each worker count N the same model trains on the same data, once per scaling kind:

- **strong scaling** keeps the global batch at ``--batch-size`` B: each of the N ranks
  takes B/N samples per step, so every run does the same work in the same steps;
- **weak scaling** keeps B samples per rank: the global batch grows to N·B.

(With one worker the two are the same run.) Every configuration runs ``--repeats`` times
with the same seed; the report gives medians with [min-max], and the load average
before each run. The times are **time to a stated test accuracy** (``--target-accuracy``
on the held-out test split), measured from the moment the run directory is created:
process start-up, imports and reading the dataset (I/O) are inside every time.
Evaluations happen every ``--eval-every`` steps, which sets the resolution.

Bytes: "counted" is labkit's own count (``bytes_sent`` in ``summary.json``, summed over
ranks); "on lo" is measured on the wire, the loopback interface's transmit counter
(``/proc/net/dev``, ``lo``) read just before and just after each run. It counts every
packet on ``lo``: TCP/IP headers, acknowledgements, the rendezvous store, and, on a
shared interface, anything else on the machine. To measure only this benchmark the
runs go in a private network namespace (``unshare --user --net``, where the system
allows it; ``--net``), where ``lo`` carries nothing else.

Runs are started only through the public API (``labkit.train(labkit.RunConfig(...))``)
and read back from their run directories (``summary.json``, ``metrics.jsonl``), which
are kept (``--out``). The report ends with Hoefler's twelve ways to fool the masses,
each with how this report avoids it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..options import positive_number, whole_number, whole_numbers

NETNS_ENV = "LABKIT_BENCH_NETNS"  # set inside the private network namespace
DEFAULTS = {"workers": "1,2,4", "repeats": 3, "target_accuracy": 0.95, "steps": 60, "batch_size": 64,
            "eval_every": 10}


# --- arguments: every bad value is one line, exit 2 -------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"labkit: error: bench scaling: {message}\n")


_worker_list = whole_numbers
_positive_int = whole_number()


def _accuracy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a test accuracy between 0 and 1, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"expected a test accuracy in (0, 1], got {text}")
    return value


_positive_float = positive_number


def _lr_list(text: str) -> list[float]:
    return [_positive_float(p.strip()) for p in text.split(",")]


def _scalings(text: str) -> list[str]:
    kinds = [p.strip() for p in text.split(",") if p.strip()]
    if not kinds or any(k not in ("strong", "weak") for k in kinds) or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"expected strong, weak or strong,weak, got {text!r}")
    return [k for k in ("strong", "weak") if k in kinds]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="labkit bench scaling", description=__doc__.split("\n\n")[0].strip("`: "))
    p.add_argument("--workers", type=_worker_list, default=_worker_list(DEFAULTS["workers"]),
                   help=f"worker counts to compare (default {DEFAULTS['workers']}; the smallest is the baseline)")
    p.add_argument("--repeats", type=_positive_int, default=DEFAULTS["repeats"],
                   help=f"runs per configuration, same seed (default {DEFAULTS['repeats']})")
    p.add_argument("--target-accuracy", type=_accuracy, default=DEFAULTS["target_accuracy"],
                   help=f"test accuracy the time is measured to (default {DEFAULTS['target_accuracy']})")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None,
                        help=f"optimizer steps per run (default {DEFAULTS['steps']})")
    length.add_argument("--epochs", type=_positive_int, default=None,
                        help="passes over the data per run instead (weak scaling then takes fewer steps)")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULTS["batch_size"],
                   help=f"strong: the global batch; weak: the batch of each rank (default {DEFAULTS['batch_size']})")
    p.add_argument("--scaling", type=_scalings, default=["strong", "weak"], help="strong, weak or strong,weak")
    p.add_argument("--eval-every", type=_positive_int, default=DEFAULTS["eval_every"],
                   help=f"evaluate on the test set every N steps (default {DEFAULTS['eval_every']})")
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--sync", default="allreduce")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate (default RunConfig's)")
    p.add_argument("--tune-lr", type=_lr_list, default=None, metavar="LR,LR,...",
                   help="first try these learning rates on the baseline and keep the fastest to the target "
                        "(these tuning runs are counted and listed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--net", choices=("auto", "private", "shared"), default="auto",
                   help="where bytes are measured: lo of a private network namespace, or the shared lo "
                        "(auto: private when the system allows it)")
    p.add_argument("--out", default=None, help="folder for the run directories (default: a new temporary folder)")
    p.add_argument("--json", action="store_true", help="JSON instead of the table")
    return p


# --- measuring the wire -----------------------------------------------------------------------
def lo_counters() -> tuple[int, int] | None:
    """(tx_bytes, tx_packets) of the loopback interface, or None where there is no /proc/net/dev."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    fields = rest.split()
                    return int(fields[8]), int(fields[9])
    except OSError:
        return None
    return None


def _private_net_available() -> str | None:
    """None when ``unshare --user --map-root-user --net`` works here, else why not."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return "no unshare command"
    try:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "--", "true"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if probe.returncode == 0 else (" ".join(probe.stderr.split()) or f"exit {probe.returncode}")


def _bring_lo_up() -> None:
    """Set the loopback interface of this (new) network namespace up (SIOCSIFFLAGS |= IFF_UP)."""
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


# --- one run ----------------------------------------------------------------------------------
def time_to_accuracy(evals: list[dict], target: float) -> tuple[float | None, float | None, int | None]:
    """(seconds, accuracy, step) of the first evaluation at or above ``target``; Nones if never."""
    for record in sorted(evals, key=lambda r: r.get("step", 0)):
        acc = record.get("accuracy")
        if acc is not None and acc >= target:
            return record["t"], acc, record["step"]
    return None, None, None


def run_once(config, target: float) -> dict:
    """Train ``config`` through the public API; measure lo around it; read the run directory."""
    import labkit

    load_before = os.getloadavg()[0]
    wire_before = lo_counters()
    start = time.perf_counter()
    result = labkit.train(config, progress=False)
    elapsed = time.perf_counter() - start
    wire_after = lo_counters()
    load_after = os.getloadavg()[0]
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    evals = [r for r in result.metrics("eval") if r.get("rank", 0) == 0]
    tta, acc_at, step_at = time_to_accuracy(evals, target)
    measured = packets = None
    if wire_before and wire_after:
        measured, packets = wire_after[0] - wire_before[0], wire_after[1] - wire_before[1]
    counted = summary.get("bytes_sent")
    return {
        "run_dir": str(result.run_dir), "status": summary.get("status"), "error": summary.get("error"),
        "time_to_accuracy_s": tta, "accuracy_at_target": acc_at, "step_at_target": step_at,
        "test_accuracy": summary.get("test_accuracy"), "test_loss": summary.get("test_loss"),
        "train_loss": summary.get("train_loss"), "steps": summary.get("steps"),
        "wall_time_s": summary.get("wall_time_s"), "end_to_end_s": elapsed,
        "samples_per_s": summary.get("samples_per_s"), "bytes_counted": counted,
        "bytes_measured": measured, "packets_measured": packets,
        "measured_vs_counted": (measured - counted) / counted if counted and measured is not None else None,
        "load_avg_1m_before": load_before, "load_avg_1m_after": load_after,
    }


def spread(values: list) -> dict | None:
    """median, min, max of the numbers in ``values`` (None where a run gave none)."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    if not numbers:
        return None
    return {"median": statistics.median(numbers), "min": min(numbers), "max": max(numbers), "n": len(numbers)}


# --- the plan -------------------------------------------------------------------------------------
def plan(args) -> list[dict]:
    """One entry per configuration: scaling kind, workers, batch per rank, and its RunConfig."""
    from ..config import RunConfig

    base = {"model": args.model, "dataset": args.dataset, "data_dir": args.data_dir, "sync": args.sync,
            "eval_every": args.eval_every, "seed": args.seed, "checkpoint_every": 0}
    if args.lr is not None:
        base["lr"] = args.lr
    if args.epochs is not None:
        base["epochs"] = args.epochs
    else:
        base["steps"] = args.steps or DEFAULTS["steps"]
    entries, seen = [], {}
    for kind in args.scaling:
        for n in args.workers:
            if kind == "strong" and args.batch_size % n:
                raise ValueError(f"--batch-size: strong scaling splits the global batch {args.batch_size} over "
                                 f"the workers, and {n} does not divide it")
            per_rank = args.batch_size // n if kind == "strong" else args.batch_size
            config = RunConfig(workers=n, batch_size=per_rank, **base)
            key = (n, per_rank)
            if key in seen:  # one worker: strong and weak are the same run
                seen[key]["scaling"].append(kind)
                continue
            seen[key] = {"scaling": [kind], "workers": n, "batch_per_rank": per_rank,
                         "global_batch": per_rank * n, "config": config}
            entries.append(seen[key])
    return entries


def tune_learning_rate(args, out: Path, progress) -> tuple[float | None, list[dict]]:
    """Try each ``--tune-lr`` on the baseline (fewest workers, strong batch); the fastest to the target wins."""
    from ..config import RunConfig

    n = args.workers[0]
    trials = []
    for i, lr in enumerate(args.tune_lr):
        config = RunConfig(workers=n, batch_size=args.batch_size // n if "strong" in args.scaling else args.batch_size,
                           model=args.model, dataset=args.dataset, data_dir=args.data_dir, sync=args.sync,
                           eval_every=args.eval_every, seed=args.seed, checkpoint_every=0, lr=lr,
                           **({"epochs": args.epochs} if args.epochs else {"steps": args.steps or DEFAULTS["steps"]}))
        progress(f"tuning run {i + 1}/{len(args.tune_lr)}: lr {lr:g} on {n} worker(s)")
        run = run_once(config.replace(run_dir=str(out / f"tune-lr{lr:g}")).validate(), args.target_accuracy)
        trials.append({"lr": lr, **run})
    reached = [t for t in trials if t["time_to_accuracy_s"] is not None]
    if reached:
        return min(reached, key=lambda t: t["time_to_accuracy_s"])["lr"], trials
    best = max(trials, key=lambda t: t["test_accuracy"] or 0)
    return best["lr"], trials


# --- the report -----------------------------------------------------------------------------------
def twelve_ways(report: dict) -> list[dict]:
    """Hoefler's twelve ways to fool the masses (topic 004.22), each with how this report avoids it."""
    s = report["settings"]
    target = s["target_accuracy"]
    length = f"{s['steps']} steps" if s.get("steps") else f"{s['epochs']} epochs"
    runs = report["runs"]
    tuned = (f"{runs['tuning']} tuning runs (learning rates {', '.join(map(str, s['tune_lr']))}; "
             f"lr {s['lr']:g} kept) are counted and listed" if runs["tuning"] else
             f"no tuning runs: lr {s['lr']:g}, momentum {s['momentum']:g} and the batch sizes are labkit's "
             f"defaults, not chosen for this report")
    kinds = set(s["scaling"])
    batch = []
    if "strong" in kinds:
        batch.append(f"strong scaling keeps the global batch at {s['batch_size']} (each of N ranks {s['batch_size']}/N)")
    if "weak" in kinds:
        batch.append(f"weak scaling keeps {s['batch_size']} per rank (global batch {s['batch_size']}·N)")
    ways = [
        ("Ignore accuracy when scaling up",
         f"the speedup is in time to test accuracy {target}, and every row gives the test accuracy reached"),
        ("Do not report test accuracy",
         f"every accuracy is on the held-out test split of {s['dataset']} ({s['test_samples']} samples never "
         f"trained on), not training accuracy"),
        ("Do not report all training runs needed to tune hyperparameters",
         f"{runs['total']} training runs in all: {runs['measured']} measured, {runs['determinism']} for the "
         f"determinism check, {runs['tuning']} tuning; {tuned}; every run directory is kept under {report['out']}"),
        ("Compare outdated hardware with special-purpose hardware",
         f"every configuration ran on this one machine ({s['cpu']}, {s['cpus']} CPUs) in this invocation; "
         f"the baseline is measured here, not quoted"),
        ("Show only kernels/subsets when scaling",
         "each time is a whole training run (start-up, data, training, evaluation), not a communication "
         "kernel or a layer in isolation"),
        ("Do not consider I/O",
         "the clock starts when the run directory is created, before the ranks start: process start-up, "
         "imports and reading the dataset are inside every time"),
        ("Report highest ops numbers",
         "no op/s or flop/s anywhere; throughput (samples/s) is shown only beside time to accuracy"),
        ("Show performance with option set A and accuracy with option set B",
         "the time and the accuracy in a row come from the same runs, with the same settings"),
        ("Train on (unreasonably) large inputs",
         f"the inputs keep the dataset's own size ({s['input_shape']} for {s['dataset']}), not enlarged "
         f"to make more work per sample"),
        ("Run training just for the right time",
         f"every run trains a fixed {length} and is timed to a target accuracy, never for a fixed wall time"),
        ("Minibatch sizing for fun and profit: weak vs. strong scaling",
         "; ".join(batch) + "; each row names its kind and both batch sizes"),
        ("Select carefully how to compare to the state of the art",
         f"the comparison is with the {s['workers'][0]}-worker run of the same code and settings, measured "
         f"here; time and accuracy are both given for every row"),
    ]
    return [{"number": i + 1, "way": way, "how_avoided": how} for i, (way, how) in enumerate(ways)]


def _fmt(value, spec=".2f", missing="-") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else missing


def _fmt_spread(sp: dict | None, spec: str, missing="not reached") -> str:
    if sp is None:
        return missing
    if sp["n"] == 1 or sp["min"] == sp["max"]:
        return format(sp["median"], spec)
    return f"{format(sp['median'], spec)} [{format(sp['min'], spec)}–{format(sp['max'], spec)}]"


def _fmt_percent(sp: dict | None) -> str:
    if sp is None:
        return "-"
    median, low, high = (format(sp[k] * 100, "+.1f") + "%" for k in ("median", "min", "max"))
    return median if sp["n"] == 1 or low == high else f"{median} [{low}–{high}]"


def _fmt_bytes(value) -> str:
    return "-" if value is None else f"{value / 1e6:.2f} MB"


def print_report(report: dict, out=sys.stdout) -> None:
    s = report["settings"]
    length = f"{s['steps']} steps" if s.get("steps") else f"{s['epochs']} epochs"
    w = report["wire"]
    load = report["load_avg_1m"]
    print(f"labkit bench scaling: {s['model']} on {s['dataset']}, sync {s['sync']}, gloo, local launcher, {length}, "
          f"eval every {s['eval_every']} steps, target test accuracy {s['target_accuracy']}", file=out)
    threads = (f"OMP_NUM_THREADS={s['omp_num_threads']}" if s.get("omp_num_threads")
               else "threads per rank: cores / workers")
    print(f"machine: {s['cpu']}, {s['cpus']} CPUs, {threads}; load average (1 min) before the runs: median "
          f"{_fmt(load['median'])} [{_fmt(load['min'])}–{_fmt(load['max'])}]", file=out)
    print(f"{s['repeats']} run(s) per configuration, seed {s['seed']}; median [min–max]; time = seconds from "
          f"creating the run directory (start-up and data loading included)", file=out)
    print(f"bytes on the wire: {w['method']}", file=out)
    header = ["scaling", "workers", "batch/rank", "global batch", "steps", f"time to {s['target_accuracy']} (s)",
              "test acc then", "final test acc", "speedup", "efficiency", "samples/s", "counted",
              "on lo", "lo vs counted", "load 1m"]
    rows = []
    for r in report["rows"]:
        rows.append([r["scaling"], str(r["workers"]), str(r["batch_per_rank"]), str(r["global_batch"]),
                     _fmt(r["steps"], "d"), _fmt_spread(r["time_to_accuracy_s"], ".2f") + (
                         f" ({r['reached']}/{r['repeats']} reached)" if 0 < r["reached"] < r["repeats"] else ""),
                     _fmt_spread(r["accuracy_at_target"], ".3f", "-"), _fmt_spread(r["test_accuracy"], ".4f", "-"),
                     _fmt(r["speedup"]), _fmt(r["efficiency"]), _fmt_spread(r["samples_per_s"], ".0f", "-"),
                     _fmt_bytes(r["bytes_counted"]["median"] if r["bytes_counted"] else None),
                     _fmt_bytes(r["bytes_measured"]["median"] if r["bytes_measured"] else None),
                     _fmt_percent(r["measured_vs_counted"]),
                     _fmt(r["load_avg_1m"]["median"] if r["load_avg_1m"] else None)])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(wd) for h, wd in zip(header, widths)), file=out)
    print("  ".join("-" * wd for wd in widths), file=out)
    for row in rows:
        print("  ".join(c.ljust(wd) for c, wd in zip(row, widths)), file=out)
    print("speedup = median time to accuracy of the baseline / of the row (same scaling kind); "
          "efficiency = speedup / (workers / baseline workers)", file=out)
    agreement = report["bytes_agreement"]
    if agreement["runs"]:
        print(f"bytes: counted (summary bytes_sent, all ranks) vs on lo, over {agreement['runs']} multi-worker runs: "
              f"{agreement['min'] * 100:+.1f}% to {agreement['max'] * 100:+.1f}%; within 10%: "
              f"{'yes' if agreement['within_10_percent'] else 'NO'}", file=out)
    d = report["determinism"]
    print(f"determinism: same seed, same final test accuracy and loss in every repeat of a configuration: "
          f"{'yes' if d['same_result'] else 'NO'} ({d['how']})", file=out)
    runs = report["runs"]
    print(f"training runs: {runs['total']} in all = {runs['measured']} measured + {runs['determinism']} for "
          f"determinism + {runs['tuning']} tuning; run directories in {report['out']}", file=out)
    if report["failed"]:
        for f in report["failed"]:
            print(f"FAILED: {f['run_dir']}: {f['error']}", file=out)
    print("", file=out)
    print("Twelve ways to fool the masses (Hoefler, 2018), and how this report avoids each:", file=out)
    for item in report["checklist"]:
        print(f"[x] {item['number']:2d}. {item['way']}: {item['how_avoided']}.", file=out)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def measure(args, out: Path, wire_method: str, progress) -> dict:
    entries = plan(args)
    lr_tuned, tuning = (None, [])
    if args.tune_lr:
        lr_tuned, tuning = tune_learning_rate(args, out, progress)
        for e in entries:
            e["config"] = e["config"].replace(lr=lr_tuned)
    total, determinism_runs = _run_entries(args, entries, out, progress)
    all_runs = [r for e in entries for r in e["runs"]] + [e["determinism_run"] for e in entries
                                                          if "determinism_run" in e]
    checks = _determinism_checks(entries)
    how = (f"{len(checks)} configuration(s) run {checks[0]['runs']} times each with seed {args.seed}" if checks
           else "not checked")
    ratios = [r["measured_vs_counted"] for r in all_runs if r["measured_vs_counted"] is not None]
    loads = [r["load_avg_1m_before"] for r in all_runs]
    return {
        "benchmark": "scaling",
        "settings": _settings(args, entries[0]["config"]),
        "wire": {"method": wire_method, "private_namespace": os.environ.get(NETNS_ENV) == "1"},
        "load_avg_1m": spread(loads) or {"median": None, "min": None, "max": None, "n": 0},
        "rows": [row for kind in args.scaling for row in _rows(kind, entries)],
        "bytes_agreement": {"runs": len(ratios), "min": min(ratios, default=None), "max": max(ratios, default=None),
                            "within_10_percent": bool(ratios) and all(abs(x) <= 0.10 for x in ratios)},
        "determinism": {"same_result": bool(checks) and all(c["same"] for c in checks), "how": how,
                        "checks": checks},
        "tuning": tuning,
        "runs": {"measured": total, "determinism": determinism_runs, "tuning": len(tuning),
                 "total": total + determinism_runs + len(tuning)},
        "failed": [{"run_dir": r["run_dir"], "error": r["error"]} for r in all_runs + tuning
                   if r["status"] != "completed"],
        "out": str(out),
    }


def _run_entries(args, entries: list[dict], out: Path, progress) -> tuple[int, int]:
    """Run every planned configuration ``--repeats`` times (``e["runs"]``), and the largest
    once more with the same seed when there are no repeats (``e["determinism_run"]``).
    Returns (measured runs, determinism runs)."""
    total = len(entries) * args.repeats
    done = 0
    for e in entries:
        e["runs"] = []
        label = "/".join(e["scaling"])
        for k in range(args.repeats):
            done += 1
            name = f"{'+'.join(e['scaling'])}-w{e['workers']}-b{e['batch_per_rank']}-r{k + 1}"
            progress(f"run {done}/{total}: {label} scaling, {e['workers']} worker(s), batch {e['batch_per_rank']} "
                     f"per rank, repeat {k + 1}")
            e["runs"].append(run_once(e["config"].replace(run_dir=str(out / name)), args.target_accuracy))
    if args.repeats > 1:
        return total, 0
    e = max(entries, key=lambda x: x["workers"])  # the determinism check needs a second run, same seed
    progress(f"determinism run: {'/'.join(e['scaling'])} scaling, {e['workers']} worker(s), same seed again")
    e["determinism_run"] = run_once(e["config"].replace(run_dir=str(out / "determinism")), args.target_accuracy)
    return total, 1


def _rows(kind: str, entries: list[dict]) -> list[dict]:
    """One row per worker count of one scaling kind (one-worker runs serve both kinds)."""
    rows = []
    kind_entries = [e for e in entries if kind in e["scaling"]]
    base_tta, base_workers = None, kind_entries[0]["workers"]
    for e in kind_entries:
        runs = e["runs"]
        tta = spread([r["time_to_accuracy_s"] for r in runs])
        row = {"scaling": kind, "workers": e["workers"], "batch_per_rank": e["batch_per_rank"],
               "global_batch": e["global_batch"], "steps": runs[0]["steps"], "repeats": len(runs),
               "reached": sum(r["time_to_accuracy_s"] is not None for r in runs),
               "time_to_accuracy_s": tta}
        for key in ("accuracy_at_target", "test_accuracy", "test_loss", "end_to_end_s", "samples_per_s",
                    "bytes_counted", "bytes_measured", "measured_vs_counted"):
            row[key] = spread([r[key] for r in runs])
        row["load_avg_1m"] = spread([r["load_avg_1m_before"] for r in runs])
        row["runs"] = runs
        full = tta is not None and row["reached"] == row["repeats"]
        if e is kind_entries[0] and full:
            base_tta = tta["median"]
        row["speedup"] = base_tta / tta["median"] if base_tta and full else None
        row["efficiency"] = row["speedup"] / (e["workers"] / base_workers) if row["speedup"] else None
        rows.append(row)
    return rows


def _determinism_checks(entries: list[dict]) -> list[dict]:
    """Every repeat of a configuration must end with the same test accuracy and losses."""
    checks = []
    for e in entries:
        group = e["runs"] + ([e["determinism_run"]] if "determinism_run" in e else [])
        if len(group) > 1:
            finals = {(r["test_accuracy"], r["test_loss"], r["train_loss"]) for r in group}
            checks.append({"scaling": "/".join(e["scaling"]), "workers": e["workers"], "runs": len(group),
                           "same": len(finals) == 1,
                           "final": [{"test_accuracy": r["test_accuracy"], "test_loss": r["test_loss"],
                                      "train_loss": r["train_loss"]} for r in group]})
    return checks


def _settings(args, config0) -> dict:
    """What was measured, on what: the table's header."""
    from ..data import load_dataset, train_size

    data = load_dataset(args.dataset, args.data_dir)
    return {"model": args.model, "dataset": args.dataset, "sync": args.sync, "workers": args.workers,
            "scaling": args.scaling, "repeats": args.repeats, "target_accuracy": args.target_accuracy,
            "steps": None if args.epochs else (args.steps or DEFAULTS["steps"]), "epochs": args.epochs,
            "batch_size": args.batch_size, "eval_every": args.eval_every, "seed": args.seed,
            "lr": config0.lr, "momentum": config0.momentum, "tune_lr": args.tune_lr,
            "train_samples": train_size(args.dataset, args.data_dir), "test_samples": len(data.y_test),
            "input_shape": "x".join(map(str, data.input_shape)), "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu": _cpu_name()}


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_dir is not None:
        args.data_dir = str(Path(args.data_dir).resolve())
    if args.tune_lr and "strong" in args.scaling and args.batch_size % args.workers[0]:
        parser.error(f"--batch-size: {args.workers[0]} workers do not divide {args.batch_size}")
    try:  # every configuration is checked before anything runs
        for e in plan(args):
            e["config"].validate()
    except ValueError as e:  # a ConfigError, or a batch that strong scaling cannot split
        parser.error(str(e))

    inside = os.environ.get(NETNS_ENV) == "1"
    if not inside and args.net != "shared":
        why_not = _private_net_available()
        if why_not is None:
            env = {**os.environ, NETNS_ENV: "1"}
            cmd = ["unshare", "--user", "--map-root-user", "--net", "--",
                   sys.executable, "-m", "labkit.bench.scaling", *argv]
            return subprocess.run(cmd, env=env).returncode
        if args.net == "private":
            parser.error(f"--net private: cannot make a private network namespace here ({why_not})")
        wire_method = (f"tx_bytes of lo in /proc/net/dev, read just before and after each run, on the SHARED "
                       f"lo (a private namespace is not available: {why_not}); includes TCP/IP headers, "
                       f"acknowledgements, the rendezvous store and any other traffic on this machine's lo")
    elif inside:
        try:
            _bring_lo_up()
        except OSError as e:
            print(f"labkit: error: bench scaling: cannot bring up lo in the private network namespace ({e})",
                  file=sys.stderr)
            return 2
        wire_method = ("tx_bytes of lo in /proc/net/dev, read just before and after each run, in a private "
                       "network namespace (only this benchmark's traffic); includes TCP/IP headers, "
                       "acknowledgements and the rendezvous store")
    else:
        wire_method = ("tx_bytes of lo in /proc/net/dev, read just before and after each run, on the SHARED lo; "
                       "includes TCP/IP headers, acknowledgements, the rendezvous store and any other traffic "
                       "on this machine's lo")

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="labkit-bench-scaling-"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out: cannot create {out} ({e.strerror or e})")
    if any(out.iterdir()):
        parser.error(f"--out: {out} is not empty; give a new folder")

    def progress(text: str) -> None:
        print(f"labkit bench scaling: {text}", file=sys.stderr, flush=True)

    report = measure(args, out, wire_method, progress)
    report["checklist"] = twelve_ways(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if not report["failed"] and report["determinism"]["same_result"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
