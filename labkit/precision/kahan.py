"""Kahan (compensated) summation, from "Deep Learning and Hardware" (Chuangsuwanich): "weight
updates accumulate errors in DNN training: accumulate the running error during summation and
add it back. One addition becomes two additions and two subtractions."

    y = x − c          the new term, corrected by what the last addition lost
    t = s + y          the addition (it rounds)
    c = (t − s) − y    what this addition lost (exactly, in floating point)
    s = t

:class:`KahanAccumulator` does this elementwise on tensors (one compensation per weight, as
when it accumulates weight updates); :func:`kahan_sum` sums a long vector with it, and
:func:`naive_sum` is the plain one-after-another sum to compare with.
"""

from __future__ import annotations

import numpy as np
import torch


class KahanAccumulator:
    """A running sum ``value`` of tensors in ``dtype``, with Kahan's compensation ``compensation``."""

    def __init__(self, initial, dtype=None):
        initial = torch.as_tensor(initial)
        if not initial.is_floating_point():
            raise ValueError(f"initial must be a float tensor, got {initial.dtype}")
        self.value = initial.to(dtype or initial.dtype).clone()
        self.compensation = torch.zeros_like(self.value)

    def add(self, x) -> torch.Tensor:
        """value += x, compensated; returns the new value."""
        x = torch.as_tensor(x, dtype=self.value.dtype)
        y = x - self.compensation
        t = self.value + y
        self.compensation = (t - self.value) - y
        self.value = t
        return self.value


def _vector(x, dtype) -> torch.Tensor:
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"dtype must be a torch float dtype, got {dtype!r}")
    return x.reshape(-1).to(dtype)


def naive_sum(x, dtype=torch.float32) -> torch.Tensor:
    """x[0] + x[1] + ... one after another, every partial sum rounded to ``dtype``.

    (``torch.sum`` adds in blocks and pairs, which is far more accurate than this.)
    """
    x = _vector(x, dtype)
    if dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.cumsum(x.numpy())[-1:].copy()).reshape(())  # cumsum is sequential
    total = torch.zeros((), dtype=dtype)
    for value in x:
        total = total + value
    return total


def kahan_sum(x, dtype=torch.float32, lanes: int = 1024) -> torch.Tensor:
    """The Kahan-compensated sum of ``x`` in ``dtype``.

    To be quick in Python the vector is cut into rows of ``lanes`` values and summed row by
    row by ``lanes`` compensated accumulators at once (one vectorized step per row); the lane
    sums, each corrected by its compensation, are then added one by one by one accumulator.
    """
    if not isinstance(lanes, int) or lanes < 1:
        raise ValueError(f"lanes must be an integer >= 1, got {lanes!r}")
    x = _vector(x, dtype)
    if x.numel() == 0:
        return torch.zeros((), dtype=dtype)
    width = min(lanes, x.numel())
    rows = -(-x.numel() // width)
    padded = torch.cat([x, torch.zeros(rows * width - x.numel(), dtype=dtype)]).view(rows, width)
    lanes_sum = KahanAccumulator(padded[0])
    for row in padded[1:]:
        lanes_sum.add(row)
    total = KahanAccumulator(torch.zeros((), dtype=dtype))
    for value, lost in zip(lanes_sum.value, lanes_sum.compensation):
        total.add(value)
        total.add(-lost)
    return total.value
