"""Properties of every registered compressor: round trips, exact wire size, unbiasedness,
error feedback, and the accuracy each scheme promises."""

from __future__ import annotations

import math
import re

import pytest
import torch

from labkit.compress import Packet, available_compressors, make_compressor
from labkit.compress.base import index_dtype, pack_bits, unpack_bits
from labkit.compress.powersgd import orthogonalize
from labkit.compress.topk import largest_magnitudes
from labkit.registry import COMPRESSORS

ALL = available_compressors()
SIGN_ONLY = {"signsgd", "signum"}  # decompress to +-1 whatever the magnitude
SHAPES = [(1,), (7,), (1001,), (3, 4, 5, 7), (2, 3, 1, 5)]


def sample(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def round_trip(name, x, **params):
    compressor = make_compressor(name, error_feedback=False, **params)
    return compressor.decompress(compressor.compress(x))


# --- the wire size of each encoding, written out independently of the code ----------------
def header(ndim, fields):
    return 3 + fields + 8 * (ndim + fields)


def index_bytes(numel):
    return 1 if numel <= 2**8 else 2 if numel <= 2**16 else 4 if numel <= 2**32 else 8


def kept(ratio, numel):
    return min(numel, max(1, round(ratio * numel)))


def sparse_bytes(x, count):
    return header(x.dim(), 2) + count * (index_bytes(x.numel()) + x.element_size())


def powersgd_bytes(x, rank=2):
    if x.dim() < 2:
        return header(x.dim(), 1) + x.numel() * x.element_size()
    rows, cols = x.shape[0], x.numel() // x.shape[0]
    r = min(rank, rows, cols)
    return header(x.dim(), 2) + (rows + cols) * r * x.element_size()


WIRE_BYTES = {  # default parameters; d = number of dimensions, n = number of values
    "none": lambda x: header(x.dim(), 1) + x.numel() * x.element_size(),
    "fp16": lambda x: header(x.dim(), 1) + 2 * x.numel(),
    "bf16": lambda x: header(x.dim(), 1) + 2 * x.numel(),
    "8bit": lambda x: header(x.dim(), 2) + 4 + x.numel(),
    "qsgd": lambda x: header(x.dim(), 2) + 4 * math.ceil(x.numel() / 512) + x.numel(),
    "terngrad": lambda x: header(x.dim(), 2) + 4 + math.ceil(x.numel() / 4),
    "natural": lambda x: header(x.dim(), 2) + x.numel() + math.ceil(x.numel() / 8),
    "onebit": lambda x: header(x.dim(), 2) + 2 * 4 + math.ceil(x.numel() / 8),
    "signsgd": lambda x: header(x.dim(), 1) + math.ceil(x.numel() / 8),
    "signum": lambda x: header(x.dim(), 1) + math.ceil(x.numel() / 8),
    "efsignsgd": lambda x: header(x.dim(), 2) + 4 + math.ceil(x.numel() / 8),
    "topk": lambda x: sparse_bytes(x, kept(0.01, x.numel())),
    "randomk": lambda x: sparse_bytes(x, kept(0.01, x.numel())),
    "threshold": lambda x: sparse_bytes(x, int((x.abs() >= 0.01).sum())),
    "dgc": lambda x: sparse_bytes(x, kept(0.25, x.numel())),  # first step of the warm-up: 25 %
    "powersgd": powersgd_bytes,
}


# --- registry and construction ----------------------------------------------------------------
def test_every_compressor_has_a_wire_formula_here():
    assert sorted(WIRE_BYTES) == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_registry_entry_declares_params_and_properties(name):
    meta = COMPRESSORS.entry(name).meta
    assert isinstance(meta["params"], dict)
    assert isinstance(meta["summable"], bool) and isinstance(meta["unbiased"], bool)
    assert meta["validate"](dict(meta["params"])) is None
    compressor = make_compressor(name)
    assert compressor.name == name and compressor.memory is not None
    doc = type(compressor).__doc__
    assert re.search(r"(19|20)\d\d", doc), f"{name}: the docstring should name its paper and year"


def test_unknown_compressor_is_a_value_error():
    with pytest.raises(ValueError, match="unknown compressor 'zip'.*topk"):
        make_compressor("zip")


@pytest.mark.parametrize("name, params, words", [
    ("topk", {"levels": 4}, ["'topk'", "'levels'", "ratio"]),
    ("fp16", {"ratio": 0.1}, ["'fp16'", "'ratio'", "no parameters"]),
    ("topk", {"ratio": 0.0}, ["'topk'", "'ratio'", "(0, 1]"]),
    ("topk", {"ratio": 1.5}, ["'ratio'", "(0, 1]"]),
    ("topk", {"ratio": "a lot"}, ["'ratio'", "number"]),
    ("topk", {"ratio": float("nan")}, ["'ratio'", "number"]),
    ("qsgd", {"levels": 0}, ["'qsgd'", "'levels'", "1 to 32767"]),
    ("qsgd", {"levels": 2.5}, ["'levels'", "whole number"]),
    ("qsgd", {"levels": True}, ["'levels'", "number"]),
    ("randomk", {"scale": 1}, ["'scale'", "true or false"]),
    ("signum", {"momentum": 1.0}, ["'momentum'", "[0, 1)"]),
    ("dgc", {"warmup_steps": -1}, ["'warmup_steps'", ">= 0"]),
    ("threshold", {"threshold": -0.1}, ["'threshold'", ">= 0"]),
    ("powersgd", {"rank": 0}, ["'powersgd'", "'rank'", ">= 1"]),
])
def test_bad_parameters_are_one_line_value_errors(name, params, words):
    with pytest.raises(ValueError) as error:
        make_compressor(name, **params)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert COMPRESSORS.entry(name).meta["validate"](params) == message


def test_parameters_take_the_type_of_their_default():
    assert make_compressor("qsgd", levels=15.0).levels == 15
    assert make_compressor("topk", ratio=1).ratio == 1.0


# --- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_survive(name, dtype):
    for shape in SHAPES:
        x = sample(shape, dtype)
        original = x.clone()
        compressor = make_compressor(name)
        packet = compressor.compress(x, key="w")
        out = compressor.decompress(packet)
        assert torch.equal(x, original), "compress must not change its input"
        assert out.shape == x.shape and out.dtype == dtype, (shape, dtype)
        assert torch.isfinite(out).all()
        again = compressor.decompress(Packet.from_wire(packet.to_wire()))
        assert torch.equal(again, out)


@pytest.mark.parametrize("name", ALL)
def test_zeros(name):
    x = torch.zeros(3, 5, 7)
    out = round_trip(name, x)
    expected = torch.ones_like(x) if name in SIGN_ONLY else x
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", ALL)
def test_nbytes_is_the_encoding_and_the_wire(name):
    for shape in [(1,), (7,), (300,), (3, 4, 5, 7), (70000,)]:
        for dtype in (torch.float32, torch.float64):
            x = sample(shape, dtype) * 0.02
            packet = make_compressor(name, error_feedback=False).compress(x)
            assert packet.nbytes == WIRE_BYTES[name](x), (shape, dtype)
            assert packet.to_wire().dtype == torch.uint8
            assert packet.to_wire().numel() == packet.nbytes


def test_qsgd_uses_16_bit_levels_beyond_127():
    x = sample((1000,))
    packet = make_compressor("qsgd", levels=1000, bucket_size=100).compress(x)
    assert packet.nbytes == header(1, 2) + 4 * 10 + 2 * 1000


def test_from_wire_rejects_a_truncated_packet():
    wire = make_compressor("topk").compress(sample((500,))).to_wire()
    with pytest.raises(ValueError, match="header announces"):
        Packet.from_wire(wire[:-1])


def test_index_dtype_is_the_smallest_that_fits():
    assert index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.uint16
    assert index_dtype(65536) == torch.uint16
    assert index_dtype(65537) == torch.uint32
    assert index_dtype(2**32 + 1) == torch.int64


@pytest.mark.parametrize("width", [1, 2, 4])
def test_bit_packing_round_trip(width):
    codes = torch.randint(0, 2**width, (1003,), generator=torch.Generator().manual_seed(width)).to(torch.uint8)
    packed = pack_bits(codes, width)
    assert packed.numel() == math.ceil(1003 * width / 8)
    assert torch.equal(unpack_bits(packed, width, 1003), codes)
    assert int(pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1)) == 0b10000001


# --- unbiased compressors -------------------------------------------------------------------------
def mean_and_spread(name, x, draws, **params):
    compressor = make_compressor(name, error_feedback=False, **params)
    outputs = torch.stack([compressor.decompress(compressor.compress(x)) for _ in range(draws)]).double()
    return outputs.mean(0), outputs.std(0)


def looks_unbiased(x, mean, std, draws):
    """Every coordinate's mean within 5 standard errors of x (exact where nothing varies)."""
    tolerance = 5 * std / math.sqrt(draws) + 1e-6 * x.abs().double()
    return bool(((mean - x.double()).abs() <= tolerance).all())


UNBIASED = [(name, {}) for name in ALL if COMPRESSORS.entry(name).meta["unbiased"]]
UNBIASED.append(("randomk", {"scale": True, "ratio": 0.25}))


def test_the_unbiased_ones_are_those_expected():
    assert {name for name, _ in UNBIASED} >= {"qsgd", "terngrad", "natural", "randomk"}


@pytest.mark.parametrize("name, params", UNBIASED)
def test_unbiased_over_many_draws(name, params):
    torch.manual_seed(1)
    x = sample((64,), seed=3)
    draws = 2000
    mean, std = mean_and_spread(name, x, draws, **params)
    assert looks_unbiased(x, mean, std, draws)


@pytest.mark.parametrize("name", ["8bit", "topk", "onebit"])
def test_the_unbiasedness_check_catches_a_biased_compressor(name):
    torch.manual_seed(1)
    x = sample((64,), seed=3)
    mean, std = mean_and_spread(name, x, 50)
    assert not looks_unbiased(x, mean, std, 50)


# --- what each compressor promises -----------------------------------------------------------------
@pytest.mark.parametrize("name, cast", [("fp16", torch.Tensor.half), ("bf16", torch.Tensor.bfloat16)])
def test_half_precision_is_the_cast(name, cast):
    for dtype in (torch.float32, torch.float64):
        x = sample((3, 33), dtype) * 100
        assert torch.equal(round_trip(name, x), cast(x).to(dtype))


def test_eightbit_error_is_at_most_half_a_step():
    x = sample((5000,))
    step = x.abs().max() / 127
    out = round_trip("8bit", x)
    assert ((out - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert len(torch.unique(out)) <= 255


@pytest.mark.parametrize("levels, bucket_size", [(127, 512), (4, 64), (1, 1000)])
def test_qsgd_error_is_below_one_level(levels, bucket_size):
    torch.manual_seed(0)
    x = sample((1000,))
    out = round_trip("qsgd", x, levels=levels, bucket_size=bucket_size)
    padded = torch.cat([x, x.new_zeros(-1000 % bucket_size)]).view(-1, bucket_size)
    step = (padded.norm(dim=1) / levels).repeat_interleave(bucket_size)[:1000]
    assert ((out - x).abs() <= step * (1 + 1e-5)).all()
    assert ((out - x).abs() > 0).any()


def test_natural_rounds_to_a_neighbouring_power_of_two():
    torch.manual_seed(0)
    x = sample((1000,))
    out = round_trip("natural", x)
    low = 2.0 ** torch.floor(torch.log2(x.abs()))
    assert (torch.sign(out) == torch.sign(x)).all()
    assert ((out.abs() == low) | (out.abs() == 2 * low)).all()


def test_onebit_sends_the_mean_of_each_side():
    x = torch.tensor([3.0, 1.0, -2.0, -4.0, 0.0, 2.0])  # zero counts as non-negative
    assert torch.equal(round_trip("onebit", x), torch.tensor([1.5, 1.5, -3.0, -3.0, 1.5, 1.5]))


def test_efsignsgd_scales_the_sign_by_the_mean_magnitude():
    x = torch.tensor([3.0, -1.0, 0.5, -0.5])
    assert torch.equal(round_trip("efsignsgd", x), torch.tensor([1.25, -1.25, 1.25, -1.25]))


def test_signum_sends_the_sign_of_the_momentum():
    compressor = make_compressor("signum", error_feedback=False, momentum=0.5)
    compressor.compress(torch.tensor([1.0, -1.0]), key="w")  # momentum: [0.5, -0.5]
    packet = compressor.compress(torch.tensor([-0.4, -0.4]), key="w")  # [0.05, -0.45]
    assert torch.equal(compressor.decompress(packet), torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("numel, ratio", [(1000, 0.05), (300_000, 0.01), (300_000, 0.3)])
def test_topk_keeps_exactly_the_largest_magnitudes(numel, ratio):
    x = sample((numel,))
    out = round_trip("topk", x, ratio=ratio)
    k = kept(ratio, numel)
    sent = out != 0
    assert int(sent.sum()) == k
    assert torch.equal(out[sent], x[sent])
    assert torch.equal(x[sent].abs().sort().values, torch.topk(x.abs(), k).values.sort().values)


def test_largest_magnitudes_when_the_sample_misleads():
    """A strided sample that sees only large values: the threshold lets too few through."""
    x = sample((300_000,)) * 1e-3
    x[:: 300_000 // 4096] = 10.0 + torch.arange(len(x[:: 300_000 // 4096]), dtype=x.dtype)
    k = 15_000
    chosen = largest_magnitudes(x, k)
    assert torch.equal(x[chosen].abs().sort().values, torch.topk(x.abs(), k).values.sort().values)


def test_threshold_keeps_what_reaches_it():
    x = torch.tensor([0.5, -0.05, 0.2, 0.0, -0.3])
    out = round_trip("threshold", x, threshold=0.2)
    assert torch.equal(out, torch.tensor([0.5, 0.0, 0.2, 0.0, -0.3]))


def test_randomk_sends_k_distinct_values():
    x = sample((1000,)) + 10
    out = round_trip("randomk", x, ratio=0.1)
    assert int((out != 0).sum()) == 100
    assert torch.equal(out[out != 0], x[out != 0])


def test_dgc_sparsity_warms_up():
    x = sample((10_000,))
    compressor = make_compressor("dgc", error_feedback=False, ratio=0.001, warmup_steps=4)
    counts = [compressor.compress(x, key="w").fields[0].numel() for _ in range(6)]
    # kept fraction 0.25 * (ratio / 0.25) ** (step / warmup_steps), then ratio
    assert counts == [round(10_000 * 0.25 * (0.001 / 0.25) ** (step / 4)) for step in range(4)] + [10, 10]
    assert counts[1] < counts[0] / 3.9  # about the paper's factor 4 per stage


def test_dgc_masks_the_momentum_of_what_was_sent():
    compressor = make_compressor("dgc", ratio=0.5, momentum=0.9, warmup_steps=0)
    g = torch.tensor([4.0, 2.0, -3.0, 0.5])
    first = compressor.decompress(compressor.compress(g, key="w"))
    assert torch.equal(first, torch.tensor([4.0, 0.0, -3.0, 0.0]))
    second = compressor.decompress(compressor.compress(g, key="w"))
    # velocity: the sent coordinates restart from g, the others go on: [4, 0.9 * 2 + 2, -3, 0.95]
    # accumulated, plus what was not sent: [4, 5.8, -3, 1.45]
    # (without masking the velocity would be [7.6, 3.8, -5.7, 0.95] and 7.6, 5.8 would go)
    assert torch.allclose(second, torch.tensor([4.0, 5.8, 0.0, 0.0]))


def test_powersgd_full_rank_reconstructs_a_low_rank_matrix():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(30, 3, generator=generator, dtype=torch.float64)
    m = a @ b.T
    assert torch.allclose(round_trip("powersgd", m, rank=3), m, rtol=0, atol=1e-10)
    conv = (a[:8] @ b[:12].T).view(8, 3, 2, 2)
    assert torch.allclose(round_trip("powersgd", conv, rank=3), conv, rtol=0, atol=1e-10)
    assert torch.equal(round_trip("powersgd", a[:, 0]), a[:, 0])


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation():
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(50, 50, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=torch.float64))
    m = u[:, :40] @ torch.diag(0.7 ** torch.arange(40, dtype=torch.float64)) @ v.T
    compressor = make_compressor("powersgd", error_feedback=False, rank=2)
    errors = [(compressor.decompress(compressor.compress(m, key="w")) - m).norm() for _ in range(30)]
    best = torch.linalg.matrix_norm(m - u[:, :2] @ torch.diag(0.7 ** torch.arange(2.0, dtype=torch.float64)) @ v[:, :2].T)
    assert errors[-1] < errors[0]
    assert errors[-1] <= best * (1 + 1e-6)


def test_gram_schmidt_makes_orthonormal_columns():
    p = torch.randn(20, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = orthogonalize(p.clone())
    assert torch.allclose(q.T @ q, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q @ (q.T @ p), p, atol=1e-12)  # same column space


# --- error feedback -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_error_feedback_sent_plus_residual_is_the_sum_of_inputs(name):
    torch.manual_seed(0)
    params = {"momentum": 0.0} if name == "dgc" else {}  # dgc accumulates velocities, not gradients
    compressor = make_compressor(name, **params)
    inputs = [sample((5, 13), torch.float64, seed=s) for s in range(6)]
    sent = sum(compressor.decompress(compressor.compress(x, key="w")) for x in inputs)
    residual = compressor.residual("w")
    if residual is None:  # nothing was ever lost (first steps of a lossless compressor)
        residual = torch.zeros(5, 13, dtype=torch.float64)
    assert torch.allclose(sent + residual, sum(inputs), rtol=0, atol=1e-9)
    assert compressor.residual("other key") is None


def test_error_feedback_keeps_one_residual_per_key():
    compressor = make_compressor("topk", ratio=0.5)
    compressor.compress(torch.tensor([1.0, 2.0]), key="a")
    compressor.compress(torch.tensor([5.0, -3.0, 1.0, 0.5]), key="b")
    assert torch.equal(compressor.residual("a"), torch.tensor([1.0, 0.0]))
    assert torch.equal(compressor.residual("b"), torch.tensor([0.0, 0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="key 'a'"):
        compressor.compress(torch.zeros(3), key="a")


def test_without_error_feedback_nothing_is_kept():
    compressor = make_compressor("onebit", error_feedback=False)
    compressor.compress(sample((10,)), key="w")
    assert compressor.memory is None and compressor.residual("w") is None


def test_one_bit_with_error_feedback_sends_the_gradient_on_average():
    """The lesson of the 1-bit SGD slides: with error feedback, no loss on average."""
    g = sample((200,))
    with_feedback = make_compressor("onebit")
    without = make_compressor("onebit", error_feedback=False)
    steps = 400
    mean_with = sum(with_feedback.decompress(with_feedback.compress(g)) for _ in range(steps)) / steps
    mean_without = sum(without.decompress(without.compress(g)) for _ in range(steps)) / steps
    assert (mean_with - g).norm() < 0.05 * g.norm()
    assert (mean_without - g).norm() > 0.3 * g.norm()


def test_compress_rejects_integer_tensors():
    with pytest.raises(ValueError, match="floating-point"):
        make_compressor("topk").compress(torch.arange(10))
