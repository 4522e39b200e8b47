"""``labkit bench conv``: the convolution algorithms of the HPC keynote, measured.

For each layer shape: every algorithm of labkit.conv (Winograd as F(2x2,3x3) and F(4x4,3x3)),
with the table's work W and depth D, the multiplications the implementation performed
(counted), the workspace it allocated, its time (median of ``--repeats`` after a warm-up) and
that time as a ratio to ``torch.nn.functional.conv2d`` on the same tensors, measured in the
same run. float32, ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ..conv import conv2d, work_depth

# (name, x shape (N, C_in, H, W), weight shape (C_out, C_in, K, K), stride, padding)
LAYERS = {
    "lenet-conv2": ((32, 6, 8, 8), (16, 6, 3, 3), 1, 1),
    "mid-3x3": ((16, 32, 32, 32), (32, 32, 3, 3), 1, 1),
    "wide-5x5": ((8, 16, 32, 32), (32, 16, 5, 5), 1, 2),
    "big-image": ((4, 8, 64, 64), (16, 8, 3, 3), 1, 1),
}
VARIANTS = [("direct", 2), ("im2col", 2), ("fft", 2), ("winograd", 2), ("winograd", 4)]


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_layer(name, x_shape, w_shape, stride, padding, repeats, seed=0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=generator)
    w = torch.randn(*w_shape, generator=generator)
    reference = F.conv2d(x, w, stride=stride, padding=padding)
    torch_seconds = _median_seconds(lambda: F.conv2d(x, w, stride=stride, padding=padding), repeats)
    rows = []
    for algorithm, tile in VARIANTS:
        if algorithm == "winograd" and (w_shape[2] != 3 or stride != 1):
            continue
        stats = {}
        y = conv2d(x, w, stride, padding, algorithm, winograd_tile=tile, stats=stats)
        seconds = _median_seconds(lambda a=algorithm, t=tile: conv2d(x, w, stride, padding, a, winograd_tile=t), repeats)
        work, depth = work_depth(algorithm, x_shape, w_shape, stride, padding, winograd_tile=tile)
        rows.append({"algorithm": algorithm if algorithm != "winograd" else f"winograd F({tile}x{tile},3x3)",
                     "work": work, "depth": depth, "multiplications": stats["multiplications"],
                     "workspace_bytes": stats["workspace_bytes"], "seconds": seconds,
                     "ratio_to_torch": seconds / torch_seconds,
                     "max_relative_error": float((y - reference).abs().max() / reference.abs().max())})
    return {"layer": name, "x_shape": list(x_shape), "w_shape": list(w_shape), "stride": stride,
            "padding": padding, "torch_seconds": torch_seconds, "results": rows}


def format_table(report: dict) -> str:
    lines = [f"float32 convolution, median of {report['repeats']}, {report['threads']} torch thread(s); "
             "ratio = time / torch.nn.functional.conv2d's time in this run"]
    for layer in report["layers"]:
        lines.append("")
        lines.append(f"{layer['layer']}: x {tuple(layer['x_shape'])}, w {tuple(layer['w_shape'])}, stride "
                     f"{layer['stride']}, padding {layer['padding']}; torch {1e3 * layer['torch_seconds']:.3f} ms")
        lines.append(f"  {'algorithm':<23} {'work W':>12} {'depth D':>7} {'mults counted':>14} "
                     f"{'workspace KB':>12} {'time ms':>9} {'ratio':>7} {'rel. error':>10}")
        for r in layer["results"]:
            lines.append(f"  {r['algorithm']:<23} {r['work']:>12.3g} {r['depth']:>7} {r['multiplications']:>14,} "
                         f"{r['workspace_bytes'] / 1024:>12.1f} {1e3 * r['seconds']:>9.3f} {r['ratio_to_torch']:>7.2f} "
                         f"{r['max_relative_error']:>10.1e}")
    lines.append("")
    lines.append("work W and depth D: the table of 004.25 (FFT with c = 1; Winograd's W as printed there,\n"
                 "the transforms not multiplied by channels or tiles); mults counted: the products each\n"
                 "implementation issued (FFT: the pointwise complex products, 4 real each, FFTs not counted)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labkit bench conv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated, from {', '.join(LAYERS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per algorithm (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.layers.split(",") if n.strip()]
    for name in names:
        if name not in LAYERS:
            parser.error(f"--layers: unknown layer {name!r}; choose from {', '.join(LAYERS)}")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        layers = [measure_layer(name, *LAYERS[name], args.repeats) for name in names]
    finally:
        torch.set_num_threads(threads)
    report = {"repeats": args.repeats, "threads": args.threads, "layers": layers}
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
