"""``labkit bench latency``: the ProxylessNAS latency table of this machine (batch 1, median).

    labkit bench latency                      # the digits supernet's candidates, on the CPU
    labkit bench latency --out table.json     # saved with the machine's description
    labkit bench latency --device cuda        # on a GPU, when there is one
    labkit bench latency --check 8            # then 8 random networks: predicted against measured

The table's entries time each block as the derived network runs it, with the threads the
network is timed with; the network overhead (``fixed.overhead``) is fitted on
``--fit-networks`` random networks timed in the same rounds. ``--check N`` then draws N
other networks and times each whole (median of ``--repeats``, the N timed round robin right
after the table) beside the table's prediction: the figure of "predicted within 25 % of
measured", with the load average of the machine beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys


def main(argv: list[str]) -> int:
    from ..cli import Parser
    from ..nas.latency import check_predictions, measure_table, save_table
    from ..nas.supernet import SuperNet

    parser = Parser(prog="labkit bench latency", description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="1,8,8", help="C,H,W of the network's input (default 1,8,8: digits)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=100, help="timings per entry (median)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--clock", default="wall", choices=("wall", "thread"),
                        help="wall: latency; thread: this thread's CPU time (1 CPU thread: what the machine "
                             "would give if idle)")
    parser.add_argument("--fit-networks", type=int, default=4, help="random networks the overhead is fitted on")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="then time N other random networks against the table's prediction")
    parser.add_argument("--out", help="save the table (JSON) here")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.input.split(","))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        parser.error(f"--input: expected C,H,W (three positive whole numbers), got {args.input!r}")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    if args.fit_networks < 1 or args.check < 0:
        parser.error("--fit-networks must be >= 1 and --check >= 0")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device: cuda: no CUDA device is visible")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device: {args.device!r} is not cpu or cuda")
    if args.clock == "thread" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock: thread times one CPU thread: use it with --device cpu --threads 1")
    net = SuperNet(shape, 10)
    table = measure_table(net, device=args.device, repeats=args.repeats, threads=args.threads,
                          fit_networks=args.fit_networks, clock=args.clock)
    if args.out:
        save_table(table, args.out)
    checks = check_predictions(table, net, args.check, device=args.device, repeats=args.repeats,
                               threads=args.threads, clock=args.clock) if args.check else []
    load = os.getloadavg()
    if args.json:
        json.dump({**table, "check": checks, "load_average": load} if args.check else table, sys.stdout, indent=1)
        print()
        return 0
    print_table(table, net, args)
    if checks:
        print_checks(checks, load)
    return 0


def print_table(table: dict, net, args) -> None:
    m = table["machine"]
    print(f"latency table: {m.get('gpu', m['cpu'])}, {args.device}, batch 1, {m['threads']} thread(s), "
          f"median of {args.repeats}, {args.clock} clock")
    print(f"{'block input':>14} {'out':>4} {'s':>2}  " + " ".join(f"{op:>7}" for op in net.blocks[1].candidates))
    for (_cin, cout, stride), shape_in in zip(net.layout, net.block_inputs()):
        row = {e["op"]: e["ms"] for e in table["entries"]
               if tuple(e["input"]) == shape_in and e["out_channels"] == cout and e["stride"] == stride}
        cells = " ".join(f"{row[op]:7.3f}" if op in row else f"{'-':>7}" for op in net.blocks[1].candidates)
        print(f"{'x'.join(map(str, shape_in)):>14} {cout:>4} {stride:>2}  {cells}")
    fixed = table["fixed"]
    print(f"fixed: stem {fixed['stem']:.3f} ms, head {fixed['head']:.3f} ms, network overhead "
          f"{fixed['overhead']:.3f} ms (median over {args.fit_networks} random networks)"
          + (f"; saved to {args.out}" if args.out else ""))


def print_checks(checks: list[dict], load) -> None:
    print(f"\n{'network':<28} {'predicted ms':>12} {'measured ms':>12} {'error':>6}")
    for c in checks:
        print(f"{' '.join(c['architecture']):<28} {c['predicted_ms']:12.3f} {c['measured_ms']:12.3f} "
              f"{100 * c['error']:5.0f}%")
    errors = sorted(c["error"] for c in checks)
    within = sum(e <= 0.25 for e in errors)
    print(f"within 25 %: {within} of {len(checks)}; median error {100 * statistics.median(errors):.0f} %, "
          f"largest {100 * errors[-1]:.0f} % (load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
          f"{os.cpu_count()} cores)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
