"""Flat gradient buffers: all of a model's gradients in one contiguous tensor.

"Single layer communication" (You et al., SC'17): allocate the network's gradients
contiguously and send them in one message instead of one per layer, so the per-message
latency (alpha) is paid once. :class:`FlatGradients` does this without any copy: each
parameter's ``.grad`` is a view into one flat buffer, so ``backward()`` writes straight
into what is communicated.

:class:`GradientBuckets` splits the parameters into size-capped buckets (as PyTorch DDP
does, default 25 MB), in reverse order of the layers, so that communication of the last
layers can start while earlier ones are still being computed.
"""

from __future__ import annotations

import torch


def bind_flat(params: list[torch.Tensor], dtype=None) -> torch.Tensor:
    """One flat buffer; every ``p.grad`` becomes a view into it. Returns the buffer."""
    params = list(params)
    if not params:
        return torch.zeros(0)
    dtype = dtype or params[0].dtype
    flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is not None:
            flat[offset:offset + n].copy_(p.grad.reshape(-1))
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n
    return flat


class FlatGradients:
    """All gradients of ``params`` as views into ``self.buffer`` (one allreduce per step)."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.buffer = bind_flat(self.params)

    def check_bound(self) -> None:
        """Re-bind if something replaced a ``.grad`` (for example ``zero_grad(set_to_none=True)``)."""
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None or p.grad.data_ptr() != self.buffer[offset:offset + n].data_ptr():
                self.buffer = bind_flat(self.params)
                return
            offset += n


class GradientBuckets:
    """Parameters grouped into buckets of at most ``cap_bytes``, last layers first."""

    def __init__(self, params, cap_bytes: int = 25 * 2**20):
        if cap_bytes <= 0:
            raise ValueError(f"bucket cap must be > 0 bytes, got {cap_bytes}")
        params = [p for p in params if p.requires_grad]
        self.groups: list[list[torch.Tensor]] = []
        current, size = [], 0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if current and size + nbytes > cap_bytes:
                self.groups.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self.groups.append(current)
        self.buffers = [bind_flat(g) for g in self.groups]

    def __len__(self) -> int:
        return len(self.buffers)
