"""Every parallelism against one process training the whole model.

``labkit launch -n N`` (2 and 4 ranks, gloo; the hybrid grids also under mpiexec with MPI)
runs tests/parallel_rank.py: data parallelism three ways (naive, flat, bucketed), model,
pipeline (GPipe and 1F1B), tensor and hybrid grids, on digits with the same model, global
batch and seed. The gradients of the first step, put back together from the ranks' pieces,
equal the single-process ones to 1e-5; the loss of every step equals the single-process
curve to 1e-4; the data-parallel weights after 20 steps equal torch DDP's to 1e-6.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from labkit.parallel.reference import assemble, train_single

ROOT = Path(__file__).resolve().parents[1]
RANK_SCRIPT = ROOT / "tests" / "parallel_rank.py"
# 100 steps on 2 ranks; 40 on 4 (four processes share two cores: the run stays under a minute)
STEPS = {2: 100, 4: 40}
LR, BATCH = 0.05, 32
TIMEOUT = 240


def launch(world: int, out: Path, backend: str = "gloo", launcher: str = "local", only: str = ""):
    command = [sys.executable, "-m", "labkit.cli", "launch", "-n", str(world), "--launcher", launcher,
               "--backend", backend, "--timeout", str(TIMEOUT), "--", sys.executable, str(RANK_SCRIPT),
               str(out), "--steps", str(STEPS[world])]
    if only:
        command += ["--only", only]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT + 30, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def reference():
    return train_single(max(STEPS.values()), BATCH, LR)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return launch(2, tmp_path_factory.mktemp("parallel2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return launch(4, tmp_path_factory.mktemp("parallel4"))


CASES_2 = ["data-naive", "data-flat", "data-bucketed", "model", "pipeline-gpipe", "pipeline-1f1b", "tensor"]
CASES_4 = CASES_2 + ["hybrid-data-pipeline", "hybrid-data-tensor", "hybrid-pipeline-tensor"]
GRIDS = {  # the grid each case runs on, at 2 and 4 ranks
    "data-naive": "{n}x1x1", "data-flat": "{n}x1x1", "data-bucketed": "{n}x1x1", "model": "1x{n}x1",
    "pipeline-gpipe": "1x{n}x1", "pipeline-1f1b": "1x{n}x1", "tensor": "1x1x{n}",
    "hybrid-data-pipeline": "2x2x1", "hybrid-data-tensor": "2x1x2", "hybrid-pipeline-tensor": "1x2x2",
}


def check_case(ranks, case, reference, world):
    grid = ranks[0][case]["grid"]
    assert f"{grid['data']}x{grid['pipeline']}x{grid['tensor']}" == GRIDS[case].format(n=world)
    grads = assemble([r[case]["grads"] for r in ranks])
    assert sorted(grads) == sorted(reference["grads"])
    for name, want in reference["grads"].items():
        assert grads[name].shape == want.shape, name
        torch.testing.assert_close(grads[name], want, rtol=0, atol=1e-5, msg=f"{case}: gradient of {name}")
    for r in ranks:  # every rank reports the global loss of every step
        losses = torch.tensor(r[case]["losses"], dtype=torch.float64)
        assert len(losses) == STEPS[world]
        torch.testing.assert_close(losses, torch.tensor(reference["losses"][:STEPS[world]], dtype=torch.float64),
                                   rtol=0, atol=1e-4, msg=f"{case}: loss curve")
    assert reference["losses"][STEPS[world] - 1] < reference["losses"][0] - 0.5  # a learning curve


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("case", CASES_2)
def test_two_ranks_match_one_process(two_ranks, reference, case):
    check_case(two_ranks, case, reference, 2)


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("case", CASES_4)
def test_four_ranks_match_one_process(four_ranks, reference, case):
    check_case(four_ranks, case, reference, 4)


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["data-naive", "data-flat", "data-bucketed"])
def test_data_parallel_equals_torch_ddp(two_ranks, four_ranks, world, case):
    ranks = two_ranks if world == 2 else four_ranks
    for r in ranks:
        ddp, ours = r["ddp"]["weights"], r[case]["weights"]
        assert sorted(ddp) == sorted(ours)
        for name in ddp:
            torch.testing.assert_close(ours[name], ddp[name], rtol=0, atol=1e-6, msg=f"{case} vs DDP: {name}")


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_stash_and_timeline(two_ranks, four_ranks, world):
    """GPipe stashes all M micro-batches on every stage, 1F1B at most p − s; every stage
    records M forwards and M backwards, and a positive idle share."""
    ranks = two_ranks if world == 2 else four_ranks
    for stage, r in enumerate(ranks):
        gpipe, ofob = r["pipeline-gpipe"]["pipeline"], r["pipeline-1f1b"]["pipeline"]
        assert gpipe["stashed_peak"] == 4
        assert ofob["stashed_peak"] == min(world - stage, 4)
        assert ofob["stashed_bytes_peak"] <= gpipe["stashed_bytes_peak"]
        for stats in (gpipe, ofob):
            kinds = [e["kind"] for e in stats["events"]]
            assert kinds.count("forward") == 4 and kinds.count("backward") == 4
            assert 0 < stats["bubble_fraction"] < 1
            assert stats["bubble_fraction_model"] == pytest.approx((world - 1) / (4 + world - 1))


@pytest.mark.timeout(TIMEOUT + 60)
def test_hybrid_grids_under_mpiexec(tmp_path, reference):
    pytest.importorskip("mpi4py")
    from labkit.comm import mpiexec_path

    if mpiexec_path() is None:
        pytest.skip("no mpiexec")
    cases = "hybrid-data-pipeline,hybrid-data-tensor"
    ranks = launch(4, tmp_path, backend="mpi", launcher="mpi", only=cases)
    for case in cases.split(","):
        check_case(ranks, case, reference, 4)
