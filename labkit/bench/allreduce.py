"""``labkit bench allreduce``: allreduce algorithms side by side, in the manner of nccl-tests.

    labkit bench allreduce [-n 4] [--min-bytes 4K] [--max-bytes 64M] [--factor 4]
                           [--iters 20] [--rounds 7] [--backend gloo] [--fast-ring]
                           [--only NAME,...] [--json]

It starts N ranks on this machine twice. First on ``--backend`` (gloo): labkit's
hand-written ring, tree, recursive-doubling and parameter-server allreduces
(:mod:`labkit.comm.collectives`) and the library's ``comm.allreduce``
(torch.distributed). Then under mpiexec with the mpi backend: MPI_Allreduce (mpich).
For every algorithm and message size S (float32, sum):

- time: after a warm-up, ``--rounds`` rounds in which the algorithms take turns (the
  order rotates from round to round), each with the same number of back-to-back calls,
  up to ``--iters`` (fewer when calls are slow, so that the slowest algorithm's rounds
  take about a second); a
  round's time is its mean per call on the slowest rank, and the median round is
  reported. Taking turns within one launch means that a change in the machine's load
  falls on every algorithm alike, so the ratio to the library is fair even on a shared
  machine; the load average is printed beside the figures;
- vs library: busbw over the library's (``comm.allreduce`` of the same backend), the
  median over the rounds of the ratio within each round;
- algbw = S / time, and busbw = algbw * 2(N-1)/N, the bandwidth each rank's link
  sustains in an optimal (ring) allreduce: it can be compared across N and with a link's
  bandwidth (nccl-tests, doc/PERFORMANCE.md);
- model: the alpha-beta prediction of :mod:`labkit.comm.costmodel`, with alpha and beta
  fitted on a ping-pong (1 KB to 16 MB) between ranks 0 and 1 of the same launch, half
  duplex (on one machine the cores copy the bytes of both directions, so a rank's send
  and receive do not overlap);
- check: each algorithm's result is compared with the exact sum once per size.

The ceiling line is the bandwidth of one large ``torch`` ``copy_`` in this process:
whatever the ranks exchange on one machine is copied through memory at least once.

Run as ``python -m labkit.bench.allreduce OUT.json ...`` this module is one rank of the
benchmark (what the launches above start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from ..comm import collectives, init, mpiexec_path
from ..comm.costmodel import fit_alpha_beta, predict
from ..launch.base import free_port, kill_group, spawn

# name in the table -> (function of (comm, tensor), cost-model collective): the lessons of
# labkit.comm.collectives, and, on request (--fast-ring), the ring as the libraries run it
SHORT_NAMES = {"parameter_server": "ps"}
HAND_WRITTEN = {f"labkit-{SHORT_NAMES.get(name, name).replace('_', '-')}": (function, name)
                for name, function in collectives.ALLREDUCE_ALGORITHMS.items()}
FAST_RING = {"labkit-fast-ring": (collectives.fast_ring_allreduce, "ring")}
LIBRARY_NAMES = {"gloo": "torch.distributed", "mpi": "MPI_Allreduce"}
PROGRESS = "labkit-bench-progress"
MEASUREMENT_BUDGET_S = 1.0
ROUNDS = 7
PING_PONG_SIZES = [4**k for k in range(5, 13)]  # 1 KB to 16 MB, whatever sizes are benchmarked
COPY_BYTES = 256 * 2**20
LAUNCH_TIMEOUT_S = 900


def library_allreduce(comm, tensor):
    """The backend's own allreduce (torch.distributed's or MPI's)."""
    return comm.allreduce(tensor)


def algorithm(name: str):
    """(function, cost-model collective) of a row name."""
    if name in HAND_WRITTEN or name in FAST_RING:
        return {**HAND_WRITTEN, **FAST_RING}[name]
    return library_allreduce, "library"


# --- one rank ---------------------------------------------------------------------------
def slowest(comm, seconds: float) -> float:
    """The largest of every rank's ``seconds``."""
    value = torch.tensor([seconds], dtype=torch.float64)
    return float(comm.allreduce(value, op="max"))


def calls_per_round(comm, function, buffer: torch.Tensor, max_iters: int, rounds: int) -> int:
    """Warm up ``function`` and choose its calls per round, the same on every rank: up to
    ``max_iters``, fewer when one call is slow, so that its rounds take about
    ``MEASUREMENT_BUDGET_S`` in all."""
    function(comm, buffer)  # warm-up: first-touch of buffers, connections
    comm.barrier()
    start = time.perf_counter()
    function(comm, buffer)
    first = slowest(comm, time.perf_counter() - start)  # every rank gets the same value
    return max(1, min(max_iters, int(MEASUREMENT_BUDGET_S / rounds / first)))


def time_alternately(comm, functions: list, buffer: torch.Tensor, max_iters: int,
                     rounds: int = ROUNDS) -> list[tuple[float, int, list[float]]]:
    """(median seconds per call, calls per round, every round's seconds) of each function.

    In every round each function takes its turn, in an order that rotates from round to
    round; a round's time is the mean per call on the slowest rank.
    """
    # one count for all: a round's time includes the skew with which the ranks leave the
    # barrier, and fewer calls would carry more of it
    count = min(calls_per_round(comm, function, buffer, max_iters, rounds) for function in functions)
    iters = [count] * len(functions)
    seconds: list[list[float]] = [[] for _ in functions]
    for round_ in range(rounds):
        for k in range(len(functions)):
            index = (round_ + k) % len(functions)
            comm.barrier()
            start = time.perf_counter()
            for _ in range(iters[index]):
                functions[index](comm, buffer)
            seconds[index].append(slowest(comm, (time.perf_counter() - start) / iters[index]))
    return [(statistics.median(times), count, times) for times, count in zip(seconds, iters)]


def validate(comm, function, count: int) -> bool:
    """One call on rank-dependent whole numbers; True on every rank iff all got the exact sum."""
    pattern = (torch.arange(count, dtype=torch.int32) % 5).float()
    data = pattern + comm.rank
    function(comm, data)
    n = comm.size
    ok = torch.equal(data, pattern * n + n * (n - 1) / 2)
    flag = torch.tensor([1.0 if ok else 0.0])
    return bool(comm.allreduce(flag, op="min") == 1.0)


def rank_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.bench.allreduce")
    parser.add_argument("out", help="where rank 0 writes the results (JSON)")
    parser.add_argument("--sizes", required=True, help="comma-separated message sizes in bytes")
    parser.add_argument("--algorithms", required=True, help="comma-separated row names")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    names = args.algorithms.split(",")

    torch.set_num_threads(1)  # the ranks share the machine's cores
    comm = init()
    alpha, beta = fit_alpha_beta(comm, PING_PONG_SIZES)
    rows = []
    for size in sizes:
        buffer = torch.zeros(size // 4)
        timings = time_alternately(comm, [algorithm(name)[0] for name in names], buffer, args.iters, args.rounds)
        for name, (seconds, iters, rounds) in zip(names, timings):
            function, collective = algorithm(name)
            rows.append({"algorithm": name, "bytes": size, "time_us": seconds * 1e6,
                         "rounds_us": [t * 1e6 for t in rounds],
                         "model_us": predict(collective, size, comm.size, alpha, beta, full_duplex=False) * 1e6,
                         "iters": iters, "valid": validate(comm, function, size // 4)})
            if comm.rank == 0:
                print(PROGRESS, name, size, flush=True)
    if comm.rank == 0:
        with open(args.out, "w") as f:
            json.dump({"backend": comm.backend, "world_size": comm.size, "alpha_s": alpha,
                       "beta_s_per_byte": beta, "rows": rows}, f)
    comm.barrier()
    comm.close()
    return 0


# --- the benchmark -------------------------------------------------------------------------
class BenchError(RuntimeError):
    """A launch of the benchmark's ranks failed."""


def parse_bytes(text: str) -> int:
    """'4K' -> 4096, '64M' -> 67108864, '1G', or a plain number of bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 4K, 64M)") from None


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def size_range(smallest: int, largest: int, factor: int) -> list[int]:
    sizes, size = [], smallest
    while size <= largest:
        sizes.append(size)
        size *= factor
    return sizes


def copy_bandwidth(nbytes: int = COPY_BYTES, repeats: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``nbytes`` (the fastest of ``repeats``)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / min(times)


def run_ranks(n: int, backend: str, names: list[str], sizes: list[int], iters: int,
              progress, rounds: int = ROUNDS) -> dict:
    """Start the ranks (local processes for gloo, mpiexec for mpi); return rank 0's results."""
    workdir = tempfile.mkdtemp(prefix="labkit-bench-allreduce-")
    out = os.path.join(workdir, "results.json")
    command = [sys.executable, "-m", "labkit.bench.allreduce", out, "--sizes", ",".join(map(str, sizes)),
               "--algorithms", ",".join(names), "--iters", str(iters), "--rounds", str(rounds)]
    env = dict(os.environ, LABKIT_BACKEND=backend, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if backend == "mpi":
        logs = [os.path.join(workdir, "mpiexec.log")]
        procs = [spawn([mpiexec_path() or "mpiexec", "-n", str(n), *command], env, logs[0])]
    else:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(n))
        logs = [os.path.join(workdir, f"rank-{r}.log") for r in range(n)]
        procs = [spawn(command, dict(env, RANK=str(r), LOCAL_RANK=str(r)), logs[r]) for r in range(n)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    seen = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            with open(logs[0], errors="replace") as f:
                done = sum(line.startswith(PROGRESS) for line in f)
            if done > seen:
                progress.update(done - seen)
                seen = done
            failed = [c for c in codes if c not in (None, 0)]
            if failed or time.monotonic() > deadline:
                why = f"exit status {failed[0]}" if failed else f"no result after {LAUNCH_TIMEOUT_S} s"
                failed_log = next((log for log, c in zip(logs, codes) if c not in (None, 0)), logs[0])
                with open(failed_log, errors="replace") as f:
                    tail = "".join(f.readlines()[-15:])
                raise BenchError(f"{backend} ranks failed ({why}); logs in {workdir}:\n{tail}")
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p, grace=2.0)
    with open(out) as f:
        result = json.load(f)
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def add_bandwidths(row: dict, n: int) -> dict:
    seconds = row["time_us"] / 1e6
    algbw = row["bytes"] / seconds / 1e9
    return dict(row, algbw_gbps=algbw, busbw_gbps=algbw * 2 * (n - 1) / n,
                model_ratio=row["time_us"] / row["model_us"])


def add_library_ratios(rows: list[dict], backend: str) -> None:
    """``vs_library``: busbw over the busbw of ``backend``'s library allreduce at the same
    size (its time over this row's time), the median over the rounds, each round's ratio
    taken between turns of the same round; only on that backend's rows."""
    library = {row["bytes"]: row["rounds_us"] for row in rows if row["algorithm"] == LIBRARY_NAMES[backend]}
    for row in rows:
        if row["bytes"] in library:
            row["vs_library"] = statistics.median(lib / own for lib, own in zip(library[row["bytes"]], row["rounds_us"]))


def ratio(row: dict) -> str:
    return f"{row['vs_library']:.2f}x" if "vs_library" in row else "-"


def format_table(report: dict) -> str:
    n = report["world_size"]
    lines = [f"# labkit bench allreduce: {n} ranks on this machine ({os.cpu_count()} cores), "
             f"float32 sum",
             f"# memory-copy ceiling: {report['copy_gbps']:.2f} GB/s (torch copy_ of "
             f"{human_bytes(COPY_BYTES)})"]
    for launch in report["launches"]:
        lines.append(f"# {launch['backend']}: {', '.join(launch['names'])}; {launch['rounds']} rounds, "
                     f"the algorithms taking turns; load average {launch['loadavg_before'][0]:.2f} before, "
                     f"{launch['loadavg_after'][0]:.2f} after (1 min)")
        lines.append(f"# {launch['backend']}: alpha = {launch['alpha_s'] * 1e6:.1f} us, "
                     f"beta = {launch['beta_s_per_byte'] * 1e9:.3f} ns/B "
                     f"({1e-9 / launch['beta_s_per_byte']:.2f} GB/s), "
                     f"from a ping-pong between ranks 0 and 1; model: half duplex")
    header = (f"#{'size':>9} {'time(us)':>11} {'model(us)':>11} {'time/model':>10} "
              f"{'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'vs lib':>6} {'iters':>5}  check")
    names = list(dict.fromkeys(row["algorithm"] for row in report["rows"]))
    for name in names:
        rows = [row for row in report["rows"] if row["algorithm"] == name]
        lines += ["#", f"# {name} ({rows[0]['backend']}; model: {algorithm(name)[1]})", header]
        for row in rows:
            lines.append(f"{human_bytes(row['bytes']):>10} {row['time_us']:>11.1f} {row['model_us']:>11.1f} "
                         f"{row['model_ratio']:>10.2f} {row['algbw_gbps']:>11.3f} "
                         f"{row['busbw_gbps']:>11.3f} {ratio(row):>6} {row['iters']:>5}  "
                         f"{'ok' if row['valid'] else 'WRONG'}")
    largest = max(row["bytes"] for row in report["rows"])
    lines += ["#", f"# at {human_bytes(largest)}: busbw (median round), against the library of the same "
              "backend, and the model's error over all sizes (worst of time/model and model/time)"]
    for name in names:
        rows = [row for row in report["rows"] if row["algorithm"] == name]
        top = next(row for row in rows if row["bytes"] == largest)
        worst = max(max(row["model_ratio"], 1 / row["model_ratio"]) for row in rows)
        lines.append(f"#   {name:<27} busbw {top['busbw_gbps']:7.3f} GB/s  {ratio(top):>6} of the library   "
                     f"model within {worst:.2f}x")
    return "\n".join(lines)


def plan_launches(args, parser) -> list[tuple[str, list[str]]]:
    """(backend, row names) of each launch: the hand-written rows (``--fast-ring`` adds one,
    ``--only`` picks some) with the backend's library, then MPI_Allreduce under mpiexec."""
    names = [*HAND_WRITTEN, *(FAST_RING if args.fast_ring else ())]
    want_mpi = args.backend != "mpi"
    if args.only is not None:
        chosen = [name.strip() for name in args.only.split(",") if name.strip()]
        known = [*HAND_WRITTEN, *FAST_RING, *LIBRARY_NAMES.values()]
        unknown = [name for name in chosen if name not in known]
        if unknown or not chosen:
            what = f"unknown row {unknown[0]!r}" if unknown else "name at least one row"
            parser.error(f"--only: {what}; choose from {', '.join(known)}")
        names = [name for name in chosen if name in HAND_WRITTEN or name in FAST_RING]
        want_mpi = want_mpi and LIBRARY_NAMES["mpi"] in chosen
    launches = [(args.backend, [*names, LIBRARY_NAMES[args.backend]])]
    if want_mpi:
        if mpiexec_path():
            launches.append(("mpi", [LIBRARY_NAMES["mpi"]]))
        else:
            print("labkit: bench allreduce: no mpiexec found, MPI_Allreduce is left out", file=sys.stderr)
    return launches


def main(argv: list[str]) -> int:
    from tqdm import tqdm

    from ..cli import Parser

    parser = Parser(prog="labkit bench allreduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=4, help="number of ranks (default 4)")
    parser.add_argument("--min-bytes", type=parse_bytes, default="4K", help="smallest message (default 4K)")
    parser.add_argument("--max-bytes", type=parse_bytes, default="64M", help="largest message (default 64M)")
    parser.add_argument("--factor", type=int, default=4, help="ratio of successive sizes (default 4)")
    parser.add_argument("--iters", type=int, default=20,
                        help="timed calls per round, the same for every algorithm of a size; "
                             "fewer when calls are slow (default 20)")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"rounds in which the algorithms take turns; the median is reported (default {ROUNDS})")
    parser.add_argument("--backend", choices=["gloo", "mpi"], default="gloo",
                        help="backend of the hand-written algorithms (default gloo)")
    parser.add_argument("--fast-ring", action="store_true",
                        help="add labkit-fast-ring, the ring as gloo runs it (isend/irecv, pipelined segments)")
    parser.add_argument("--only", metavar="NAME,...",
                        help="only these rows (and the library's, the baseline): names from "
                             + ", ".join([*HAND_WRITTEN, *FAST_RING, *LIBRARY_NAMES.values()]))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("-n: an allreduce benchmark needs at least 2 ranks")
    if args.min_bytes < 4 or args.min_bytes % 4 or args.max_bytes < args.min_bytes:
        parser.error("--min-bytes must be a multiple of 4 (float32) and at most --max-bytes")
    if args.factor < 2 or args.iters < 1 or args.rounds < 1:
        parser.error("--factor must be >= 2, --iters and --rounds >= 1")
    sizes = [s for s in size_range(args.min_bytes, args.max_bytes, args.factor) if s % 4 == 0]

    launches = plan_launches(args, parser)

    report = {"world_size": args.n, "dtype": "float32", "copy_gbps": copy_bandwidth() / 1e9,
              "model": "alpha-beta, half duplex", "launches": [], "rows": []}
    total = len(sizes) * sum(len(names) for _, names in launches)
    with tqdm(total=total, desc="allreduce", unit="measurement", file=sys.stderr) as progress:
        for backend, names in launches:
            before = os.getloadavg()
            try:
                result = run_ranks(args.n, backend, names, sizes, args.iters, progress, args.rounds)
            except BenchError as e:
                print(f"labkit: bench allreduce: {e}", file=sys.stderr)
                return 1
            rows = [dict(add_bandwidths(row, args.n), backend=backend) for row in result["rows"]]
            add_library_ratios(rows, backend)
            report["launches"].append({**{key: result[key] for key in ("backend", "alpha_s", "beta_s_per_byte")},
                                       "names": names, "rounds": args.rounds, "loadavg_before": list(before),
                                       "loadavg_after": list(os.getloadavg())})
            report["rows"] += rows
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if all(row["valid"] for row in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]))
