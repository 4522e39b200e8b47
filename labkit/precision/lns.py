"""The logarithmic number system (LNS), from "Deep Learning and Hardware" (Chuangsuwanich,
slides "Are other numeric representations also possible?" with Singular Computing).

A number X is stored as its sign and x = log2|X| in fixed point with ``frac_bits`` fraction
bits (1.2345 is stored as log2(1.2345) = 0.30392...). Then

- multiply and divide are add and subtract: log(B·C) = b + c, log(B/C) = b − c;
- add goes through G: log(B + C) = b + G(c − b), G(x) = log2(1 + 2^x) for equal signs, and
  log2(1 − 2^x) (written G⁻ here) for opposite signs; with b the larger, x = c − b ≤ 0.

Hardware reads G from a table indexed by x; ``LNSFormat(g="table")`` does that, with a table
of ``table_frac_bits`` fraction bits of x (a full table, ``table_frac_bits = frac_bits``,
gives the correctly rounded sum; a coarser, smaller one loses accuracy). ``g="exact"``
computes G in float64 and rounds once: the reference.

Logs are integers (units of 2^-frac_bits) in int64 tensors; the log range is
[-2^(int_bits-1), 2^(int_bits-1)): a result below it is zero (underflow), above it saturates.
Everything works elementwise on tensors, so an LNS matrix multiply is a loop of vectorized
LNS multiply-adds (:func:`lns_matmul`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

MAX_FRAC_BITS = 20
MAX_INT_BITS = 16
# The log kept for zero: far below any format's range, so that zero needs no special case in
# add (its difference to any number is beyond the G table) and a product with it underflows.
ZERO_LOG = -(1 << 50)


@dataclass(frozen=True)
class LNSFormat:
    """Sign + fixed-point log2: ``frac_bits`` fraction bits, ``int_bits`` integer bits (signed)."""

    frac_bits: int = 10
    int_bits: int = 8
    g: str = "table"  # "table" (a lookup table, as hardware) or "exact" (float64, rounded once)
    table_frac_bits: int | None = None  # index resolution of the table (default frac_bits)

    def __post_init__(self):
        if not isinstance(self.frac_bits, int) or not 1 <= self.frac_bits <= MAX_FRAC_BITS:
            raise ValueError(f"frac_bits must be an integer in [1, {MAX_FRAC_BITS}], got {self.frac_bits!r}")
        if not isinstance(self.int_bits, int) or not 2 <= self.int_bits <= MAX_INT_BITS:
            raise ValueError(f"int_bits must be an integer in [2, {MAX_INT_BITS}], got {self.int_bits!r}")
        if self.g not in ("table", "exact"):
            raise ValueError(f"g must be 'table' or 'exact', got {self.g!r}")
        if self.table_frac_bits is not None and (
                not isinstance(self.table_frac_bits, int) or not 0 <= self.table_frac_bits <= self.frac_bits):
            raise ValueError(f"table_frac_bits must be an integer in [0, frac_bits={self.frac_bits}], "
                             f"got {self.table_frac_bits!r}")

    @property
    def scale(self) -> int:
        """Units of the fixed-point log per 1.0 of log2."""
        return 1 << self.frac_bits

    @property
    def log_min(self) -> int:
        return -(1 << (self.int_bits - 1)) * self.scale

    @property
    def log_max(self) -> int:
        return (1 << (self.int_bits - 1)) * self.scale - 1

    @property
    def index_bits(self) -> int:
        return self.frac_bits if self.table_frac_bits is None else self.table_frac_bits

    @property
    def table_entries(self) -> int:
        """Entries of each G table (G and G⁻): x from 0 down to where G rounds to 0."""
        return _tables(self.frac_bits, self.index_bits)[0].numel()

    @property
    def relative_spacing(self) -> float:
        """Gap between neighbouring LNS numbers, relative to them: 2^(2^-f) − 1."""
        return 2.0 ** (1.0 / self.scale) - 1.0


@dataclass
class LNSTensor:
    """Numbers in LNS: ``sign`` in {-1, 0, 1} and ``log`` (int64 units of 2^-frac_bits);
    zero is sign 0 with log ZERO_LOG."""

    sign: torch.Tensor
    log: torch.Tensor
    fmt: LNSFormat

    @property
    def shape(self):
        return self.sign.shape

    def to_float(self, dtype=torch.float64) -> torch.Tensor:
        return decode(self, dtype)

    def __mul__(self, other):
        return mul(self, other)

    def __truediv__(self, other):
        return div(self, other)

    def __add__(self, other):
        return add(self, other)

    def __sub__(self, other):
        return add(self, negate(other))

    def __neg__(self):
        return negate(self)

    def __repr__(self):
        return f"LNSTensor({self.to_float().tolist()}, frac_bits={self.fmt.frac_bits})"


def _check_format(fmt) -> LNSFormat:
    if not isinstance(fmt, LNSFormat):
        raise ValueError(f"fmt must be an LNSFormat, got {type(fmt).__name__}")
    return fmt


def _same_format(a: LNSTensor, b: LNSTensor) -> LNSFormat:
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, LNSTensor):
            raise ValueError(f"{name} must be an LNSTensor, got {type(value).__name__}")
    if a.fmt != b.fmt:
        raise ValueError(f"a and b have different LNS formats: {a.fmt} and {b.fmt}")
    return a.fmt


def _normalize(sign: torch.Tensor, log: torch.Tensor, fmt: LNSFormat) -> LNSTensor:
    """Underflow to zero (sign 0, log ZERO_LOG), saturate on overflow."""
    underflow = log < fmt.log_min
    return LNSTensor(sign.masked_fill(underflow, 0), log.clamp(max=fmt.log_max).masked_fill(underflow, ZERO_LOG), fmt)


def encode(x, fmt: LNSFormat = LNSFormat()) -> LNSTensor:
    """The LNS number nearest (in log) to each value of ``x``."""
    fmt = _check_format(fmt)
    x = torch.as_tensor(x, dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite to encode it in LNS")
    sign = torch.sign(x).to(torch.int8)
    magnitude = torch.where(x == 0, torch.ones_like(x), x.abs())
    log = torch.round(torch.log2(magnitude) * fmt.scale).to(torch.int64)
    return _normalize(sign, log.masked_fill(x == 0, ZERO_LOG), fmt)


def decode(a: LNSTensor, dtype=torch.float64) -> torch.Tensor:
    """The real numbers ``a`` stands for."""
    value = torch.exp2(a.log.to(torch.float64) / a.fmt.scale)
    return (a.sign.to(torch.float64) * value).to(dtype)


def quantize(x, fmt: LNSFormat = LNSFormat()) -> torch.Tensor:
    """``x`` rounded to the nearest LNS numbers, as floats of x's dtype."""
    x = torch.as_tensor(x)
    return decode(encode(x, fmt), x.dtype if x.is_floating_point() else torch.float64)


def negate(a: LNSTensor) -> LNSTensor:
    return LNSTensor(-a.sign, a.log, a.fmt)


def mul(a: LNSTensor, b: LNSTensor) -> LNSTensor:
    """a·b: the logs add, the signs multiply."""
    fmt = _same_format(a, b)
    return _normalize(a.sign * b.sign, a.log + b.log, fmt)


def div(a: LNSTensor, b: LNSTensor) -> LNSTensor:
    """a/b: the logs subtract. Division by an LNS zero is a ValueError."""
    fmt = _same_format(a, b)
    if (b.sign == 0).any():
        raise ValueError("b has zeros: division by zero in LNS")
    return _normalize(a.sign * b.sign, a.log - b.log, fmt)


def g_plus(x: torch.Tensor) -> torch.Tensor:
    """G(x) = log2(1 + 2^x), for x ≤ 0 (float64)."""
    return torch.log2(1 + torch.exp2(x))


def g_minus(x: torch.Tensor) -> torch.Tensor:
    """G⁻(x) = log2(1 − 2^x), for x < 0 (float64; -inf at 0)."""
    return torch.log2(-torch.expm1(x * math.log(2)))


@lru_cache(maxsize=16)
def _tables(frac_bits: int, index_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G and G⁻ in log units at x = -i·2^-index_bits, i = 0, 1, ..., until G rounds to 0."""
    # |G(x)| ≈ 2^x / ln 2 < half a unit once x < -(frac_bits + 1.53): stop at -(frac_bits + 3)
    entries = (frac_bits + 3) * (1 << index_bits) + 1
    x = -torch.arange(entries, dtype=torch.float64) / (1 << index_bits)
    scale = 1 << frac_bits
    plus = torch.round(g_plus(x) * scale).to(torch.int64)
    minus = g_minus(x) * scale
    minus[0] = -math.inf  # x = 0: B − B = 0
    minus = torch.round(minus.clamp(min=-(1 << 62))).to(torch.int64)
    return plus, minus


def _g(difference: torch.Tensor, same_sign: torch.Tensor, fmt: LNSFormat) -> torch.Tensor:
    """G(d) or G⁻(d) in log units, for d = smaller − larger log (units, ≤ 0)."""
    if fmt.g == "exact":
        x = (difference.to(torch.float64) / fmt.scale).clamp(min=-1e6)
        minus = torch.where(difference == 0, torch.full_like(x, -math.inf), g_minus(x.clamp(max=-1e-300)))
        value = torch.where(same_sign, g_plus(x), minus) * fmt.scale
        return torch.round(value.clamp(min=-(2.0**62))).to(torch.int64)
    plus_table, minus_table = _tables(fmt.frac_bits, fmt.index_bits)
    last = plus_table.numel() - 1
    index = (-difference) >> (fmt.frac_bits - fmt.index_bits)  # the table's index: top bits of |d|
    if fmt.index_bits < fmt.frac_bits:  # a nonzero d must not read G⁻(0) = -inf
        index = index.masked_fill((difference != 0) & (index == 0), 1)
    beyond = index > last
    index = index.clamp(max=last)
    return torch.where(same_sign, plus_table[index], minus_table[index]).masked_fill(beyond, 0)


def add(a: LNSTensor, b: LNSTensor) -> LNSTensor:
    """a + b = larger · (1 ± smaller/larger): log = larger log + G(smaller log − larger log).

    Zero needs no case of its own: its log, ZERO_LOG, is beyond the table, so G adds 0.
    """
    fmt = _same_format(a, b)
    a_larger = a.log >= b.log
    hi_log = torch.maximum(a.log, b.log)
    hi_sign = torch.where(a_larger, a.sign, b.sign)
    correction = _g(torch.minimum(a.log, b.log) - hi_log, a.sign == b.sign, fmt)
    return _normalize(hi_sign, hi_log + correction, fmt)


def lns_sum(a: LNSTensor, dim: int = 0) -> LNSTensor:
    """Sum along ``dim``, one LNS add after another (as an accumulator would)."""
    sign, log = a.sign.movedim(dim, 0), a.log.movedim(dim, 0)
    total = LNSTensor(sign[0], log[0], a.fmt)
    for i in range(1, sign.shape[0]):
        total = add(total, LNSTensor(sign[i], log[i], a.fmt))
    return total


def _pairwise_sum(a: LNSTensor, dim: int) -> LNSTensor:
    """Sum along ``dim`` as a tree: halves added elementwise until one row is left."""
    sign, log = a.sign.movedim(dim, 0), a.log.movedim(dim, 0)
    while sign.shape[0] > 1:
        half = sign.shape[0] // 2
        total = add(LNSTensor(sign[:half], log[:half], a.fmt),
                    LNSTensor(sign[half:2 * half], log[half:2 * half], a.fmt))
        if sign.shape[0] % 2:
            sign = torch.cat([total.sign, sign[-1:]])
            log = torch.cat([total.log, log[-1:]])
        else:
            sign, log = total.sign, total.log
    return LNSTensor(sign[0], log[0], a.fmt)


def lns_matmul(a, b, fmt: LNSFormat = LNSFormat(), out_dtype=torch.float32,
               accumulate: str = "pairwise") -> torch.Tensor:
    """``a @ b`` computed in LNS: inputs rounded to LNS, products as log adds, the sums of
    products with LNS adds (through G) along the inner dimension.

    ``accumulate="sequential"`` adds the k products one after another, as one accumulator
    would; ``"pairwise"`` adds them as a tree (log2 k rounds of vectorized adds: the same
    arithmetic in another order, much faster here, and what a parallel adder tree does).
    ``a`` (n, k) and ``b`` (k, m) are float tensors (or LNSTensors of ``fmt``); returns floats.
    """
    if accumulate not in ("sequential", "pairwise"):
        raise ValueError(f"accumulate must be 'sequential' or 'pairwise', got {accumulate!r}")
    fmt = _check_format(fmt)
    a = a if isinstance(a, LNSTensor) else encode(_matrix("a", a), fmt)
    b = b if isinstance(b, LNSTensor) else encode(_matrix("b", b), fmt)
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a and b must be matrices (n, k) and (k, m), got {tuple(a.shape)} and {tuple(b.shape)}")
    n, k = a.shape
    m = b.shape[1]
    if accumulate == "pairwise":
        products = _normalize(a.sign[:, :, None] * b.sign[None, :, :], a.log[:, :, None] + b.log[None, :, :], fmt)
        return decode(_pairwise_sum(products, dim=1), out_dtype)
    total = LNSTensor(torch.zeros(n, m, dtype=torch.int8), torch.full((n, m), ZERO_LOG), fmt)
    for i in range(k):
        product = _normalize(a.sign[:, i, None] * b.sign[None, i, :], a.log[:, i, None] + b.log[None, i, :], fmt)
        total = add(total, product)
    return decode(total, out_dtype)


def _matrix(name, value) -> torch.Tensor:
    value = torch.as_tensor(value)
    if not value.is_floating_point() or value.dim() != 2:
        raise ValueError(f"{name} must be a 2-D float tensor, got {value.dtype} of shape {tuple(value.shape)}")
    return value
