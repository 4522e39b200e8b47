"""Compressed data-parallel training: 1-bit SGD and top-k 1 %, with error feedback, match plain SGD."""

import pytest

import labkit

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_onebit_and_topk_within_1_5_points_of_uncompressed(tmp_path, no_leftovers):
    def accuracy(compression, **params):
        cfg = labkit.RunConfig(workers=4, epochs=30, compression=compression, compression_params=params,
                               error_feedback=True, run_dir=str(tmp_path / compression))
        result = labkit.train(cfg, progress=False)
        assert result.status == "completed", result.error
        return result.test_accuracy, result.summary["bytes_sent"]

    base_acc, base_bytes = accuracy("none")
    onebit_acc, onebit_bytes = accuracy("onebit")
    topk_acc, topk_bytes = accuracy("topk", ratio=0.01)
    assert base_acc >= 0.95
    assert onebit_acc >= base_acc - 0.015, (onebit_acc, base_acc)
    assert topk_acc >= base_acc - 0.015, (topk_acc, base_acc)
    # what crossed the wire really shrank: 1 bit per value, and 1 % of the values with indices
    assert onebit_bytes < base_bytes / 10
    assert topk_bytes < base_bytes / 10


@pytest.mark.timeout(300)
def test_powersgd_in_allreduce_mode_compresses_each_weight_matrix(tmp_path, no_leftovers):
    """PowerSGD needs matrices: the allreduce mode sends it each layer, never the flat buffer."""
    def run(compression, **params):
        cfg = labkit.RunConfig(workers=2, steps=150, compression=compression, compression_params=params,
                               run_dir=str(tmp_path / compression))
        result = labkit.train(cfg, progress=False)
        assert result.status == "completed", result.error
        return result.test_accuracy, result.summary["bytes_sent"]

    base_acc, base_bytes = run("none")
    power_acc, power_bytes = run("powersgd", rank=2)
    assert power_bytes < base_bytes / 5, (power_bytes, base_bytes)
    assert power_acc >= base_acc - 0.05, (power_acc, base_acc)
