"""Tensor (operator) parallelism, as in Megatron-LM (Shoeybi et al., 2019).

"Model parallelism partitions the neural network ... i.e., parallelizes the matrix
operations across the processors" (Vadhiyar, Deep Learning); "Layer parallelism:
parameters can be distributed across processors; mini-batch has to be copied to all
processors; backpropagation requires all-to-all communication every layer"
(Ben-Nun & Hoefler). One layer's weight matrix is cut over the T ranks of a tensor group:

- ``ColumnParallelLinear``: rank t holds rows t of W (a slice of the output features),
  so y_t = x W_tᵀ + b_t needs the whole input and gives a slice of the output;
- ``RowParallelLinear``: rank t holds columns t of W, so it takes a slice of the input
  features and gives a partial sum of the output: y = Σ_t x_t W_tᵀ + b;
- ``ChannelParallelConv2d``: rank t holds a slice of the output channels of a convolution.

An MLP block is column-parallel then row-parallel, so the slice of the hidden layer never
leaves its rank. Two operators carry the communication, written out below:

- **f**: forward the identity, backward an allreduce (the input of a column-parallel
  layer is used by every rank, so its gradient is the sum of theirs);
- **g**: forward an allreduce (the partial sums of a row-parallel layer), backward the
  identity.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class CopyToTensorParallel(torch.autograd.Function):
    """f: identity forward, allreduce (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        ctx.comm.allreduce(grad)
        return grad, None


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: allreduce (sum) forward, identity backward."""

    @staticmethod
    def forward(ctx, x, comm):
        out = x.contiguous().clone()
        comm.allreduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromTensorParallel(torch.autograd.Function):
    """Allgather of the slices along ``dim`` forward; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return torch.cat(comm.allgather(x.contiguous()), dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.comm.size, dim=ctx.dim)[ctx.comm.rank].contiguous(), None, None


def f(x, comm):
    return CopyToTensorParallel.apply(x, comm)


def g(x, comm):
    return ReduceFromTensorParallel.apply(x, comm)


def _shard(source: torch.Tensor, dim: int, comm, name: str | None) -> nn.Parameter:
    """This rank's slice of ``source`` along ``dim``, as a parameter that remembers where
    it comes from (``full_name``, ``shard`` = (dim, index, count))."""
    piece = nn.Parameter(source.detach().chunk(comm.size, dim=dim)[comm.rank].clone())
    if name is not None:
        piece.full_name = name
    piece.shard = (dim, comm.rank, comm.size)
    return piece


def _check_divides(what: str, n: int, comm) -> None:
    if n % comm.size:
        raise ValueError(f"--tensor-parallel {comm.size} does not divide the {n} {what}")


class ColumnParallelLinear(nn.Module):
    """y_t = f(x) W_tᵀ + b_t: a slice of the output features; ``gather_output`` joins them."""

    def __init__(self, linear: nn.Linear, comm, gather_output: bool = False):
        super().__init__()
        _check_divides("output features", linear.out_features, comm)
        self.comm, self.gather_output = comm, gather_output
        self.weight = _shard(linear.weight, 0, comm, getattr(linear.weight, "full_name", None))
        self.bias = None if linear.bias is None else _shard(linear.bias, 0, comm, getattr(linear.bias, "full_name", None))

    def forward(self, x):
        y = F.linear(f(x, self.comm), self.weight, self.bias)
        return GatherFromTensorParallel.apply(y, self.comm, -1) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = g(x_t W_tᵀ) + b: takes a slice of the input features (the output of a
    column-parallel layer); the bias is whole on every rank, added once after the sum."""

    def __init__(self, linear: nn.Linear, comm):
        super().__init__()
        _check_divides("input features", linear.in_features, comm)
        self.comm = comm
        self.weight = _shard(linear.weight, 1, comm, getattr(linear.weight, "full_name", None))
        self.bias = None if linear.bias is None else linear.bias

    def forward(self, x):
        y = g(F.linear(x, self.weight), self.comm)
        return y if self.bias is None else y + self.bias


class ChannelParallelConv2d(nn.Module):
    """A convolution whose output channels are split over the ranks; the slices are
    gathered along the channel axis, so the next layer sees the whole output."""

    def __init__(self, conv: nn.Conv2d, comm):
        super().__init__()
        if conv.groups != 1:
            raise ValueError("ChannelParallelConv2d: grouped convolutions are not split")
        _check_divides("output channels", conv.out_channels, comm)
        self.comm = comm
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = _shard(conv.weight, 0, comm, getattr(conv.weight, "full_name", None))
        self.bias = None if conv.bias is None else _shard(conv.bias, 0, comm, getattr(conv.bias, "full_name", None))

    def forward(self, x):
        y = F.conv2d(f(x, self.comm), self.weight, self.bias, self.stride, self.padding, self.dilation)
        return GatherFromTensorParallel.apply(y, self.comm, 1)


_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout)


def _divides(n: int, comm) -> bool:
    return n % comm.size == 0


def tensor_parallel(stage: nn.Module, comm) -> nn.Sequential:
    """``stage`` (a sequence of layers) with its layers split over ``comm``.

    Two linear layers with only elementwise modules between them become a column-parallel
    and a row-parallel layer (the Megatron MLP); another linear layer becomes
    column-parallel with its output gathered; a convolution is split by output channels.
    A layer whose size the group does not divide stays whole on every rank.
    """
    from .model import as_layers

    layers = as_layers(stage)
    out: list[nn.Module] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Linear) and _divides(layer.out_features, comm):
            j = i + 1
            while j < len(layers) and isinstance(layers[j], _ELEMENTWISE):
                j += 1
            if j < len(layers) and isinstance(layers[j], nn.Linear) and _divides(layers[j].in_features, comm):
                out += [ColumnParallelLinear(layer, comm), *layers[i + 1:j], RowParallelLinear(layers[j], comm)]
                i = j + 1
                continue
            out.append(ColumnParallelLinear(layer, comm, gather_output=True))
        elif isinstance(layer, nn.Conv2d) and layer.groups == 1 and _divides(layer.out_channels, comm):
            out.append(ChannelParallelConv2d(layer, comm))
        else:
            out.append(layer)
        i += 1
    return nn.Sequential(*out)


class TensorParallel:
    """The whole model on every rank of ``comm`` (the tensor group), its layers split by
    ``tensor_parallel``. ``forward_backward(x, y)``: every rank takes the same batch and
    computes the same loss; each holds the gradient of its slices."""

    def __init__(self, model: nn.Module, comm):
        from .model import name_parameters

        self.comm = comm
        self.module = tensor_parallel(name_parameters(model), comm)

    def parameters(self):
        return self.module.parameters()

    def forward_backward(self, x, y) -> float:
        out = self.module(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        self.last_correct = int((out.argmax(1) == y).sum())
        return float(loss.detach())
