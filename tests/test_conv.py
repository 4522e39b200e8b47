"""labkit.conv: every algorithm equals torch.nn.functional.conv2d; work, depth, counted
multiplications; the LeNet model computing with each algorithm."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from labkit.conv import ALGORITHMS, conv2d, use_conv_algorithm, winograd_matrices, work_depth
from labkit.models import build_model

# (N, C_in, C_out, H, W, kernel, stride, padding)
SHAPES = [(2, 3, 4, 9, 11, 3, 1, 1), (1, 2, 3, 8, 8, 3, 2, 0), (2, 1, 2, 7, 5, 5, 1, 2),
          (1, 3, 2, 10, 10, 1, 1, 0), (3, 2, 5, 12, 9, 3, 1, 0), (1, 4, 2, 6, 13, 3, 3, 2),
          (2, 2, 2, 5, 5, 2, 1, 1), (1, 1, 1, 3, 3, 3, 1, 0), (1, 2, 6, 16, 16, 3, 1, 1)]
CASES = [(algorithm, tile, shape) for algorithm, shape in itertools.product(ALGORITHMS, SHAPES)
         for tile in ((2, 4) if algorithm == "winograd" else (2,))
         if algorithm != "winograd" or (shape[5] == 3 and shape[6] == 1)]


def tensors(shape, dtype, seed=0):
    n, c_in, c_out, h, w, k, _, _ = shape
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c_in, h, w, generator=generator, dtype=dtype),
            torch.randn(c_out, c_in, k, k, generator=generator, dtype=dtype),
            torch.randn(c_out, generator=generator, dtype=dtype))


@pytest.mark.parametrize("algorithm, tile, shape", CASES, ids=lambda v: str(v))
def test_equals_torch_conv2d(algorithm, tile, shape):
    stride, padding = shape[6], shape[7]
    x, w, b = tensors(shape, torch.float64)
    expected = F.conv2d(x, w, b, stride=stride, padding=padding)
    got = conv2d(x, w, stride, padding, algorithm, bias=b, winograd_tile=tile)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-10
    # float32: within 1e-4 relative to the output's scale (F(4x4,3x3) amplifies rounding most)
    x32, w32, b32 = x.float(), w.float(), b.float()
    got32 = conv2d(x32, w32, stride, padding, algorithm, bias=b32, winograd_tile=tile)
    assert got32.dtype == torch.float32
    assert (got32.double() - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.mark.parametrize("algorithm", ["direct", "im2col"])
def test_counted_multiplications_equal_the_tables_work(algorithm):
    for shape in SHAPES:
        x, w, _ = tensors(shape, torch.float64)
        stats = {}
        conv2d(x, w, shape[6], shape[7], algorithm, stats=stats)
        work, depth = work_depth(algorithm, x.shape, w.shape, shape[6], shape[7])
        assert stats["multiplications"] == work
        assert depth == sum((max(v, 1) - 1).bit_length() for v in (shape[1], shape[5], shape[5]))


def test_winograd_saves_multiplications():
    x, w, _ = tensors((1, 8, 8, 32, 32, 3, 1, 1), torch.float64)
    direct, f2, f4 = {}, {}, {}
    conv2d(x, w, 1, 1, "direct", stats=direct)
    conv2d(x, w, 1, 1, "winograd", winograd_tile=2, stats=f2)
    conv2d(x, w, 1, 1, "winograd", winograd_tile=4, stats=f4)
    # F(2x2,3x3): 16 products for 4 outputs instead of 36; F(4x4,3x3): 36 for 16 instead of 144
    assert f2["multiplications"] / direct["multiplications"] == pytest.approx(16 / 36)
    assert f4["multiplications"] / direct["multiplications"] == pytest.approx(36 / 144)
    assert f2["workspace_bytes"] > 0 and direct["workspace_bytes"] < f2["workspace_bytes"]


def test_winograd_1d_identity():
    """A^T [(G g) ⊙ (B^T d)] is the correlation of d with g, for both tile sizes."""
    for m in (2, 4):
        bt, g, at = winograd_matrices(m)
        d, kernel = torch.randn(m + 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        expected = torch.stack([(d[i:i + 3] * kernel).sum() for i in range(m)])
        assert torch.allclose(at @ ((g @ kernel) * (bt @ d)), expected, atol=1e-12)


def test_work_depth_formulas():
    shape_x, shape_w = (4, 16, 32, 32), (32, 16, 3, 3)
    assert work_depth("direct", shape_x, shape_w, 1, 1) == (4 * 32 * 32 * 32 * 16 * 9, 4 + 2 + 2)
    hw = 34 * 34
    work, depth = work_depth("fft", shape_x, shape_w, 1, 1, fft_constant=2.0)
    assert work == pytest.approx(2 * hw * torch.log2(torch.tensor(hw, dtype=torch.float64)).item()
                                 * (32 * 16 + 4 * 16 + 4 * 32) + hw * 4 * 16 * 32)
    assert depth == 2 * 11 + 4
    alpha, tiles = 4, 4 * 16 * 16
    assert work_depth("winograd", shape_x, shape_w, 1, 1) == (
        alpha * (9 + alpha * 3 + 2 * alpha**2 + alpha * 2 + 4) + 32 * 16 * tiles, 2 * 2 + 4 * 2 + 4)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_lenet_computes_with_each_algorithm(algorithm):
    reference = build_model("lenet", (1, 8, 8), 10, seed=0).double()
    model = use_conv_algorithm(build_model("lenet", (1, 8, 8), 10, seed=0).double(), algorithm)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    F.cross_entropy(reference(x), y).backward()
    F.cross_entropy(model(x), y).backward()
    assert torch.allclose(model(x), reference(x), atol=1e-10)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10)  # autograd through every algorithm


@pytest.mark.parametrize("call, message", [
    (lambda x, w: conv2d(x, w, algorithm="gemm"), "algorithm 'gemm': choose one of"),
    (lambda x, w: conv2d(x, torch.randn(2, 3, 5, 5), algorithm="winograd"), "needs a 3x3 kernel, got 5x5"),
    (lambda x, w: conv2d(x, w, stride=2, algorithm="winograd"), "needs stride 1"),
    (lambda x, w: conv2d(x, w, algorithm="winograd", winograd_tile=3), "winograd_tile must be 2"),
    (lambda x, w: conv2d(x, w, stride=0), "stride must be an integer >= 1"),
    (lambda x, w: conv2d(x, w, padding=-1), "padding must be an integer >= 0"),
    (lambda x, w: conv2d(x, torch.randn(2, 4, 3, 3)), "weight has 4 input channels but x has 3"),
    (lambda x, w: conv2d(x[0], w), "x must be 4-D"),
    (lambda x, w: conv2d(x, torch.randn(2, 3, 9, 9)), "larger than the padded input"),
    (lambda x, w: use_conv_algorithm(torch.nn.Conv2d(1, 1, 3), "gemm"), "--conv-algorithm 'gemm'"),
    (lambda x, w: use_conv_algorithm(torch.nn.Conv2d(1, 1, 5), "winograd"), "needs a 3x3 kernel"),
])
def test_bad_arguments_are_value_errors_naming_them(call, message):
    with pytest.raises(ValueError) as info:
        call(torch.randn(1, 3, 6, 6), torch.randn(2, 3, 3, 3))
    assert message in str(info.value)
