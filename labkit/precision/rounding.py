"""Rounding to low-precision floats: to nearest, and stochastically.

"Quantization: the main trick is stochastic rounding, whose expectation is more accurate;
it enables low precision (half, quarter) to become standard" (Hoefler, SC'19, communication
optimizations; Gupta et al., *Deep Learning with Limited Numerical Precision*, 2015).

A value x between two neighbours lo < x < hi of the format rounds

- to nearest: to the closer one (ties to the even one) — deterministic, biased for a sum of
  small terms: an update smaller than half a unit in the last place is lost every time;
- stochastically: up with probability (x − lo)/(hi − lo), else down — unbiased, E[round(x)] = x,
  so small updates survive on average.

Formats are IEEE-like (sign, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits, subnormals,
overflow to inf): ``bf16`` (8, 7), ``fp16`` (5, 10) and ``fp8`` (5, 2), the E5M2 8-bit float.
The rounding is computed here, in float64, and returned in the input's dtype (the values are
exactly representable there); round-to-nearest is checked against torch's own casts to
``torch.bfloat16``, ``torch.float16`` and ``torch.float8_e5m2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    name: str
    exp_bits: int
    man_bits: int
    torch_dtype: torch.dtype

    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number (and of every subnormal's spacing)."""
        return 1 - self.bias

    @property
    def max_value(self) -> float:
        return (2 - 2.0**-self.man_bits) * 2.0**self.bias

    @property
    def epsilon(self) -> float:
        """Spacing of the numbers just above 1."""
        return 2.0**-self.man_bits


FORMATS = {
    "bf16": FloatFormat("bf16", 8, 7, torch.bfloat16),
    "fp16": FloatFormat("fp16", 5, 10, torch.float16),
    "fp8": FloatFormat("fp8", 5, 2, torch.float8_e5m2),
}


def float_format(name) -> FloatFormat:
    if isinstance(name, FloatFormat):
        return name
    if name not in FORMATS:
        raise ValueError(f"fmt {name!r}: unknown format; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def _prepare(x):
    x = torch.as_tensor(x)
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be a float32 or float64 tensor, got {x.dtype}")
    return x, x.to(torch.float64)


def ulp(x, fmt="bf16") -> torch.Tensor:
    """The spacing of ``fmt``'s numbers around each value of ``x`` (float64)."""
    fmt = float_format(fmt)
    _, x64 = _prepare(x)
    _, exponent = torch.frexp(x64)  # x = m · 2^exponent, 0.5 <= |m| < 1
    exponent = (exponent - 1).clamp(min=fmt.min_exponent)
    return torch.ldexp(torch.ones_like(x64), (exponent - fmt.man_bits).to(torch.int32))


def _overflow(rounded: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    return torch.where(rounded.abs() > fmt.max_value, torch.sign(rounded) * torch.inf, rounded)


def round_nearest(x, fmt="bf16") -> torch.Tensor:
    """``x`` rounded to the nearest number of ``fmt`` (ties to even), in x's dtype."""
    fmt = float_format(fmt)
    x, x64 = _prepare(x)
    spacing = ulp(x64, fmt)
    rounded = torch.round(x64 / spacing) * spacing  # torch.round: half to even
    return _overflow(rounded, fmt).to(x.dtype)


def round_stochastic(x, fmt="bf16", generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` rounded up or down to a neighbour in ``fmt``, up with probability equal to the
    distance from the lower neighbour in units of the spacing: unbiased. In x's dtype."""
    fmt = float_format(fmt)
    x, x64 = _prepare(x)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    spacing = ulp(x64, fmt)
    scaled = x64 / spacing
    lower = torch.floor(scaled)
    up = torch.rand(x64.shape, generator=generator, dtype=torch.float64) < (scaled - lower)
    rounded = (lower + up.to(torch.float64)) * spacing
    return _overflow(rounded, fmt).to(x.dtype)


def accumulate(start, update: float, steps: int, fmt="bf16", rounding: str = "nearest",
               seed: int = 0) -> torch.Tensor:
    """w ← round(w + update), ``steps`` times, every w kept in ``fmt``: the fate of small weight
    updates in low precision (001.12). ``start`` is a number or a tensor of independent
    weights. Returns the trajectory, float64: (steps + 1,) or (steps + 1, *start.shape)."""
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    generator = torch.Generator().manual_seed(seed)
    w = round_nearest(torch.as_tensor(start, dtype=torch.float64), fmt)
    out = [w]
    for _ in range(steps):
        exact = w + update
        w = round_nearest(exact, fmt) if rounding == "nearest" else round_stochastic(exact, fmt, generator)
        out.append(w)
    return torch.stack(out)
