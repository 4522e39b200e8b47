"""``labkit bench compress``: speed, compression ratio and error of every compressor.

The input is a real gradient: the flattened gradient of a small CNN (LeNet from the
model zoo) on one random batch of 8x8 images, tiled to ``--size-mb`` megabytes of
float32 and laid out as a matrix of 1024 columns, so that PowerSGD has a matrix to
factor (the other compressors do not look at the shape). For each compressor:

- throughput: GB/s of input through compress + decompress (median of ``--repeats``
  after one warm-up), without and with error feedback;
- ratio: input bytes / ``packet.nbytes`` (header included); bits per value;
- relative error ||x_hat - x|| / ||x|| of one round trip without error feedback.

DGC runs without its sparsity warm-up, so that it is measured at its final density.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ..compress import available_compressors, make_compressor
from ..models import build_model

COLUMNS = 1024


def sample_gradient(size_mb: float, seed: int = 0) -> torch.Tensor:
    """A real gradient, tiled to ``size_mb`` MB of float32, as a (rows, 1024) matrix."""
    model = build_model("lenet", (1, 8, 8), 10, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(256, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (256,), generator=generator)
    F.cross_entropy(model(images), labels).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    rows = max(1, round(size_mb * 2**20 / 4 / COLUMNS))
    copies = -(-rows * COLUMNS // gradient.numel())
    return gradient.repeat(copies)[:rows * COLUMNS].view(rows, COLUMNS)


def build(name: str, error_feedback: bool):
    params = {"warmup_steps": 0} if name == "dgc" else {}
    return make_compressor(name, error_feedback=error_feedback, **params)


def round_trip_seconds(compressor, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of compress + decompress, after one warm-up."""
    compressor.decompress(compressor.compress(x, key="bench"))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compressor.decompress(compressor.compress(x, key="bench"))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, x: torch.Tensor, repeats: int) -> dict:
    input_bytes = x.numel() * x.element_size()
    compressor = build(name, error_feedback=False)
    packet = compressor.compress(x, key="error")
    error = torch.linalg.vector_norm(compressor.decompress(packet) - x) / torch.linalg.vector_norm(x)
    seconds = round_trip_seconds(compressor, x, repeats)
    seconds_ef = round_trip_seconds(build(name, error_feedback=True), x, repeats)
    return {
        "compressor": name,
        "packet_bytes": packet.nbytes,
        "ratio": input_bytes / packet.nbytes,
        "bits_per_value": 8 * packet.nbytes / x.numel(),
        "relative_error": float(error),
        "gbps": input_bytes / seconds / 1e9,
        "gbps_error_feedback": input_bytes / seconds_ef / 1e9,
    }


def format_table(report: dict) -> str:
    lines = [f"compress + decompress of {report['input_bytes'] / 2**20:.1f} MB of float32 gradient "
             f"({report['rows']} x {COLUMNS}), median of {report['repeats']}, "
             f"{report['threads']} torch threads",
             f"{'compressor':<11} {'GB/s':>7} {'GB/s EF':>8} {'ratio':>9} {'bits/value':>11} {'rel. error':>11}"]
    for r in report["results"]:
        lines.append(f"{r['compressor']:<11} {r['gbps']:>7.2f} {r['gbps_error_feedback']:>8.2f} "
                     f"{r['ratio']:>9.1f} {r['bits_per_value']:>11.3f} {r['relative_error']:>11.4f}")
    lines.append("GB/s EF: with error feedback (compress x + residual, keep the new residual)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labkit bench compress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=16.0, help="gradient size in MB of float32 (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed round trips per compressor (default 5)")
    parser.add_argument("--compressors", default=",".join(available_compressors()),
                        help="comma-separated names (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.compressors.split(",") if name.strip()]
    for name in names:
        if name not in available_compressors():
            parser.error(f"--compressors: unknown compressor {name!r}; choose from {', '.join(available_compressors())}")
    if args.size_mb <= 0 or args.repeats < 1:
        parser.error("--size-mb must be > 0 and --repeats >= 1")

    x = sample_gradient(args.size_mb)
    report = {"input_bytes": x.numel() * x.element_size(), "rows": x.shape[0], "repeats": args.repeats,
              "threads": torch.get_num_threads(), "results": [measure(name, x, args.repeats) for name in names]}
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
