"""Hidden tests of ps9_performance: the instructor's side only (never released; see docs/grading.md).

The runs are read, never run (labkit.grading.performance). The target and tolerance here are the ones
that grade; the notebook states the same. Messages say what failed, never the expected answer.
"""

import math
import statistics
from pathlib import Path

from labkit.grading.performance import strong_scaling

TARGET = 0.7
TOLERANCE = 0.15
WORKERS = 2
REQUIRED = {"dataset": "digits", "model": "mlp", "parallelism": "data", "sync": "allreduce", "compression": "none"}
# Runs of the same problem train the same model: strong scaling changes who computes, not what.
ACCURACY_SPREAD = 0.05


def efficiency(strong_scaling_efficiency):
    cases = [
        ([4.0, 4.2, 3.9, 30.0], [1.1, 1.0, 1.2], 4),  # an outlier in the baseline
        ([1.0], [0.6, 0.5, 9.0, 0.55, 0.7], 2),  # lists of different lengths
        ([3.0, 3.0], [3.0, 3.0], 8),  # no speedup at all
        ([10.0, 12.0, 11.0], [1.25, 1.5], 8),
    ]
    for one, many, workers in cases:
        want = statistics.median(one) / (workers * statistics.median(many))
        got = strong_scaling_efficiency(list(one), list(many), workers)
        assert math.isclose(got, want, rel_tol=1e-9), f"{len(one)} and {len(many)} timings on {workers} workers"


def _measured(runs):
    return strong_scaling(runs, within=Path.cwd(), workers=WORKERS, **REQUIRED)


def runs(runs):
    result = _measured(runs)
    accuracies = {}
    for group in result.runs.values():
        for run in group:
            accuracy = run.summary.get("test_accuracy")
            assert isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and 0 <= accuracy <= 1, f"{run.name}: no test accuracy"
            accuracies[run.name] = accuracy
    low, high = min(accuracies, key=accuracies.get), max(accuracies, key=accuracies.get)
    assert accuracies[high] - accuracies[low] <= ACCURACY_SPREAD, (
        f"{low} and {high} did not train the same model (test accuracy {accuracies[low]:.3f} "
        f"and {accuracies[high]:.3f})")


def target(runs):
    result = _measured(runs)
    assert result.meets(TARGET, TOLERANCE), f"target not met: {result.report(TARGET, TOLERANCE)}"
