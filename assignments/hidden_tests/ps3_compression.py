"""Hidden tests of ps3_compression: the instructor's side only (never released; see docs/grading.md).

What a compressor sends is checked against labkit's compressors (labkit.compress.make_compressor) on
the same tensors, its bytes against their packets' exact nbytes, and unbiasedness with statistical
tests on fixed seeds: a mean within five standard errors of x (a biased rounding is off by tens of
standard errors), and the variance within the method's bound. Messages say which case failed.
"""

import math

import torch

from labkit.compress import make_compressor


def onebit(onebit_compress, onebit_decompress, onebit_nbytes, OneBitErrorFeedback):
    library = make_compressor("onebit", error_feedback=False)
    torch.manual_seed(10)
    for name, x in [("one value", torch.tensor([0.7])), ("all negative", -torch.rand(9) - 0.1),
                    ("all zero", torch.zeros(4)), ("a 2x3x4 tensor", torch.randn(2, 3, 4))]:
        means, bits = onebit_compress(x)
        got = onebit_decompress(means, bits, x.shape)
        assert got.shape == x.shape and torch.allclose(got, library.decompress(library.compress(x)), atol=1e-6), (
            f"{name}: what is sent differs")
    for shape in [(1,), (7,), (8,), (9,), (2, 3, 4), (1000,)]:
        assert onebit_nbytes(shape) == library.compress(torch.randn(shape)).nbytes, f"bytes for shape {shape}"
    feedback, reference = OneBitErrorFeedback(), make_compressor("onebit")
    total_sent, total = torch.zeros(3, 4), torch.zeros(3, 4)
    for step in range(20):
        g = torch.randn(3, 4) * (1 + step % 3)
        sent = feedback.step(g)
        assert torch.allclose(sent, reference.decompress(reference.compress(g, key="k")), atol=1e-5), (
            f"error feedback, step {step}: what is sent differs")
        total_sent += sent
        total += g
    assert torch.allclose(total_sent + feedback.residual, total, atol=1e-4), "error feedback loses part of the gradient"


def topk(topk_compress, index_nbytes, topk_nbytes, TopKAccumulator, sparse_allreduce):
    torch.manual_seed(20)
    for n, k in [(10, 1), (300, 30), (70000, 7)]:
        x = torch.randn(n)
        indices, values = topk_compress(x, k)
        library = make_compressor("topk", ratio=k / n, error_feedback=False)
        dense = torch.zeros(n)
        dense[torch.as_tensor(indices).long()] = values
        assert torch.equal(dense, library.decompress(library.compress(x))), f"{n} values, k = {k}: what is sent"
        assert topk_nbytes((n,), k) == library.compress(x).nbytes, f"{n} values, k = {k}: the bytes"
    x = torch.randn(4, 5)
    library = make_compressor("topk", ratio=3 / 20, error_feedback=False)
    assert topk_nbytes((4, 5), 3) == library.compress(x).nbytes, "a 4x5 tensor: the bytes"
    assert [index_nbytes(n) for n in (1, 256, 257, 65536, 65537, 2 ** 32, 2 ** 32 + 1)] == [1, 1, 2, 2, 4, 4, 8], (
        "index sizes")
    accumulator, reference = TopKAccumulator(3), make_compressor("topk", ratio=3 / 12)
    for step in range(15):
        g = torch.randn(12)
        want = reference.decompress(reference.compress(g, key="k"))
        assert torch.allclose(accumulator.step(g), want, atol=1e-6), f"accumulation, step {step}"
    rng = torch.Generator().manual_seed(3)
    packets = [(torch.randperm(30, generator=rng)[:6], torch.randn(6, generator=rng)) for _ in range(4)]
    want = torch.zeros(30)
    for indices, values in packets:
        want.index_add_(0, indices, values)
    assert torch.allclose(sparse_allreduce(packets, 30), want), "sparse allreduce over 4 ranks"


def _unbiased(name, draw, x, draws, standard_error, variance_bound=None):
    samples = torch.stack([draw() for _ in range(draws)])
    error = (samples.mean(dim=0) - x).abs()
    assert torch.all(error < 5 * standard_error), f"{name}: biased (mean off by {float(error.max()):.4f})"
    if variance_bound is not None:
        variance = ((samples - x) ** 2).sum(dim=1).mean()
        assert variance <= variance_bound * 1.1, f"{name}: variance above the method's bound"


def qsgd(qsgd_quantize, qsgd_dequantize, qsgd_nbytes):
    for case, (x, levels) in enumerate([
            (torch.tensor([3.0, -1.0, 0.5, 2.2, -0.01], dtype=torch.float64), 1),
            (torch.linspace(-1, 1, 9, dtype=torch.float64), 3),
            (torch.tensor([1e-3, 4.0, -2.5, 0.7], dtype=torch.float64), 16)], start=1):
        generator = torch.Generator().manual_seed(100 + case)
        norm = torch.linalg.vector_norm(x)
        ratio = levels * x.abs() / norm

        def draw():
            got_norm, signed = qsgd_quantize(x, levels, generator)
            assert torch.all((signed.abs() == ratio.floor()) | (signed.abs() == ratio.floor() + 1)), (
                f"case {case}: a level that is not one of the two nearest")
            assert torch.all((torch.sign(signed) == torch.sign(x)) | (signed == 0)), f"case {case}: a sign"
            return qsgd_dequantize(got_norm, signed, levels)
        n = x.numel()
        bound = min(n / levels ** 2, math.sqrt(n) / levels) * float(norm) ** 2
        _unbiased(f"QSGD case {case} (s = {levels})", draw, x, 6000, float(norm) / levels * 0.5 / math.sqrt(6000), bound)
    generator = torch.Generator().manual_seed(0)
    norm, signed = qsgd_quantize(torch.zeros(5, dtype=torch.float64), 4, generator)
    assert torch.all(qsgd_dequantize(norm, signed, 4) == 0), "a zero bucket must send zeros"
    for shape, levels, bucket in [((1,), 1, 512), ((513,), 127, 512), ((4, 5, 6), 128, 7), ((2000,), 32767, 100)]:
        library = make_compressor("qsgd", levels=levels, bucket_size=bucket, error_feedback=False)
        assert qsgd_nbytes(shape, levels, bucket) == library.compress(torch.randn(shape)).nbytes, (
            f"bytes for shape {shape}, s = {levels}, buckets of {bucket}")


def terngrad(terngrad, terngrad_dequantize, terngrad_nbytes):
    for case, x in enumerate([torch.tensor([0.1, -0.9, 0.45, 0.0, 2.0, -0.3], dtype=torch.float64),
                              torch.linspace(-3, 1, 11, dtype=torch.float64)], start=1):
        generator = torch.Generator().manual_seed(200 + case)
        biggest = int(x.abs().argmax())

        def draw():
            scale, ternary = terngrad(x, generator)
            assert set(torch.as_tensor(ternary).tolist()) <= {-1, 0, 1}, f"case {case}: values other than -1, 0, 1"
            assert int(ternary[biggest]) == int(torch.sign(x[biggest])), f"case {case}: the largest value is dropped"
            return terngrad_dequantize(scale, ternary)
        _unbiased(f"TernGrad case {case}", draw, x, 6000, float(x.abs().max()) * 0.5 / math.sqrt(6000))
    scale, ternary = terngrad(torch.zeros(3, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert torch.all(terngrad_dequantize(scale, ternary) == 0), "a zero tensor must send zeros"
    library = make_compressor("terngrad", error_feedback=False)
    for shape in [(1,), (4,), (6,), (2, 2, 3), (999,)]:
        assert terngrad_nbytes(shape) == library.compress(torch.randn(shape)).nbytes, f"bytes for shape {shape}"
