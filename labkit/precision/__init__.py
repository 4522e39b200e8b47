"""The numerics of one rank: number systems, summation and rounding (see docs/numerics.md).

- lns.py       the logarithmic number system: multiply = add, add through G; an LNS matmul
- kahan.py     Kahan (compensated) summation, and the naive sum to compare with
- rounding.py  round to nearest and stochastic rounding to bf16, fp16 and an 8-bit float
- mixed.py     mixed precision: autocast and dynamic loss scaling
- training.py  a small MLP trained in float, with LNS matmuls, with LNS everywhere, and with
               Kahan-compensated LNS weight updates: the seed-001 table
"""

from .kahan import KahanAccumulator, kahan_sum, naive_sum
from .lns import LNSFormat, LNSTensor, add, decode, div, encode, lns_matmul, mul, quantize
from .mixed import PRECISIONS, LossScaler, autocast, train_step
from .rounding import FORMATS, accumulate, round_nearest, round_stochastic, ulp

__all__ = [
    "KahanAccumulator", "kahan_sum", "naive_sum",
    "LNSFormat", "LNSTensor", "add", "decode", "div", "encode", "lns_matmul", "mul", "quantize",
    "PRECISIONS", "LossScaler", "autocast", "train_step",
    "FORMATS", "accumulate", "round_nearest", "round_stochastic", "ulp",
]
