"""Data parallelism, the plain ways: one allreduce per parameter, or one for all of them.

"Each machine (GPU) independently evaluates the whole model on a part of the dataset to
compute gradient; weight is updated by the average of gradients from all nodes"
(Distributed & Parallel Computing for Deep Learning, chap. 12). After ``backward()``:

- ``DataParallelNaive`` allreduces every parameter's gradient on its own: one message,
  and one latency, per layer;
- ``DataParallelFlat`` has every ``p.grad`` live in one flat buffer (``FlatGradients``)
  and allreduces it once: "single layer communication" (You et al., SC'17), the
  ``allreduce`` sync mode's way.

Both start from rank 0's weights and end every step with the gradient of the mean loss
over the whole global batch on every rank; ``data_bucketed.py`` overlaps the same
allreduce with the backward pass, as torch DDP does.

Every way sums through the compressing communicator (``labkit.compress``), so any
``--compression`` works on top, with its error feedback kept per message: per parameter
(naive, keyed by the parameter's name), for the one flat buffer (flat, key ``grad``; per
layer for a layerwise compressor such as PowerSGD), per bucket (bucketed).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..algorithms.base import gradient_pieces
from ..comm.buckets import FlatGradients
from ..compress import CompressedCommunicator, make_compressor


def broadcast_parameters(module: nn.Module, comm, src: int = 0) -> None:
    """Every rank starts from rank ``src``'s weights (and buffers)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            comm.broadcast(tensor.data, src)


class _DataParallel:
    """``comm`` sums the gradients; ``compressor`` (default ``none``) compresses what it sends."""

    def __init__(self, module: nn.Module, comm, compressor=None):
        self.module, self.comm = module, comm
        self.compressed = CompressedCommunicator(comm, compressor or make_compressor("none"))
        self.lossless = self.compressed.compressor.name == "none"
        broadcast_parameters(module, comm)  # the weights themselves, never compressed

    def parameters(self):
        return self.module.parameters()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Loss on this rank's shard (its mean); leaves the averaged gradients in ``.grad``."""
        out = self.module(x)
        loss = F.cross_entropy(out, y)
        self.mark("backward_start")
        loss.backward()
        self.last_correct = int((out.argmax(1) == y).sum())
        self.sync_gradients()
        return float(loss.detach())

    def sync_gradients(self) -> None:
        raise NotImplementedError

    def mark(self, kind: str, bucket: int | None = None, asynchronous: bool | None = None) -> None:
        """Record an event of the step (only the bucketed way keeps a record)."""

    def allreduce(self, tensor: torch.Tensor, key) -> None:
        """Sum ``tensor`` over the ranks in place (``none``: the plain allreduce, no copy)."""
        if self.lossless:
            self.comm.allreduce(tensor)
        else:
            self.compressed.allreduce(tensor, key=key)


class DataParallelNaive(_DataParallel):
    """One allreduce per parameter, after the whole backward pass."""

    def sync_gradients(self) -> None:
        if self.comm.size == 1:
            return
        for name, p in self.module.named_parameters():
            if p.grad is not None:
                self.allreduce(p.grad, getattr(p, "full_name", name))
                p.grad /= self.comm.size


class DataParallelFlat(_DataParallel):
    """Every gradient a view into one buffer; one allreduce of the buffer per step."""

    def __init__(self, module: nn.Module, comm, compressor=None):
        super().__init__(module, comm, compressor)
        self.flat = FlatGradients(module.parameters())

    def sync_gradients(self) -> None:
        self.flat.check_bound()  # zero_grad(set_to_none=True) replaces the views
        if self.comm.size == 1:
            return
        for key, piece in gradient_pieces(self.flat.buffer, self.module, self.compressed.compressor):
            self.allreduce(piece, key)
        self.flat.buffer /= self.comm.size
