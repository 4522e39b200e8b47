"""``labkit bench lns``: the table of "Deep Learning and Hardware" (seed 001) reproduced.

A small MLP (input, ``--hidden`` ReLU units, classes) is trained by SGD four times from the same
initial weights and batches: in float32 (normal), with every matmul in the logarithmic number
system (LNS matmul), with weights, updates and accumulations in LNS too (LNS everywhere), and
the same with Kahan-compensated weight updates (LNS everywhere + Kahan). The table gives the
validation error of each, beside the document's MNIST numbers. Digits by default; MNIST with
``--dataset mnist --data-dir DIR``. See labkit/precision/training.py for what each row does.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..data import DataError, load_dataset
from ..precision.lns import MAX_FRAC_BITS, LNSFormat
from ..precision.training import DOCUMENT_TABLE, MODES, train_mlp

LABELS = {"normal": "normal DNN", "lns_matmul": "matrix multiply with LNS",
          "lns_everywhere": "LNS everywhere", "lns_everywhere_kahan": "LNS everywhere with Kahan sum"}


def _subset(data, limit: int | None):
    if limit is None or limit >= len(data.y_train):
        return data
    data.x_train, data.y_train = data.x_train[:limit], data.y_train[:limit]
    return data


def format_table(report: dict) -> str:
    s = report["settings"]
    lines = [f"{report['dataset']}: MLP {s['inputs']}-{s['hidden']}-{s['classes']}, {s['epochs']} epochs, "
             f"batch {s['batch_size']}, SGD lr {s['lr']} -> {s['final_lr']}; LNS with {s['frac_bits']} fraction "
             f"bits (steps of {100 * LNSFormat(s['frac_bits']).relative_spacing:.1f} %), G by table; "
             f"{report['test_samples']} validation samples (one error = {100 / report['test_samples']:.2f} %)",
             f"{'':<31} {'validation error':>16} {'document (MNIST)':>17} {'final train loss':>17} {'time s':>7}"]
    for mode in MODES:
        r = report["runs"][mode]
        lines.append(f"{LABELS[mode]:<31} {100 * r['validation_error']:>15.2f}% {100 * DOCUMENT_TABLE[mode]:>16.2f}% "
                     f"{r['final_train_loss']:>17.4f} {r['seconds']:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labkit bench lns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist"), help="default digits")
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST files (for --dataset mnist)")
    parser.add_argument("--frac-bits", type=int, default=4, help=f"LNS fraction bits, 1..{MAX_FRAC_BITS} (default 4)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    parser.add_argument("--lr", type=float, default=0.2, help="first learning rate (default 0.2)")
    parser.add_argument("--final-lr", type=float, default=0.02, help="last learning rate, linear decay (default 0.02)")
    parser.add_argument("--train-samples", type=int, default=None, help="train on the first N samples only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object: mode -> validation error")
    args = parser.parse_args(argv)
    if not 1 <= args.frac_bits <= MAX_FRAC_BITS:
        parser.error(f"--frac-bits must be in 1..{MAX_FRAC_BITS}, got {args.frac_bits}")
    for name in ("hidden", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.final_lr <= args.lr:
        parser.error("--lr must be > 0 and --final-lr in (0, lr]")
    if args.train_samples is not None and args.train_samples < args.batch_size:
        parser.error("--train-samples must be at least --batch-size")
    if args.dataset == "mnist" and not args.data_dir:
        parser.error("--data-dir: --dataset mnist needs the folder with the MNIST files")
    try:
        data = _subset(load_dataset(args.dataset, args.data_dir), args.train_samples)
    except DataError as error:
        parser.error(f"--data-dir: {error}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP: one thread is fastest and leaves the other core free
    try:
        fmt = LNSFormat(frac_bits=args.frac_bits)
        settings = dict(hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        final_lr=args.final_lr, seed=args.seed)
        runs = {mode: train_mlp(data, mode, fmt, **settings) for mode in MODES}
    finally:
        torch.set_num_threads(threads)
    if args.json:
        print(json.dumps({mode: runs[mode].validation_error for mode in MODES}))
        return 0
    report = {
        "dataset": args.dataset, "test_samples": len(data.y_test),
        "settings": dict(settings, frac_bits=args.frac_bits, inputs=data.x_train[0].numel(), classes=data.num_classes),
        "runs": {mode: {"validation_error": r.validation_error, "final_train_loss": r.epoch_losses[-1],
                        "seconds": r.seconds} for mode, r in runs.items()},
    }
    print(format_table(report))
    return 0
