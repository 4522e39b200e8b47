"""TernGrad: every value becomes -1, 0 or +1 times the largest magnitude, unbiased."""

from __future__ import annotations

import torch

from .base import Compressor, Packet, pack_bits, register_compressor, unpack_bits


@register_compressor("terngrad", help="TernGrad: values in {-s, 0, +s}, s = max |x|, 2 bits each (unbiased)",
                     params={}, summable=False, unbiased=True)
class TernGradCompressor(Compressor):
    """TernGrad (Wen et al., *TernGrad: Ternary Gradients to Reduce Communication in
    Distributed Deep Learning*, NeurIPS 2017), on the "Communication optimizations"
    slide of Hoefler's keynote (*HPC for ML and ML for HPC*).

    With s = max |x_i|, value x_i is sent as s * sign(x_i) * b_i where b_i is 1 with
    probability |x_i| / s and 0 otherwise, so E[s * sign(x_i) * b_i] = x_i: the stochastic
    rounding of QSGD with a single level and the max norm. The paper's
    gradient clipping (which shrinks s) is left to the optimizer.

    On the wire: s (float32), then the ternary digit + 1 (0, 1 or 2) in 2 bits per value,
    four values to a byte.
    """

    def encode(self, tensor, key):
        flat = tensor.reshape(-1).float()
        scale = flat.abs().max()
        scaled = flat.abs().div_(scale.clamp_min(torch.finfo(torch.float32).tiny))  # in [0, 1]
        kept = scaled.add_(torch.rand_like(scaled)).floor_().clamp_(max=1)  # 1 with probability |x| / s
        ternary = kept.copysign_(flat)
        return Packet(tensor.shape, tensor.dtype, [scale.reshape(1), pack_bits(ternary.add_(1), 2)])

    def decompress(self, packet):
        scale, packed = packet.fields
        ternary = unpack_bits(packed, 2, packet.shape.numel()).float().sub_(1)
        return ternary.mul_(scale).to(packet.dtype).view(packet.shape)
