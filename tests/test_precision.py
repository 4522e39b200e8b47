"""labkit.precision: LNS arithmetic, Kahan summation, rounding, mixed precision, LNS training;
labkit.memory: the layer storage formula and microbatching."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labkit import memory
from labkit.data import load_dataset
from labkit.models import build_model
from labkit.precision import (
    FORMATS,
    KahanAccumulator,
    LNSFormat,
    LossScaler,
    accumulate,
    add,
    autocast,
    decode,
    div,
    encode,
    kahan_sum,
    lns_matmul,
    mul,
    naive_sum,
    quantize,
    round_nearest,
    round_stochastic,
)
from labkit.precision.training import MODES, train_mlp


def spread(n, seed=0):
    """Values of both signs over many magnitudes (and a few zeros)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator, dtype=torch.float64) * torch.exp2(
        torch.randint(-20, 20, (n,), generator=generator).double())
    x[::97] = 0.0
    return x


# --- LNS --------------------------------------------------------------------------------------

def test_lns_encodes_to_within_half_a_step():
    fmt = LNSFormat(frac_bits=10)
    x = spread(5000)
    back = decode(encode(x, fmt))
    nonzero = x != 0
    assert torch.equal(back[~nonzero], x[~nonzero])
    relative = ((back - x).abs() / x.abs())[nonzero]
    assert relative.max() <= 2 ** (0.5 / fmt.scale) - 1 + 1e-12
    assert encode(torch.tensor([1.2345]), fmt).log.item() == round(np.log2(1.2345) * 1024)  # the slide's example


def test_lns_multiply_and_divide_are_add_and_subtract():
    fmt = LNSFormat(frac_bits=12)
    a, b = encode(spread(1000, 1), fmt), encode(spread(1000, 2) + 1e-3, fmt)
    product, quotient = mul(a, b), div(a, b)
    live = (a.sign != 0) & (b.sign != 0)
    assert torch.equal(product.log[live], (a.log + b.log)[live])
    assert torch.equal(quotient.log[live], (a.log - b.log)[live])
    assert torch.equal(product.sign, a.sign * b.sign)
    assert torch.allclose(decode(product), decode(a) * decode(b), rtol=1e-12, atol=0)


@pytest.mark.parametrize("frac_bits", [4, 8, 12])
def test_lns_add_through_g_is_the_correctly_rounded_sum(frac_bits):
    table, exact = LNSFormat(frac_bits=frac_bits), LNSFormat(frac_bits=frac_bits, g="exact")
    a_values, b_values = spread(4000, 3), spread(4000, 4) * 0.5
    a_values[:500] = -b_values[:500] * (1 + torch.rand(500, dtype=torch.float64) * 1e-3)  # cancellation
    by_table = add(encode(a_values, table), encode(b_values, table))
    by_g = add(encode(a_values, exact), encode(b_values, exact))
    assert torch.equal(by_table.log, by_g.log) and torch.equal(by_table.sign, by_g.sign)
    # against the float64 sum of the two LNS numbers, rounded to LNS once
    reference = encode(decode(encode(a_values, exact)) + decode(encode(b_values, exact)), exact)
    assert (by_g.log - reference.log).abs().max() <= 1
    assert (by_g.log != reference.log).float().mean() < 0.01


def test_a_coarser_g_table_is_smaller_and_less_accurate():
    full, coarse = LNSFormat(frac_bits=10), LNSFormat(frac_bits=10, table_frac_bits=4)
    assert coarse.table_entries * 32 < full.table_entries * 1.01
    x, y = torch.rand(5000, dtype=torch.float64) + 0.1, torch.rand(5000, dtype=torch.float64) + 0.1
    error = {fmt: (decode(add(encode(x, fmt), encode(y, fmt))) - (x + y)).abs().mean() for fmt in (full, coarse)}
    assert error[coarse] > 3 * error[full]


def test_lns_zero_and_cancellation():
    fmt = LNSFormat(frac_bits=8)
    a = encode(torch.tensor([0.0, 3.0, -2.5, 0.0]), fmt)
    b = encode(torch.tensor([0.0, -3.0, 0.0, 7.0]), fmt)
    assert decode(add(a, b)).tolist() == [0.0, 0.0, decode(a)[2].item(), decode(b)[3].item()]
    assert decode(mul(a, b)).tolist()[:3] == pytest.approx([0.0, -decode(a)[1].item() ** 2, 0.0], rel=1e-12)


@pytest.mark.parametrize("accumulate_order", ["pairwise", "sequential"])
def test_lns_matmul_is_close_to_float_matmul(accumulate_order):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 30, generator=generator), torch.randn(30, 7, generator=generator)
    exact = a.double() @ b.double()
    coarse = lns_matmul(a, b, LNSFormat(frac_bits=6), accumulate=accumulate_order)
    fine = lns_matmul(a, b, LNSFormat(frac_bits=16), accumulate=accumulate_order)
    scale = exact.abs().max()
    assert (fine.double() - exact).abs().max() < 1e-3 * scale
    assert 1e-3 * scale < (coarse.double() - exact).abs().max() < 0.1 * scale


@pytest.mark.parametrize("call, message", [
    (lambda: LNSFormat(frac_bits=0), "frac_bits must be an integer in [1, 20]"),
    (lambda: LNSFormat(frac_bits=21), "frac_bits must be an integer in [1, 20]"),
    (lambda: LNSFormat(int_bits=1), "int_bits must be an integer in [2, 16]"),
    (lambda: LNSFormat(g="poly"), "g must be 'table' or 'exact'"),
    (lambda: LNSFormat(frac_bits=4, table_frac_bits=6), "table_frac_bits must be an integer in [0, frac_bits=4]"),
    (lambda: encode(torch.tensor([float("inf")])), "x must be finite"),
    (lambda: div(encode(torch.ones(2)), encode(torch.zeros(2))), "division by zero"),
    (lambda: add(encode(torch.ones(1), LNSFormat(4)), encode(torch.ones(1), LNSFormat(5))), "different LNS formats"),
    (lambda: lns_matmul(torch.ones(2, 3), torch.ones(2, 3)), "a and b must be matrices (n, k) and (k, m)"),
    (lambda: lns_matmul(torch.ones(2, 3), torch.ones(3, 2), accumulate="tree"), "accumulate must be"),
    (lambda: train_mlp(None, "lns_somewhere"), "mode 'lns_somewhere'"),
])
def test_lns_bad_inputs_are_value_errors_naming_them(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


# --- Kahan ------------------------------------------------------------------------------------

def test_kahan_is_at_least_100_times_more_accurate_on_a_million_float32():
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, 10**6).astype(np.float32))
    reference = x.double().sum().item()
    naive_error = abs(naive_sum(x).item() - reference)
    kahan_error = abs(kahan_sum(x).item() - reference)
    assert naive_error > 0.1  # the naive sum really loses something
    assert kahan_error * 100 <= naive_error, (kahan_error, naive_error)


def test_kahan_keeps_the_small_updates_low_precision_loses():
    """w = 1 in bf16, plus 1000 updates of 1e-3: the plain sum never moves, Kahan's reaches 2."""
    naive = torch.ones(1, dtype=torch.bfloat16)
    kahan = KahanAccumulator(torch.ones(1, dtype=torch.bfloat16))
    for _ in range(1000):
        naive = naive + torch.tensor(1e-3, dtype=torch.bfloat16)
        kahan.add(torch.tensor([1e-3]))
    assert naive.item() == 1.0
    assert abs(kahan.value.item() - 2.0) < 0.02


# --- rounding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_to_nearest_equals_torchs_casts(fmt):
    x = spread(20000, 5).float()
    x[:5] = torch.tensor([65520.0, 57344.0, 61440.0, 1e-8, -3e38])  # overflow edges and subnormals
    assert torch.equal(round_nearest(x, fmt), x.to(FORMATS[fmt].torch_dtype).float())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(fmt):
    generator = torch.Generator().manual_seed(1)
    value = torch.tensor(1.0 + 0.3 * FORMATS[fmt].epsilon, dtype=torch.float64)
    samples = round_stochastic(value.expand(200_000).clone(), fmt, generator)
    lower, upper = 1.0, 1.0 + FORMATS[fmt].epsilon
    assert set(samples.unique().tolist()) == {lower, upper}
    # E = value; standard error of the mean is sqrt(0.3 * 0.7 / n) spacings
    sigma = (0.21 / 200_000) ** 0.5 * FORMATS[fmt].epsilon
    assert abs(samples.mean().item() - value.item()) < 5 * sigma
    assert round_nearest(value, fmt).item() == lower  # nearest is biased: always down


def test_small_updates_vanish_with_nearest_and_survive_with_stochastic_rounding():
    nearest = accumulate(1.0, 1e-3, 1000, "bf16", "nearest")
    assert nearest[-1].item() == 1.0
    finals = accumulate(torch.ones(400), 1e-3, 1000, "bf16", "stochastic")[-1]
    assert abs(finals.mean().item() - 2.0) < 0.02  # the mean of 400 walks: sigma about 0.005


@pytest.mark.parametrize("call, message", [
    (lambda: round_nearest(torch.ones(2), "fp4"), "fmt 'fp4': unknown format"),
    (lambda: round_stochastic(torch.ones(2, dtype=torch.int32)), "x must be a float32 or float64 tensor"),
    (lambda: accumulate(1.0, 1e-3, 10, rounding="up"), "rounding must be 'nearest' or 'stochastic'"),
    (lambda: kahan_sum(torch.arange(3)), "x must be a float tensor"),
    (lambda: autocast("fp64"), "precision 'fp64'"),
    (lambda: autocast("fp16", "cpu"), "precision 'fp16' needs a GPU"),
    (lambda: LossScaler(backoff_factor=2), "backoff_factor must be in (0, 1)"),
])
def test_rounding_bad_inputs_are_value_errors_naming_them(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


# --- mixed precision --------------------------------------------------------------------------

def test_loss_scaler_follows_torch_grad_scaler():
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    ours = LossScaler(init_scale=2.0**10, growth_interval=3)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for step in range(12):
        x = torch.randn(8, 4)
        if step in (2, 7):
            x[0, 0] = float("inf")  # an overflow: the step is skipped and the scale halves
        for optimizer in optimizers:
            optimizer.zero_grad()
        ours.scale_loss(models[0](x).pow(2).mean()).backward()
        ours.step(optimizers[0])
        theirs.scale(models[1](x).pow(2).mean()).backward()
        theirs.step(optimizers[1])
        theirs.update()
        assert ours.scale == theirs.get_scale(), step
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            assert torch.allclose(p, q, atol=1e-6), step
    assert ours.skipped == 2


def test_bf16_autocast_runs_matmuls_in_bf16_and_keeps_fp32_weights():
    model = torch.nn.Linear(8, 3)
    with autocast("bf16"):
        out = model(torch.randn(4, 8))
    assert out.dtype == torch.bfloat16 and model.weight.dtype == torch.float32


# --- LNS training -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_dataset("digits")
    torch.set_num_threads(threads)


def test_lns_with_many_fraction_bits_trains_like_float(digits):
    normal = train_mlp(digits, "normal", epochs=2, hidden=16)
    fine = train_mlp(digits, "lns_everywhere", LNSFormat(frac_bits=18), epochs=2, hidden=16)
    assert normal.validation_error < 0.15
    assert np.allclose(normal.epoch_losses, fine.epoch_losses, rtol=1e-3)
    assert abs(normal.validation_error - fine.validation_error) <= 0.006


def test_lns_everywhere_loses_updates_that_kahan_keeps(digits):
    """With few fraction bits the plain LNS update drops small steps; Kahan's compensation
    carries them, so its training loss stays closer to float's."""
    fmt = LNSFormat(frac_bits=4)
    runs = {mode: train_mlp(digits, mode, fmt, epochs=2, hidden=16, lr=0.1)
            for mode in ("normal", "lns_everywhere", "lns_everywhere_kahan")}
    gap = {mode: abs(runs[mode].epoch_losses[-1] - runs["normal"].epoch_losses[-1]) for mode in runs}
    assert gap["lns_everywhere"] > 2 * gap["lns_everywhere_kahan"], gap
    assert set(MODES) >= set(runs)


# --- layer storage and microbatching ----------------------------------------------------------

@pytest.mark.parametrize("model_name, shape", [("lenet", (1, 8, 8)), ("mlp", (1, 8, 8)), ("lenet", (3, 16, 16))])
def test_layer_storage_formula_matches_the_real_tensors(model_name, shape):
    model = build_model(model_name, shape, 10, seed=0)
    formula = memory.layer_storage(model, shape, 12)
    measured = memory.measured_layer_storage(model, shape, 12)
    assert formula == measured
    assert sum(r.weights for r in formula) == 4 * sum(p.numel() for p in model.parameters())


def test_microbatches_give_the_same_gradient():
    model = build_model("lenet", (1, 8, 8), 10, seed=0).double()
    x, y = torch.randn(24, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (24,))
    memory.microbatch_gradients(model, F.cross_entropy, x, y, micro_batch=24)
    full = [p.grad.clone() for p in model.parameters()]
    for micro in (1, 5, 8):
        memory.microbatch_gradients(model, F.cross_entropy, x, y, micro_batch=micro)
        for p, g in zip(model.parameters(), full):
            assert torch.allclose(p.grad, g, atol=1e-12)


def test_microbatched_convolution_is_the_same_with_less_workspace():
    x, w = torch.randn(16, 3, 10, 10, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    whole, parts = {}, {}
    expected = F.conv2d(x, w, padding=1)
    for algorithm in ("im2col", "fft", "winograd"):
        a = memory.conv2d_microbatched(x, w, 1, 1, algorithm, 16, stats=whole)
        b = memory.conv2d_microbatched(x, w, 1, 1, algorithm, 4, stats=parts)
        assert torch.allclose(a, expected, atol=1e-10) and torch.allclose(b, expected, atol=1e-10)
        assert parts["workspace_bytes"] < whole["workspace_bytes"] / 2
        assert parts["multiplications"] == whole["multiplications"]


def test_plan_picks_the_fastest_choice_that_fits():
    choices = [memory.Choice("conv1", "im2col", 32, 1000, 0.1), memory.Choice("conv1", "im2col", 8, 250, 0.3),
               memory.Choice("conv1", "direct", 32, 10, 0.5), memory.Choice("conv1", "fft", 32, 5000, 0.05)]
    assert memory.plan_microbatches(choices, 10_000)["conv1"].algorithm == "fft"
    assert memory.plan_microbatches(choices, 1000)["conv1"].micro_batch == 32
    assert memory.plan_microbatches(choices, 300)["conv1"].micro_batch == 8
    assert memory.plan_microbatches(choices, 20)["conv1"].algorithm == "direct"
    assert memory.plan_microbatches(choices, 5) == {}
    measured = memory.measure_choices(memory.ConvLayer("c", (4, 2, 6, 6), (3, 2, 5, 5), 1, 2), repeats=1)
    assert {c.algorithm for c in measured} == {"direct", "im2col", "fft"}  # no Winograd for 5x5
    assert {c.micro_batch for c in measured} == {1, 2, 4}
    with pytest.raises(ValueError, match="workspace_limit must be"):
        memory.plan_microbatches(choices, -1)
    with pytest.raises(ValueError, match="micro_batch must be"):
        memory.microbatch_gradients(torch.nn.Linear(2, 2), F.mse_loss, torch.ones(2, 2), torch.ones(2, 2), 0)
    assert quantize(torch.tensor([1.0])).item() == 1.0
