"""Hidden tests of ps6_numerics: the instructor's side only.

nbgrader releases source/ps6_numerics/ and nothing else, so this file never reaches students. The
notebook's hidden test cells name a check here and run it through
labkit.grading.hidden.run_hidden_tests, which reports a failure as one line: the message of the
AssertionError raised below. Messages say which case failed, never the expected answer.
"""

import math

import numpy as np
import torch


def adam(adam_step):
    """Against torch.optim.Adam: other shapes, hyper-parameters, 100 steps; inputs unchanged."""
    cases = [((3, 4), 0.01, (0.9, 0.999), 1e-8), ((7,), 0.3, (0.5, 0.9), 1e-3),
             ((2, 2, 3), 1e-3, (0.99, 0.9999), 1e-6), ((1,), 0.05, (0.0, 0.5), 1e-8)]
    for case, (shape, lr, betas, eps) in enumerate(cases, start=1):
        rng = np.random.default_rng(600 + case)
        scale = rng.uniform(0.5, 3.0, size=shape)
        target = rng.normal(size=shape)
        w = rng.normal(size=shape)
        m, v = np.zeros(shape), np.zeros(shape)
        param = torch.tensor(w.copy(), requires_grad=True)
        optimizer = torch.optim.Adam([param], lr=lr, betas=betas, eps=eps)
        for t in range(1, 101):
            grad = 2 * scale * (w - target)
            before = (w.copy(), grad.copy(), m.copy(), v.copy())
            w, m, v = adam_step(w, grad, m, v, t, lr=lr, betas=betas, eps=eps)
            assert all(np.array_equal(a, b) for a, b in zip(before[1:], (grad, before[2], before[3]))), (
                f"case {case}: adam_step changed its input arrays")
            optimizer.zero_grad()
            (torch.from_numpy(scale) * (param - torch.from_numpy(target)) ** 2).sum().backward()
            optimizer.step()
            assert np.shape(w) == shape and np.allclose(w, param.detach().numpy(), atol=1e-9, rtol=0), (
                f"case {case}: step {t} differs from torch.optim.Adam")


def kahan(kahan_sum):
    """Long float32 vectors: the error is within one float32 rounding of the exact sum."""
    for case, n in enumerate((20_000, 5_001, 1), start=1):
        rng = np.random.default_rng(700 + case)
        values = (rng.uniform(0, 1, n) * 10.0 ** rng.integers(-3, 3, n)).astype(np.float32)
        if case == 2:
            values = values * np.where(rng.random(n) < 0.3, -1, 1).astype(np.float32)
        exact = values.astype(np.float64).sum()
        total = kahan_sum(values)
        assert isinstance(total, np.float32), f"case {case}: the sum is not a np.float32"
        spacing = np.spacing(np.float32(abs(exact)))
        assert abs(float(total) - exact) <= 2 * spacing + 1e-30, f"case {case}: {n} values, the sum is off"
    # many small updates on a large value
    values = np.array([1000.0] + [1e-4] * 20_000, dtype=np.float32)
    assert abs(float(kahan_sum(values)) - 1002.0) < 1e-3, "case 4: small updates to a large sum are lost"


def _reference_add(a, b, frac_bits):
    from labkit.precision import lns

    fmt = lns.LNSFormat(frac_bits=frac_bits, int_bits=16, g="exact")

    def tensor(pair):
        sign = torch.tensor([pair[0]], dtype=torch.int8)
        log = torch.tensor([pair[1] if pair[0] else lns.ZERO_LOG], dtype=torch.int64)
        return lns.LNSTensor(sign, log, fmt)

    total = lns.add(tensor(a), tensor(b))
    return (int(total.sign), int(total.log) if int(total.sign) else 0)


def _near_tie(a, b, frac_bits):
    hi, lo = max(a[1], b[1]), min(a[1], b[1])
    x = (lo - hi) / 2**frac_bits
    if a[0] == b[0]:
        g = math.log2(1 + 2**x)
    elif lo == hi:
        return False
    else:
        g = math.log2(1 - 2**x)
    scaled = g * 2**frac_bits
    return abs(scaled - math.floor(scaled) - 0.5) < 1e-6


def lns(lns_mul, lns_add):
    """Random pairs of both signs, cancellations and zeros, 4 to 16 fraction bits."""
    rng = np.random.default_rng(800)
    for frac_bits in (4, 7, 10, 16):
        scale = 2**frac_bits
        for i in range(150):
            a = (int(rng.choice([-1, 1])), int(rng.integers(-8 * scale, 8 * scale)))
            b = (int(rng.choice([-1, 1])), int(a[1] + rng.integers(-3 * scale, 3 * scale)))
            if i % 10 == 0:
                b = (-a[0], a[1])  # cancellation
            if i % 25 == 1:
                b = (0, 0)
            product = tuple(int(v) for v in lns_mul(a, b))
            expected_product = (a[0] * b[0], a[1] + b[1]) if b[0] else (0, 0)
            assert product == expected_product, f"lns_mul, {frac_bits} fraction bits: case {i} is wrong"
            for x, y in ((a, b), (b, a)):
                got = tuple(int(v) for v in lns_add(x, y, frac_bits))
                want = _reference_add(x, y, frac_bits)
                ok = got == want or (_near_tie(x, y, frac_bits) and got[0] == want[0] and abs(got[1] - want[1]) == 1)
                assert ok, f"lns_add, {frac_bits} fraction bits: case {i} ({'same' if x[0] == y[0] else 'opposite'} signs) is wrong"


def winograd(winograd_f23, correlate_winograd):
    """Odd and even lengths, random kernels, multiplication counts."""
    rng = np.random.default_rng(900)
    for case in range(20):
        d, g = rng.normal(size=4), rng.normal(size=3)
        assert np.allclose(winograd_f23(d, g), np.correlate(d, g, "valid")), f"winograd_f23: case {case + 1} is wrong"
    for n in (3, 4, 5, 8, 17, 64, 101):
        signal, kernel = rng.normal(size=n), rng.normal(size=3)
        out, multiplications = correlate_winograd(signal, kernel)
        expected = np.correlate(signal, kernel, "valid")
        assert np.shape(out) == expected.shape and np.allclose(out, expected), (
            f"correlate_winograd: a signal of length {n} is wrong")
        assert multiplications == 4 * math.ceil((n - 2) / 2), (
            f"correlate_winograd: wrong multiplication count for length {n}")


def rounding(stochastic_round):
    """Neighbours only, values on the grid unchanged, unbiased for several steps and signs."""
    rng = np.random.default_rng(1000)
    for case, (value, step) in enumerate(((-0.37, 0.25), (2.9, 0.5), (1e-3, 1e-2), (-7.0, 0.5), (3.75, 0.25)), start=1):
        samples = stochastic_round(np.full(50_000, value), step, rng)
        lower = math.floor(value / step) * step
        allowed = {round(lower / step), round(lower / step) + 1}
        assert set(np.round(np.unique(samples) / step).astype(int)) <= allowed, (
            f"case {case}: a value was rounded to something other than its two neighbours")
        if abs(value / step - round(value / step)) < 1e-12:
            assert np.allclose(samples, value), f"case {case}: a value on the grid must stay put"
        p = (value - lower) / step
        sigma = step * math.sqrt(max(p * (1 - p), 1e-12) / samples.size)
        assert abs(samples.mean() - value) <= 6 * sigma + 1e-12, f"case {case}: the rounding is biased"
    shaped = stochastic_round(np.zeros((3, 4)) + 0.5, 1.0, rng)
    assert np.shape(shaped) == (3, 4), "the shape of x must be kept"


def storage(fc_layer_storage, largest_micro_batch):
    """The bytes of a real torch layer's tensors; divisors and budgets by brute force."""
    from labkit.memory import measured_layer_storage

    for batch, n_in, n_out, dtype in ((16, 20, 7, torch.float32), (3, 100, 50, torch.float64),
                                      (1, 1, 1, torch.float32), (64, 8, 300, torch.float64)):
        layer = torch.nn.Linear(n_in, n_out)
        (row,) = measured_layer_storage(layer, (n_in,), batch, dtype=dtype)
        size = torch.empty((), dtype=dtype).element_size()
        assert fc_layer_storage(batch, n_in, n_out, size) == row.total, (
            f"fc_layer_storage({batch}, {n_in}, {n_out}, {size}) differs from the real tensors")
    for batch, per_sample, budget in ((96, 1000, 50_000), (7, 10, 69), (7, 10, 70), (1, 5, 4), (360, 3, 1000), (128, 1, 128)):
        expected = max([b for b in range(1, batch + 1) if batch % b == 0 and b * per_sample <= budget], default=0)
        assert largest_micro_batch(batch, per_sample, budget) == expected, (
            f"largest_micro_batch({batch}, {per_sample}, {budget}) is wrong")
