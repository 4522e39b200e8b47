"""Convolution four ways: direct, im2col, FFT and Winograd, from the HPC keynote (Hoefler,
SC'19, "Computing convolutional layers"; the table of work and depth is Ben-Nun & Hoefler,
*Demystifying Parallel and Distributed Deep Learning*, 2018):

| method   | work W                                                        | depth D                         |
|----------|---------------------------------------------------------------|---------------------------------|
| direct   | N·C_out·H'·W'·C_in·K_y·K_x                                    | ⌈log2 C_in⌉+⌈log2 K_y⌉+⌈log2 K_x⌉ |
| im2col   | N·C_out·H'·W'·C_in·K_y·K_x                                    | ⌈log2 C_in⌉+⌈log2 K_y⌉+⌈log2 K_x⌉ |
| FFT      | c·HW·log2(HW)·(C_out·C_in + N·C_in + N·C_out) + HWN·C_in·C_out | 2⌈log2 HW⌉ + ⌈log2 C_in⌉         |
| Winograd | α(r² + αr + 2α² + αm + m²) + C_out·C_in·P                     | 2⌈log2 r⌉ + 4⌈log2 α⌉ + ⌈log2 C_in⌉ |

with m×m output tiles, r×r kernels, α = m + r − 1 (the tile of input one output tile needs;
the slide prints "m − r + 1", which is 0 for F(2×2, 3×3)) and P = N·⌈H/m⌉·⌈W/m⌉ tiles.

:func:`conv2d` computes what ``torch.nn.functional.conv2d`` computes (a cross-correlation, one
group, no dilation) by each method; with ``stats={}`` it also records the multiplications it
performed (counted at each product it issues) and the bytes of the workspace it allocated
(the buffers besides input, weights and output) — the memory the µ-cuDNN slides trade for
speed. :func:`work_depth` gives the table's numbers for the same shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ALGORITHMS = ("direct", "im2col", "fft", "winograd")
WINOGRAD_TILES = (2, 4)


def _pair(name: str, value, low: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in pair):
        raise ValueError(f"{name} must be an integer >= {low} or a pair of them, got {value!r}")
    return pair


def check_arguments(x_shape, w_shape, stride=1, padding=0, algorithm="direct", winograd_tile=2):
    """Validate shapes and settings; return (stride, padding, output height, output width)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    if len(x_shape) != 4:
        raise ValueError(f"x must be 4-D (N, C_in, H, W), got shape {tuple(x_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in, K_y, K_x), got shape {tuple(w_shape)}")
    if x_shape[1] != w_shape[1]:
        raise ValueError(f"weight has {w_shape[1]} input channels but x has {x_shape[1]}")
    stride, padding = _pair("stride", stride, 1), _pair("padding", padding, 0)
    out_h = (x_shape[2] + 2 * padding[0] - w_shape[2]) // stride[0] + 1
    out_w = (x_shape[3] + 2 * padding[1] - w_shape[3]) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"weight {tuple(w_shape[2:])} is larger than the padded input "
                         f"{(x_shape[2] + 2 * padding[0], x_shape[3] + 2 * padding[1])}")
    if algorithm == "winograd":
        if tuple(w_shape[2:]) != (3, 3):
            raise ValueError(f"algorithm 'winograd' needs a 3x3 kernel, got {w_shape[2]}x{w_shape[3]}")
        if stride != (1, 1):
            raise ValueError(f"algorithm 'winograd' needs stride 1, got {stride}")
        if winograd_tile not in WINOGRAD_TILES:
            raise ValueError(f"winograd_tile must be 2 (F(2x2,3x3)) or 4 (F(4x4,3x3)), got {winograd_tile!r}")
    return stride, padding, out_h, out_w


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, algorithm: str = "direct", *,
           bias: torch.Tensor | None = None, winograd_tile: int = 2, stats: dict | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` computed by ``algorithm``.

    ``stats``, a dict, receives ``multiplications`` and ``workspace_bytes``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dtype != x.dtype:
        raise ValueError("weight must be a tensor of x's dtype")
    stride, padding, out_h, out_w = check_arguments(x.shape, weight.shape, stride, padding, algorithm, winograd_tile)
    record = {"multiplications": 0, "workspace_bytes": 0}
    if algorithm == "direct":
        y = _direct(x, weight, stride, padding, out_h, out_w, record)
    elif algorithm == "im2col":
        y = _im2col(x, weight, stride, padding, out_h, out_w, record)
    elif algorithm == "fft":
        y = _fft(x, weight, stride, padding, out_h, out_w, record)
    else:
        y = _winograd(x, weight, padding, out_h, out_w, winograd_tile, record)
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        y = y + bias.view(1, -1, 1, 1)
    if stats is not None:
        stats.update(record)
    return y


def _direct(x, weight, stride, padding, out_h, out_w, record):
    """Seven nested loops, the two over the kernel written out: each kernel tap multiplies a
    strided window of the input by a C_out × C_in matrix and adds into the output."""
    n, c_in = x.shape[:2]
    c_out, _, k_y, k_x = weight.shape
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    out = x.new_zeros(n, c_out, out_h, out_w)
    for ky in range(k_y):
        for kx in range(k_x):
            window = xp[:, :, ky:ky + stride[0] * (out_h - 1) + 1:stride[0],
                        kx:kx + stride[1] * (out_w - 1) + 1:stride[1]]
            out += torch.einsum("nchw,oc->nohw", window, weight[:, :, ky, kx])
            record["multiplications"] += n * c_out * out_h * out_w * c_in
    record["workspace_bytes"] += xp.nbytes if any(padding) else 0
    return out


def _im2col(x, weight, stride, padding, out_h, out_w, record):
    """Unfold every receptive field into a column (K_y·K_x·C_in values), then one GEMM."""
    n = x.shape[0]
    c_out = weight.shape[0]
    columns = F.unfold(x, weight.shape[2:], padding=padding, stride=stride)  # (N, C_in·K_y·K_x, H'·W')
    out = weight.reshape(c_out, -1) @ columns
    record["multiplications"] += n * c_out * columns.shape[1] * columns.shape[2]
    record["workspace_bytes"] += columns.nbytes
    return out.view(n, c_out, out_h, out_w)


def _fft(x, weight, stride, padding, out_h, out_w, record):
    """Correlation theorem: transform input and kernels to the frequency domain, multiply
    pointwise (summing over C_in), transform back, keep the valid (and strided) outputs."""
    n, c_in = x.shape[:2]
    c_out, _, k_y, k_x = weight.shape
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    size = xp.shape[2:]
    x_freq = torch.fft.rfft2(xp)
    w_freq = torch.fft.rfft2(weight, s=size)
    product = torch.einsum("nchw,ochw->nohw", x_freq, w_freq.conj())
    freq_points = size[0] * (size[1] // 2 + 1)
    record["multiplications"] += 4 * n * c_out * c_in * freq_points  # complex products, 4 real each
    full = torch.fft.irfft2(product, s=size)
    record["workspace_bytes"] += sum(t.nbytes for t in (xp, x_freq, w_freq, product, full)) - (0 if any(padding) else xp.nbytes)
    return full[:, :, :stride[0] * (out_h - 1) + 1:stride[0], :stride[1] * (out_w - 1) + 1:stride[1]].contiguous()


# Winograd transforms (Lavin and Gray, Fast Algorithms for Convolutional Neural Networks, CVPR'16):
# 1-D F(m, 3) computes m outputs y_i = Σ_k d_{i+k} g_k as A^T [(G g) ⊙ (B^T d)]; 2-D nests it.
WINOGRAD = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


def winograd_matrices(m: int, dtype=torch.float64):
    """(B^T, G, A^T) of F(m×m, 3×3): B^T is α×α, G α×3, A^T m×α, α = m + 2."""
    if m not in WINOGRAD:
        raise ValueError(f"winograd_tile must be 2 or 4, got {m!r}")
    return tuple(torch.tensor(t, dtype=dtype) for t in WINOGRAD[m])


def _winograd(x, weight, padding, out_h, out_w, m, record):
    """F(m×m, 3×3): per input tile d (α×α, tiles overlapping by 2) and kernel g,
    Y = A^T [(G g G^T) ⊙ (B^T d B)] A; the ⊙ summed over C_in is α² matrix products."""
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    bt, g, at = winograd_matrices(m, x.dtype)
    alpha = m + 2
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    # pad so that the tiles cover the output: tiles·m + 2 rows and columns
    extra_h = tiles_h * m + 2 - (x.shape[2] + 2 * padding[0])
    extra_w = tiles_w * m + 2 - (x.shape[3] + 2 * padding[1])
    xp = F.pad(x, (padding[1], padding[1] + extra_w, padding[0], padding[0] + extra_h))
    tiles = xp.unfold(2, alpha, m).unfold(3, alpha, m)  # (N, C_in, tiles_h, tiles_w, α, α)
    v = bt @ tiles @ bt.T
    u = g @ weight @ g.T  # (C_out, C_in, α, α)
    product = torch.einsum("ncpqij,ocij->nopqij", v, u)
    record["multiplications"] += n * c_out * c_in * tiles_h * tiles_w * alpha * alpha
    y = at @ product @ at.T  # (N, C_out, tiles_h, tiles_w, m, m)
    record["workspace_bytes"] += sum(t.nbytes for t in (xp, v, u, product, y))
    y = y.permute(0, 1, 2, 4, 3, 5).reshape(n, c_out, tiles_h * m, tiles_w * m)
    return y[:, :, :out_h, :out_w].contiguous()


def _log2_ceil(value: int) -> int:
    return math.ceil(math.log2(value)) if value > 1 else 0


def work_depth(algorithm: str, x_shape, w_shape, stride=1, padding=0, winograd_tile: int = 2,
               fft_constant: float = 1.0) -> tuple[float, int]:
    """(work W, depth D) of the table for these shapes (H, W: the padded input; c: ``fft_constant``)."""
    stride, padding, out_h, out_w = check_arguments(x_shape, w_shape, stride, padding, algorithm, winograd_tile)
    n, c_in, h, w = x_shape
    h, w = h + 2 * padding[0], w + 2 * padding[1]
    c_out, _, k_y, k_x = w_shape
    if algorithm in ("direct", "im2col"):
        return (n * c_out * out_h * out_w * c_in * k_y * k_x,
                _log2_ceil(c_in) + _log2_ceil(k_y) + _log2_ceil(k_x))
    if algorithm == "fft":
        hw = h * w
        return (fft_constant * hw * math.log2(hw) * (c_out * c_in + n * c_in + n * c_out) + hw * n * c_in * c_out,
                2 * _log2_ceil(hw) + _log2_ceil(c_in))
    m, r = winograd_tile, 3
    alpha = m + r - 1
    tiles = n * -(-out_h // m) * -(-out_w // m)
    return (alpha * (r * r + alpha * r + 2 * alpha**2 + alpha * m + m * m) + c_out * c_in * tiles,
            2 * _log2_ceil(r) + 4 * _log2_ceil(alpha) + _log2_ceil(c_in))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (one group, no dilation) whose forward is :func:`conv2d` with ``algorithm``."""

    def __init__(self, *args, algorithm: str = "direct", winograd_tile: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        set_algorithm(self, algorithm, winograd_tile)

    def forward(self, x):
        return conv2d(x, self.weight, self.stride, self.padding, self.algorithm, bias=self.bias,
                      winograd_tile=self.winograd_tile)


def set_algorithm(conv: nn.Conv2d, algorithm: str, winograd_tile: int = 2) -> None:
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError("conv-algorithm: only convolutions with one group, no dilation and zero padding")
    if not isinstance(conv.padding, tuple):
        raise ValueError(f"conv-algorithm: padding {conv.padding!r} must be numbers")
    check_arguments((1, conv.in_channels, 64, 64), conv.weight.shape, conv.stride, conv.padding,
                    algorithm, winograd_tile)
    conv.algorithm, conv.winograd_tile = algorithm, winograd_tile


def use_conv_algorithm(model: nn.Module, algorithm: str, winograd_tile: int = 2) -> nn.Module:
    """Make every ``nn.Conv2d`` of ``model`` compute with ``algorithm`` (``--conv-algorithm``)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"--conv-algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    for module in model.modules():
        if type(module) is nn.Conv2d:
            set_algorithm(module, algorithm, winograd_tile)
            module.__class__ = Conv2d
    return model
