"""QSGD: stochastic quantization of |x| / ||x|| to s levels, bucket by bucket, unbiased."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Compressor, Packet, register_compressor


@register_compressor("qsgd", help="QSGD: |x|/||bucket|| stochastically rounded to one of `levels` levels (unbiased)",
                     params={"levels": 127, "bucket_size": 512}, summable=False, unbiased=True)
class QSGDCompressor(Compressor):
    """QSGD (Alistarh et al., *QSGD: Communication-Efficient SGD via Gradient Quantization
    and Encoding*, NeurIPS 2017), cited in Chuangsuwanich's *Deep Learning and Hardware*
    and on the NTHU slides ("Quantized SGD").

    The tensor is cut into buckets of ``bucket_size`` values (the paper's bucketing: the
    variance grows with the bucket length). In a bucket of norm ||b||, value x_i is sent
    as ||b|| * sign(x_i) * l_i / s, where the level l_i is s * |x_i| / ||b|| rounded down
    or up at random, up with probability equal to the fractional part: stochastic
    rounding, so E[l_i] = s * |x_i| / ||b|| and the compressor is unbiased. Each value is
    off by less than ||b|| / s.

    On the wire: one norm per bucket (float32), then sign * level per value as int8
    (s <= 127) or int16 (s <= 32767). The paper's Elias coding of the levels is left out:
    fixed-width integers are what the hardware moves fastest.
    """

    def __init__(self, levels: int, bucket_size: int, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.check("levels", levels, 1 <= levels <= 32767, "a whole number from 1 to 32767")
        self.check("bucket_size", bucket_size, bucket_size >= 1, "a whole number >= 1")
        self.levels, self.bucket_size = levels, bucket_size
        self.level_dtype = torch.int8 if levels <= 127 else torch.int16

    def buckets(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` as rows of ``bucket_size`` values, the last one padded with zeros."""
        padding = -flat.numel() % self.bucket_size
        return (F.pad(flat, (0, padding)) if padding else flat).view(-1, self.bucket_size)

    def encode(self, tensor, key):
        flat = tensor.reshape(-1).float()
        buckets = self.buckets(flat)
        norms = torch.linalg.vector_norm(buckets, dim=1)
        levels_per_unit = (self.levels / norms.clamp_min(torch.finfo(torch.float32).tiny)).unsqueeze(1)
        # stochastic rounding: floor(s |x| / ||b|| + u) with u uniform in [0, 1), computed in place
        level = torch.rand_like(buckets).addcmul_(buckets.abs(), levels_per_unit)
        level.floor_().clamp_(max=self.levels).copysign_(buckets)
        return Packet(tensor.shape, tensor.dtype, [norms, level.view(-1)[:flat.numel()].to(self.level_dtype)])

    def decompress(self, packet):
        norms, signed = packet.fields
        values = self.buckets(signed).float().mul_((norms / self.levels).unsqueeze(1))
        return values.view(-1)[:signed.numel()].to(packet.dtype).view(packet.shape)
