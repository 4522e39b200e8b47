"""Hidden tests of ps5_measurement: the instructor's side only (never released; see docs/grading.md).

Messages say which case failed, never the expected answer.
"""

import math
import statistics

import torch
import torch.nn.functional as F

# the course's own interval, the one ps9_performance grades with
from labkit.grading.performance import median_ci as _reference_ci


def measure(median_ci, measure):
    generator = torch.Generator().manual_seed(5)
    for n, confidence in [(5, 0.95), (9, 0.9), (31, 0.99), (100, 0.95), (1000, 0.5)]:
        samples = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
        got = tuple(median_ci(samples, confidence))
        assert got == _reference_ci(samples, confidence), f"{n} samples at {confidence:.0%}"
    calls = []
    result = measure(lambda: calls.append(1), repeats=4, warmup=0)
    assert len(calls) == 4 and len(result["samples"]) == 4, "no warm-up, 4 repeats"
    assert (result["median"], result["low"], result["high"]) == _reference_ci(result["samples"], 0.95), (
        "measure's median and interval do not come from its samples")


def fool(speedups, time_to_accuracy, samples_per_second):
    for base, new in [([3.0], [1.0]), ([2.0, 9.0, 4.0], [1.0, 2.0, 1.5, 8.0])]:
        want = (statistics.median(base) / statistics.median(new), max(base) / min(new))
        assert all(math.isclose(a, b) for a, b in zip(speedups(base, new), want)), f"speedups of {base} over {new}"
    assert time_to_accuracy([(0.5, 0.95), (1.0, 0.2)], 0.9) == 0.5, "reached at the first point"
    assert time_to_accuracy([], 0.5) is None, "an empty curve"
    assert time_to_accuracy([(1, 0.4), (2, 0.6), (3, 0.5)], 0.6) == 2, "exactly the target"
    assert math.isclose(samples_per_second(32, 3, 0.25), 384.0), "throughput"


def gemm(gemm_flops, achieved_gflops, relative_error):
    assert gemm_flops(7, 1, 3) == 42 and gemm_flops(1, 1, 1) == 2, "GEMM FLOPs of other shapes"
    assert 0.01 < achieved_gflops(64, torch.float64, repeats=3) < 1e6, "float64 GEMM GFLOP/s"
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        a = torch.randn(48, 48, generator=generator, dtype=torch.float64)
        b = torch.randn(48, 48, generator=generator, dtype=torch.float64)
        exact = a @ b
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            want = float(torch.linalg.norm((a.to(dtype) @ b.to(dtype)).double() - exact) / torch.linalg.norm(exact))
            assert math.isclose(relative_error(48, dtype, seed), want, rel_tol=1e-6), f"{dtype}, seed {seed}"


def conv(naive_conv2d, library_speedup):
    generator = torch.Generator().manual_seed(9)
    for x_shape, w_shape in [((1, 2, 5, 6), (3, 2, 1, 1)), ((3, 1, 9, 7), (2, 1, 5, 3)), ((2, 4, 4, 4), (1, 4, 4, 4))]:
        x, w = torch.randn(x_shape, generator=generator), torch.randn(w_shape, generator=generator)
        got = naive_conv2d(x, w)
        assert got.shape == F.conv2d(x, w).shape and torch.allclose(got, F.conv2d(x, w), atol=1e-4), (
            f"input {x_shape}, kernel {w_shape}")
    x, w = torch.randn(1, 2, 10, 10, generator=generator), torch.randn(2, 2, 3, 3, generator=generator)
    assert library_speedup(x, w) > 1, "the library call should be faster than the naive loop"
