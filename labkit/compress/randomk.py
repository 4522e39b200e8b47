"""Random-k sparsification: send k values chosen uniformly at random."""

from __future__ import annotations

import torch

from .base import SparseCompressor, kept_count, register_compressor


@register_compressor("randomk", help="random-k: a random fraction `ratio` of the values, with their indices "
                                     "(unbiased with scale=true)",
                     params={"ratio": 0.01, "scale": False}, summable=False, unbiased=False)
class RandomKCompressor(SparseCompressor):
    """Random-k sparsification (Stich et al., *Sparsified SGD with Memory*, NeurIPS 2018),
    the random counterpart of top-k on the "Sparsification" slide of Hoefler's keynote.

    k = max(1, round(ratio * numel)) distinct indices drawn uniformly. With
    ``scale=true`` the values are multiplied by numel / k: each value is then sent with
    probability k / numel and weight numel / k, so the compressor is unbiased (at the
    price of a variance numel / k times larger). Without scaling, error feedback (as in
    the paper) keeps what was not sent.

    On the wire: k indices (the smallest integer type that fits), then k values in the
    tensor's dtype.
    """

    def __init__(self, ratio: float, scale: bool, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.check("ratio", ratio, 0 < ratio <= 1, "a fraction in (0, 1]")
        self.ratio = ratio
        self.scale = scale

    def select(self, flat, key):
        return torch.randperm(flat.numel(), device=flat.device)[:kept_count(self.ratio, flat.numel())]

    def encode(self, tensor, key):
        packet = super().encode(tensor, key)
        if self.scale:
            indices, values = packet.fields
            values.mul_(tensor.numel() / indices.numel())
        return packet
