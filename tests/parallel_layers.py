"""Per-rank checks of the tensor-parallel layers and the core groups, run by
tests/test_parallel_units.py through labkit.parallel.spawn.run_ranks (2 ranks, gloo)."""

import os

import torch
from torch import nn

from labkit.parallel.core_groups import epoch_time
from labkit.parallel.tensor import (
    ChannelParallelConv2d,
    ColumnParallelLinear,
    RowParallelLinear,
    tensor_parallel,
)


def _max_error(a, b):
    return float((a - b).abs().max())


def _seeded(seed):
    torch.manual_seed(seed)


def linear_layers(comm, n_in=12, n_out=8, batch=5) -> dict:
    """Column- and row-parallel layers against the nn.Linear they are cut from, forward
    and backward; every error is a max absolute difference."""
    errors = {}
    _seeded(1)
    linear = nn.Linear(n_in, n_out)
    x = torch.randn(batch, n_in, requires_grad=True)
    grad_out = torch.randn(batch, n_out)
    linear(x).backward(grad_out)
    want_x, want_w, want_b = x.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone()
    linear.zero_grad()
    rank, size = comm.rank, comm.size

    x.grad = None  # column-parallel: whole input, gathered output
    column = ColumnParallelLinear(linear, comm, gather_output=True)
    out = column(x)
    errors["column forward"] = _max_error(out, linear(x).detach())
    out.backward(grad_out)
    errors["column input grad"] = _max_error(x.grad, want_x)
    errors["column weight grad"] = _max_error(column.weight.grad, want_w.chunk(size, 0)[rank])
    errors["column bias grad"] = _max_error(column.bias.grad, want_b.chunk(size, 0)[rank])

    piece = x.detach().chunk(size, 1)[rank].clone().requires_grad_(True)  # row-parallel: sliced input
    row = RowParallelLinear(linear, comm)
    out = row(piece)
    errors["row forward"] = _max_error(out, linear(x).detach())
    out.backward(grad_out)
    errors["row input grad"] = _max_error(piece.grad, want_x.chunk(size, 1)[rank])
    errors["row weight grad"] = _max_error(row.weight.grad, want_w.chunk(size, 1)[rank])
    errors["row bias grad"] = _max_error(row.bias.grad, want_b)
    return errors


def mlp_and_conv(comm) -> dict:
    errors = {}
    _seeded(2)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 6, requires_grad=True)
    mlp(x).sum().backward()
    want_x = x.grad.clone()
    x.grad = None
    parallel = tensor_parallel(mlp, comm)
    assert [type(m).__name__ for m in parallel] == ["ColumnParallelLinear", "ReLU", "RowParallelLinear"]
    out = parallel(x)
    errors["mlp forward"] = _max_error(out, mlp(x).detach())
    out.sum().backward()
    errors["mlp input grad"] = _max_error(x.grad, want_x)

    conv = nn.Conv2d(3, 4, 3, padding=1)
    img = torch.randn(2, 3, 5, 5, requires_grad=True)
    grad_out = torch.randn(2, 4, 5, 5)
    conv(img).backward(grad_out)
    want_img, want_w = img.grad.clone(), conv.weight.grad.clone()
    img.grad = None
    split = ChannelParallelConv2d(conv, comm)
    out = split(img)
    errors["conv forward"] = _max_error(out, conv(img).detach())
    out.backward(grad_out)
    errors["conv input grad"] = _max_error(img.grad, want_img)
    errors["conv weight grad"] = _max_error(split.weight.grad, want_w.chunk(comm.size, 0)[comm.rank])
    return errors


def unit_checks(comm) -> dict:
    result = {"linear": linear_layers(comm), "linear-odd": linear_layers(comm, 10, 6, 3),
              "mlp-conv": mlp_and_conv(comm)}
    cores = sorted(os.sched_getaffinity(0))
    result["core_groups"] = epoch_time(comm, cores, batch=32, epochs=1, hidden=(16,))
    result["affinity"] = sorted(os.sched_getaffinity(0))
    result["threads"] = torch.get_num_threads()
    return result
