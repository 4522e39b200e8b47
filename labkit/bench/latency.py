"""``labkit bench latency``: the ProxylessNAS latency table of this machine (batch 1, median).

    labkit bench latency                      # the digits supernet's candidates, on the CPU
    labkit bench latency --out table.json     # saved with the machine's description
    labkit bench latency --device cuda        # on a GPU, when there is one
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from ..cli import Parser
    from ..nas.latency import measure_table, save_table
    from ..nas.supernet import SuperNet

    parser = Parser(prog="labkit bench latency", description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="1,8,8", help="C,H,W of the network's input (default 1,8,8: digits)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=100, help="timings per entry (median)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
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
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device: cuda: no CUDA device is visible")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device: {args.device!r} is not cpu or cuda")
    net = SuperNet(shape, 10)
    table = measure_table(net, device=args.device, repeats=args.repeats, threads=args.threads)
    if args.out:
        save_table(table, args.out)
    if args.json:
        json.dump(table, sys.stdout, indent=1)
        print()
        return 0
    m = table["machine"]
    print(f"latency table: {m.get('gpu', m['cpu'])}, {args.device}, batch 1, {m['threads']} thread(s), "
          f"median of {args.repeats}")
    print(f"{'block input':>14} {'out':>4} {'s':>2}  " + " ".join(f"{op:>7}" for op in net.blocks[1].candidates))
    for (_cin, cout, stride), shape_in in zip(net.layout, net.block_inputs()):
        row = {e["op"]: e["ms"] for e in table["entries"]
               if tuple(e["input"]) == shape_in and e["out_channels"] == cout and e["stride"] == stride}
        cells = " ".join(f"{row[op]:7.3f}" if op in row else f"{'-':>7}" for op in net.blocks[1].candidates)
        print(f"{'x'.join(map(str, shape_in)):>14} {cout:>4} {stride:>2}  {cells}")
    print(f"fixed: stem {table['fixed']['stem']:.3f} ms, head {table['fixed']['head']:.3f} ms"
          + (f"; saved to {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
