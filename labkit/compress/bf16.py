"""bfloat16: float32's 8-bit exponent with a 7-bit mantissa, 2 bytes per value."""

from __future__ import annotations

import torch

from .base import register_compressor
from .fp16 import FP16Compressor


@register_compressor("bf16", help="bfloat16 floats (float32's range, 8 bits of precision): 2 bytes per value",
                     params={}, summable=True, unbiased=False)
class BF16Compressor(FP16Compressor):
    """Cast to bfloat16 before sending, back after.

    The brain floating-point format of the TPU (Kalamkar et al., *A Study of BFLOAT16
    for Deep Learning Training*, 2019): it keeps float32's exponent, so it never
    overflows where float32 does not, at the price of a 7-bit mantissa (relative
    rounding error up to 2**-8 instead of float16's 2**-11). Hardware of this kind is
    the "ASICs (TPU)" part of Chuangsuwanich's *Deep Learning and Hardware*.
    """

    wire_dtype = torch.bfloat16
