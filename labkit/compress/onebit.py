"""1-bit SGD: one bit per value, two reconstruction values, error feedback."""

from __future__ import annotations

import torch

from .base import Compressor, Packet, pack_bits, register_compressor, unpack_bits


@register_compressor("onebit", help="1-bit SGD: a bit per value (x >= 0 or not) and the mean of each side",
                     params={}, summable=False, unbiased=False)
class OneBitCompressor(Compressor):
    """1-bit SGD (Seide et al., *1-Bit Stochastic Gradient Descent and its Application to
    Data-Parallel Distributed Training of Speech DNNs*, Interspeech 2014), the "1-Bit SGD"
    slides of the NTHU chapter and of Hoefler's keynote.

    Each value is quantized to one bit: x >= 0 or x < 0. The receiver rebuilds it as the
    mean of the non-negative values or the mean of the negative ones, whichever side it
    was on. That alone loses most of the gradient; with error feedback (on by default)
    the quantization error is carried into the next mini-batch, and "we can quantize all
    the way to 1 bit at no or nearly no loss of accuracy". The paper keeps one pair of
    means per column of a weight matrix; here one pair per tensor.

    On the wire: the two means (float32), then the bits, eight to a byte.
    """

    def encode(self, tensor, key):
        flat = tensor.reshape(-1).float()
        positive = flat >= 0
        count = torch.count_nonzero(positive)
        positive_sum = flat.clamp(min=0).sum()
        negative_sum = flat.sum() - positive_sum
        means = torch.stack([positive_sum / count.clamp_min(1),
                             negative_sum / (flat.numel() - count).clamp_min(1)])
        return Packet(tensor.shape, tensor.dtype, [means, pack_bits(positive, 1)])

    def decompress(self, packet):
        means, bits = packet.fields
        positive = unpack_bits(bits, 1, packet.shape.numel()).float()
        values = positive.mul_(means[0] - means[1]).add_(means[1])  # means[0] where positive, else means[1]
        return values.to(packet.dtype).view(packet.shape)
