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
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..comm.buckets import FlatGradients


def broadcast_parameters(module: nn.Module, comm, src: int = 0) -> None:
    """Every rank starts from rank ``src``'s weights (and buffers)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            comm.broadcast(tensor.data, src)


class _DataParallel:
    def __init__(self, module: nn.Module, comm):
        self.module, self.comm = module, comm
        broadcast_parameters(module, comm)

    def parameters(self):
        return self.module.parameters()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Loss on this rank's shard (its mean); leaves the averaged gradients in ``.grad``."""
        out = self.module(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        self.last_correct = int((out.argmax(1) == y).sum())
        self.sync_gradients()
        return float(loss.detach())

    def sync_gradients(self) -> None:
        raise NotImplementedError


class DataParallelNaive(_DataParallel):
    """One allreduce per parameter, after the whole backward pass."""

    def sync_gradients(self) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                self.comm.allreduce(p.grad)
                p.grad /= self.comm.size


class DataParallelFlat(_DataParallel):
    """Every gradient a view into one buffer; one allreduce of the buffer per step."""

    def __init__(self, module: nn.Module, comm):
        super().__init__(module, comm)
        self.flat = FlatGradients(module.parameters())

    def sync_gradients(self) -> None:
        self.flat.check_bound()  # zero_grad(set_to_none=True) replaces the views
        self.comm.allreduce(self.flat.buffer)
        self.flat.buffer /= self.comm.size
