"""The pieces of labkit.parallel: schedules, splits, grids, tensor-parallel layers, core
groups, devices. The layers and core groups run as 2 real ranks (gloo, run_ranks)."""

import os

import pytest
import torch
from torch import nn

from labkit.models import build_model
from labkit.parallel.devices import NO_GPU, PARTS, bf16_autocast, rank_device, time_breakdown
from labkit.parallel.grid import GridShape, grid_shape
from labkit.parallel.model import balanced_split, count_layers, split_stages
from labkit.parallel.pipeline import (
    Action,
    bubble_fraction_model,
    check_schedule,
    gpipe_schedule,
    make_schedule,
    one_f_one_b_schedule,
    peak_stashed,
    simulate,
)
from labkit.parallel.spawn import run_ranks

# --- schedules ----------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("m", [1, 2, 4, 7])
def test_both_schedules_have_the_bubble_of_the_formula(p, m):
    for name, make in (("gpipe", gpipe_schedule), ("1f1b", one_f_one_b_schedule)):
        schedule = make(p, m)
        check_schedule(schedule, m)
        played = simulate(schedule)
        assert played["makespan"] == 2 * (m + p - 1), name
        assert played["bubble"] == pytest.approx(bubble_fraction_model(p, m)), name
    assert simulate(gpipe_schedule(p, m))["peak_stashed"] == [m] * p
    assert simulate(one_f_one_b_schedule(p, m))["peak_stashed"] == [min(p - s, m) for s in range(p)]


def test_one_f_one_b_order_on_four_stages():
    assert one_f_one_b_schedule(4, 4)[1] == [Action("F", 0), Action("F", 1), Action("F", 2), Action("B", 0),
                                             Action("F", 3), Action("B", 1), Action("B", 2), Action("B", 3)]
    assert one_f_one_b_schedule(4, 4)[3] == [a for i in range(4) for a in (Action("F", i), Action("B", i))]


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="backward of micro-batch 0 before its forward"):
        check_schedule([[Action("B", 0), Action("F", 0)]], 1)
    with pytest.raises(ValueError, match="not micro-batches 0..1"):
        check_schedule([[Action("F", 0), Action("F", 0), Action("B", 0), Action("B", 1)]], 2)
    # stage 0 waits for the gradient of micro-batch 1 before it sends micro-batch 1 forward
    stuck = [[Action("F", 0), Action("B", 0), Action("B", 1), Action("F", 1)],
             [Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)]]
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(stuck)
    with pytest.raises(ValueError, match="--schedule 'zigzag'"):
        make_schedule("zigzag", 2, 2)
    assert peak_stashed([Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1)]) == 2


# --- splits -------------------------------------------------------------------------------

def test_balanced_split_minimizes_the_largest_stage():
    assert balanced_split([1, 1, 1, 1], 2) == [0, 2]
    assert balanced_split([8, 1, 1, 1, 1], 2) == [0, 1]
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages"):
        balanced_split([1, 1], 3)


@pytest.mark.parametrize("name,shape,stages", [("mlp", (1, 8, 8), 3), ("lenet", (1, 8, 8), 5),
                                               ("resnet", (3, 8, 8), 4)])
def test_the_stages_compose_to_the_model(name, shape, stages):
    model = build_model(name, shape, 10, seed=0).eval()
    x = torch.randn(4, *shape)
    pieces = split_stages(model, stages, shape)
    assert len(pieces) == stages and all(len(list(p.parameters())) for p in pieces)
    out = x
    for piece in pieces:
        out = piece(out)
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=f"only {count_layers(model)} layers"):
        split_stages(model, count_layers(model) + 1, shape)


# --- grids --------------------------------------------------------------------------------

def test_grid_shapes_and_their_errors():
    assert grid_shape(4, "hybrid") == GridShape(2, 2, 1)
    assert grid_shape(8, "hybrid", 2, 2) == GridShape(2, 2, 2)
    assert grid_shape(4, "pipeline", layers=4) == GridShape(1, 4, 1)
    assert grid_shape(4, "pipeline", 2) == GridShape(2, 2, 1)
    assert grid_shape(4, "tensor") == GridShape(1, 1, 4)
    with pytest.raises(ValueError, match="--pipeline-stages: 4 stages but the model has only 3 layers"):
        grid_shape(4, "pipeline", layers=3)
    with pytest.raises(ValueError, match="--pipeline-stages: 6 workers do not divide into 4 stages"):
        grid_shape(6, "hybrid", 4)
    with pytest.raises(ValueError, match="--tensor-parallel: 6 workers do not divide into 1 stages x 4"):
        grid_shape(6, "tensor", tensor_parallel=4)
    with pytest.raises(ValueError, match="--parallelism: hybrid with 2 workers"):
        grid_shape(2, "hybrid")


def test_grid_groups_partition_the_ranks():
    shape = GridShape(2, 2, 2)
    for axis in ("data", "pipeline", "tensor"):
        groups = shape.groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(8))
        assert all(len(g) == getattr(shape, axis) for g in groups)
    assert shape.groups("tensor")[0] == [0, 1]  # tensor ranks are neighbours
    assert shape.groups("data")[0] == [0, 4]
    assert [shape.coords(r) for r in (0, 3, 5)] == [(0, 0, 0), (0, 1, 1), (1, 0, 1)]


# --- tensor-parallel layers and core groups, as 2 real ranks ------------------------------

@pytest.fixture(scope="module")
def two_rank_checks():
    from tests.parallel_layers import unit_checks

    return run_ranks(unit_checks, 2, timeout=180)


@pytest.mark.timeout(240)
def test_tensor_parallel_layers_equal_the_whole_layers(two_rank_checks):
    for rank, result in enumerate(two_rank_checks):
        for group in ("linear", "linear-odd", "mlp-conv"):
            for what, error in result[group].items():
                assert error <= 1e-6, f"rank {rank}, {group}: {what} differs by {error:.2e}"


@pytest.mark.timeout(240)
def test_core_groups_pin_disjoint_cores(two_rank_checks):
    cores = sorted(os.sched_getaffinity(0))
    mine = [r["core_groups"]["cores"] for r in two_rank_checks]
    assert [r["affinity"] for r in two_rank_checks] == mine
    if len(cores) >= 2:
        assert not set(mine[0]) & set(mine[1]) and sorted(mine[0] + mine[1]) == cores
    assert [r["threads"] for r in two_rank_checks] == [len(m) for m in mine]
    losses = [r["core_groups"]["loss"] for r in two_rank_checks]
    assert losses[0] > 0 and all(r["core_groups"]["seconds"] > 0 for r in two_rank_checks)


# --- devices ------------------------------------------------------------------------------

def test_devices_fall_back_to_the_cpu_and_say_why():
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert rank_device(n + 1) == torch.device("cuda", (n + 1) % n)
        return
    assert rank_device(3) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        rank_device(0, prefer="cuda")
    result = time_breakdown(variant=2, workers=2, steps=2, hidden=(16,))
    assert list(result["parts"]) == [name for name, _ in PARTS]
    for name in ("cpu_gpu_data", "cpu_gpu_params", "gpu_update"):
        assert result["parts"][name]["seconds"] is None and result["parts"][name]["note"] == NO_GPU
    for name in ("io", "init", "fwd_bwd", "cpu_update"):
        assert result["parts"][name]["seconds"] > 0
    assert result["param_bytes_host_device_per_step"] == 0


def test_bf16_autocast_computes_in_bfloat16():
    layer = nn.Linear(4, 3)
    with bf16_autocast(torch.device("cpu")):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with bf16_autocast(torch.device("cpu"), enabled=False):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
