"""``labkit bench microbatch``: µ-cuDNN's trade of workspace memory for speed, on this machine.

For each convolution of a small CNN (batch ``--batch``), every (algorithm, micro-batch size)
is timed (median of ``--repeats``) and its workspace recorded (the buffers labkit.conv
allocates for one micro-batch); then, for each workspace budget, the fastest choice that fits
is picked per layer (Oyama, Ben-Nun, Hoefler, Matsuoka, *µ-cuDNN*, Cluster 2018). The budget
column shows what a tighter memory limit costs in time.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..memory import ConvLayer, measure_choices, plan_microbatches


def layers(batch: int) -> list[ConvLayer]:
    return [ConvLayer("conv1", (batch, 3, 32, 32), (16, 3, 3, 3), 1, 1),
            ConvLayer("conv2", (batch, 16, 16, 16), (32, 16, 3, 3), 1, 1),
            ConvLayer("conv3", (batch, 32, 8, 8), (64, 32, 5, 5), 1, 2)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labkit bench microbatch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="mini-batch size (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per choice (default 3)")
    parser.add_argument("--budgets-kb", default="64,512,4096,65536",
                        help="workspace budgets in KB, comma-separated (default 64,512,4096,65536)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")
    try:
        budgets = [int(float(b) * 1024) for b in args.budgets_kb.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--budgets-kb: expected numbers, got {args.budgets_kb!r}")
    if not budgets or min(budgets) < 0:
        parser.error("--budgets-kb: give at least one budget >= 0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        choices = [c for layer in layers(args.batch) for c in measure_choices(layer, repeats=args.repeats)]
    finally:
        torch.set_num_threads(threads)
    plans = {budget: plan_microbatches(choices, budget) for budget in budgets}
    if args.json:
        print(json.dumps({"choices": [c.__dict__ for c in choices],
                          "plans": {str(b): {k: v.__dict__ for k, v in p.items()} for b, p in plans.items()}}, indent=2))
        return 0
    lines = [f"batch {args.batch}, float32, 1 thread, median of {args.repeats}",
             f"{'layer':<6} {'algorithm':<9} {'micro-batch':>11} {'workspace KB':>12} {'time ms':>9}"]
    for c in choices:
        lines.append(f"{c.layer:<6} {c.algorithm:<9} {c.micro_batch:>11} {c.workspace_bytes / 1024:>12.1f} {1e3 * c.seconds:>9.3f}")
    lines.append("")
    lines.append(f"{'budget KB':>9}  {'plan (layer: algorithm x micro-batch)':<60} {'time ms':>9}")
    for budget, plan in plans.items():
        names = [layer.name for layer in layers(args.batch)]
        if any(name not in plan for name in names):
            text, total = "no choice fits for " + ", ".join(n for n in names if n not in plan), float("nan")
        else:
            text = ", ".join(f"{n}: {plan[n].algorithm} x {plan[n].micro_batch}" for n in names)
            total = sum(plan[n].seconds for n in names)
        lines.append(f"{budget / 1024:>9.0f}  {text:<60} {1e3 * total:>9.3f}")
    print("\n".join(lines))
    return 0
