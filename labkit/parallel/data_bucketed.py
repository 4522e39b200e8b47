"""Data parallelism with the allreduce overlapped with the backward pass, as torch DDP does.

The gradients are grouped in buckets of at most ``bucket_mb`` MiB, last layers first
(``comm.buckets.GradientBuckets``: one flat buffer per bucket, and a view into it for each
parameter). Backward produces the gradients of the last layers first; a hook on each
parameter (``register_post_accumulate_grad_hook``) puts its gradient into its bucket (one
copy, scaled by 1/N on the way as DDP does, after which ``p.grad`` is the bucket's view,
so nothing is copied back) and counts the bucket's gradients; as soon as a bucket is
complete its allreduce starts, asynchronously, while backward goes on with the earlier
layers. ``sync_gradients`` then only waits for what is still on the wire. (Li et al.,
"PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020.)

The allreduce is started without waiting through ``start_allreduce``: torch.distributed's
``async_op=True`` on a torch.distributed communicator; on another backend it runs at once
(still one message per bucket, only without the overlap).

With a compressor (``--compression``), each bucket goes through the compressing
communicator as soon as it is complete, with its own error feedback (key ``bucket<b>``;
per parameter for a layerwise compressor): the compressors' exchange is blocking (sizes,
then packets), so backward waits for each compressed bucket. The gradient is compressed
as this rank computed it and the sum divided by N afterwards, as the flat buffer of the
``allreduce`` sync mode is, so with one bucket the two take the very same steps.
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

    def __init__(self, module: nn.Module, comm, bucket_mb: float = 25.0, compressor=None):
        super().__init__(module, comm, compressor)
        self.buckets = GradientBuckets(module.parameters(), cap_bytes=max(1, int(bucket_mb * 2**20)))
        self.scale = 1.0 / comm.size
        names = {p: getattr(p, "full_name", name) for name, p in module.named_parameters()}
        self.view_of, self.bucket_of, self.key_of = {}, {}, {}
        for b, group in enumerate(self.buckets.groups):
            for p in group:
                self.view_of[p] = p.grad  # GradientBuckets made every p.grad a view into its bucket
                self.bucket_of[p] = b
                self.key_of[p] = names[p]
                p.register_post_accumulate_grad_hook(self._ready)
        self.pending = [len(group) for group in self.buckets.groups]
        self.handles: list = []

    def _ready(self, p: torch.Tensor) -> None:
        """Backward has accumulated ``p.grad``: into the bucket with it; start a full bucket."""
        view = self.view_of[p]
        if p.grad.data_ptr() != view.data_ptr():  # zero_grad(set_to_none=True): a fresh tensor
            if self.lossless:
                torch.mul(p.grad, self.scale, out=view)  # DDP's copy and 1/N in one pass
            else:
                view.copy_(p.grad)
            p.grad = view
        elif self.lossless:
            view.mul_(self.scale)
        b = self.bucket_of[p]
        self.pending[b] -= 1
        if self.pending[b] == 0:
            self.pending[b] = len(self.buckets.groups[b])  # ready for the next backward
            self.handles.append(self._exchange(b))

    def _exchange(self, b: int):
        buffer = self.buckets.buffers[b]
        if self.lossless:
            return start_allreduce(self.comm, buffer)
        if self.comm.size > 1:
            if self.compressed.compressor.layerwise:
                for p in self.buckets.groups[b]:
                    self.compressed.allreduce(self.view_of[p], key=self.key_of[p])
            else:
                self.compressed.allreduce(buffer, key=f"bucket{b}")
            buffer /= self.comm.size
        return _Done()

    def sync_gradients(self) -> None:
        handles, self.handles = self.handles, []
        if len(handles) != len(self.buckets):
            self.pending = [len(group) for group in self.buckets.groups]
            raise RuntimeError(f"only {len(handles)} of {len(self.buckets)} gradient buckets were "
                               "filled: some parameter got no gradient")
        for handle in handles:
            handle.wait()
