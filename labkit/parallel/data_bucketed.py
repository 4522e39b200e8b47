"""Data parallelism with the allreduce overlapped with the backward pass, as torch DDP does.

The gradients are grouped in buckets of at most ``bucket_mb`` MiB, last layers first
(``comm.buckets.GradientBuckets``: every ``p.grad`` is a view into its bucket's buffer).
Backward produces the gradients of the last layers first; a hook on each parameter
(``register_post_accumulate_grad_hook``) counts the gradients of its bucket, and as soon
as a bucket is complete its allreduce starts, asynchronously, while backward goes on with
the earlier layers. ``sync_gradients`` then only waits for what is still on the wire.
(Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training",
VLDB 2020.)

The allreduce is started without waiting through ``start_allreduce``: torch.distributed's
``async_op=True`` on a torch.distributed communicator; on another backend it runs at once
(still one message per bucket, only without the overlap).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from ..comm.buckets import GradientBuckets
from .data_naive import _DataParallel


class _Done:
    def wait(self):
        return None


class _TorchWork:
    def __init__(self, work, comm):
        self.work, self.comm = work, comm

    def wait(self):
        t0 = time.perf_counter()
        self.work.wait()
        self.comm.stats.add_time(time.perf_counter() - t0)


def start_allreduce(comm, tensor: torch.Tensor):
    """Start summing ``tensor`` over ``comm`` in place; returns a handle with ``wait()``."""
    if comm.size == 1:
        return _Done()
    if hasattr(comm, "iallreduce"):
        return comm.iallreduce(tensor)
    if getattr(comm, "backend", None) in ("gloo", "nccl") and hasattr(comm, "group") \
            and tensor.device.type == comm.device.type:
        work = dist.all_reduce(tensor, group=comm.group, async_op=True)
        n = comm.size
        comm.stats.add("allreduce", 2 * (n - 1) * tensor.numel() * tensor.element_size() // n, 2 * (n - 1))
        return _TorchWork(work, comm)
    comm.allreduce(tensor)
    return _Done()


class DataParallelBucketed(_DataParallel):
    """Buckets of gradients, each allreduced as soon as backward has filled it."""

    def __init__(self, module: nn.Module, comm, bucket_mb: float = 25.0):
        super().__init__(module, comm)
        self.buckets = GradientBuckets(module.parameters(), cap_bytes=max(1, int(bucket_mb * 2**20)))
        self.views = [[p.grad for p in group] for group in self.buckets.groups]
        self.bucket_of = {}
        for b, group in enumerate(self.buckets.groups):
            for p in group:
                self.bucket_of[p] = b
                p.register_post_accumulate_grad_hook(self._ready)
        self.pending = [0] * len(self.buckets)
        self.handles: list = []

    def _ready(self, p: torch.Tensor) -> None:
        b = self.bucket_of[p]
        self.pending[b] -= 1
        if self.pending[b] == 0:
            self.handles.append(start_allreduce(self.comm, self.buckets.buffers[b]))

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        for buffer, group, views in zip(self.buckets.buffers, self.buckets.groups, self.views):
            buffer.zero_()
            for p, view in zip(group, views):
                p.grad = view  # zero_grad(set_to_none=True) may have dropped the views
        self.pending = [len(group) for group in self.buckets.groups]
        self.handles = []
        return super().forward_backward(x, y)

    def sync_gradients(self) -> None:
        if len(self.handles) != len(self.buckets):
            raise RuntimeError(f"only {len(self.handles)} of {len(self.buckets)} gradient buckets were "
                               "filled: some parameter got no gradient")
        for handle in self.handles:
            handle.wait()
        for buffer in self.buckets.buffers:
            buffer /= self.comm.size
