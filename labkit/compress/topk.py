"""Top-k sparsification: send only the k values of largest magnitude."""

from __future__ import annotations

import torch

from .base import SparseCompressor, kept_count, register_compressor


def largest_magnitudes(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k values of ``flat`` with the largest magnitudes (exactly torch.topk's).

    torch.topk over millions of values is slow on a CPU, so first a threshold is read off
    a strided sample, placed to let about 2k values through; torch.topk then runs over
    those candidates only. If fewer than k pass, it runs over everything. Deep Gradient
    Compression estimates its threshold from a sample the same way.
    """
    magnitude = flat.abs()
    if flat.numel() <= 65536 or 4 * k > flat.numel():
        return torch.topk(magnitude, k, sorted=False).indices
    sample = magnitude[:: flat.numel() // 4096]
    threshold = torch.topk(sample, max(1, 2 * k * sample.numel() // flat.numel())).values[-1]
    candidates = (magnitude >= threshold).nonzero().squeeze(1)
    if candidates.numel() < k:
        return torch.topk(magnitude, k, sorted=False).indices
    return candidates[torch.topk(magnitude[candidates], k, sorted=False).indices]


@register_compressor("topk", help="top-k: the fraction `ratio` of values with the largest magnitudes, with their indices",
                     params={"ratio": 0.01}, summable=False, unbiased=False)
class TopKCompressor(SparseCompressor):
    """Top-k sparsification (Hoefler's keynote, slide "Sparsification - top-k Stochastic
    Gradient Descent": "pick the k-largest elements of the vector at each node!
    Accumulate the remainder locally"; Alistarh et al., *The Convergence of Sparsified
    Gradient Methods*, NeurIPS 2018; Renggli et al., *SparCML*, 2018).

    k = max(1, round(ratio * numel)). What is not sent goes to the error feedback memory
    and is sent once it has grown large enough.

    On the wire: k indices (uint8/uint16/uint32/int64, the smallest that fits), then the
    k values in the tensor's dtype.
    """

    def __init__(self, ratio: float, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.check("ratio", ratio, 0 < ratio <= 1, "a fraction in (0, 1]")
        self.ratio = ratio

    def select(self, flat, key):
        return largest_magnitudes(flat, kept_count(self.ratio, flat.numel()))
