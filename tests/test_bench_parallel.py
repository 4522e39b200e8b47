"""``labkit bench parallel``: one tiny run of every parallelism, and its refusals.

Two ranks, an MLP with hidden layers of 32, 4 steps: every row is there with its grid, the
pipelines report a measured bubble beside (p-1)/(m+p-1), and the bucketed rows compressed with
fp16 and top-k send fewer bytes per step than the uncompressed buckets (fp16 about half). A bad
option ends in one line and exit 2, before any rank starts.
"""

import json

import pytest

from .conftest import run_cli

ROWS = ["data naive", "data flat", "data bucketed", "torch DDP", "data bucketed fp16", "data bucketed topk",
        "model", "pipeline gpipe", "pipeline 1f1b", "tensor"]


@pytest.fixture(scope="module")
def tiny():
    result = run_cli("bench", "parallel", "-n", "2", "--steps", "4", "--batch", "32", "--hidden", "32",
                     "--core-groups", "0", "--json", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.timeout(360)
def test_every_parallelism_has_its_row(tiny):
    rows = {r["parallelism"]: r for r in tiny["rows"]}
    assert list(rows) == ROWS
    assert rows["tensor"]["grid"] == "1x1x2" and rows["model"]["grid"] == "1x2x1"
    assert all(r["step_ms"] > 0 and r["cpu_ms"] > 0 for r in rows.values())
    for name in ("pipeline gpipe", "pipeline 1f1b"):
        assert rows[name]["bubble_model"] == pytest.approx(1 / 5)  # p = 2, m = 4
        assert 0 < rows[name]["bubble"] < 1


@pytest.mark.timeout(360)
def test_compressed_buckets_send_fewer_bytes(tiny):
    ratios = tiny["compressed_bytes_ratio"]
    assert sorted(ratios) == ["fp16", "topk"]
    assert 0.45 < ratios["fp16"] < 0.55  # 2 bytes a value instead of 4
    assert ratios["topk"] < ratios["fp16"]
    plain = next(r for r in tiny["rows"] if r["parallelism"] == "data bucketed")
    assert plain["bytes_per_step_max"] > 0


@pytest.mark.parametrize("args, says", [
    (["--compression", "zip"], "--compression 'zip' is not a compressor"),
    (["--compression", "none"], "--compression 'none' is not a compressor"),
    (["-n", "1"], "-n must be at least 2"),
    (["--batch", "30"], "must be divisible by workers x microbatches"),
    (["--microbatches", "0"], "--microbatches must be at least 1"),
    (["--steps", "2"], "--steps must be at least 4"),
    (["--hidden", "0"], "--hidden and --microbatches must be at least 1"),
])
def test_bad_options_end_in_one_line(args, says):
    result = run_cli("bench", "parallel", *args, timeout=60)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    assert "Traceback" not in result.stderr
