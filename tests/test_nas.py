"""ProxylessNAS (labkit.nas): the gate gradient, the paths that run, the latency table, the CLI."""

import itertools
import json
import math

import pytest
import torch

from labkit.nas.latency import (
    LatencyModel,
    LatencyTableError,
    check_table,
    load_table,
    measure_table,
    save_table,
)
from labkit.nas.search import latency_penalty
from labkit.nas.supernet import CANDIDATES, MixedOp, SuperNet, activation_bytes

from .conftest import run_cli


def cli(*argv):
    """``labkit ARGV`` in this process: (exit status, what it wrote to stderr)."""
    import contextlib
    import io

    from labkit.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: more threads than free cores only add waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_block(seed=0):
    torch.manual_seed(seed)
    block = MixedOp(2, 2, 1).double().eval()  # eval: batch norms use fixed statistics
    with torch.no_grad():
        block.alpha.copy_(torch.randn(len(block.candidates), dtype=torch.float64))
    return block


def pair_loss(block, x, c, pair, alpha):
    """The loss of the mixed output over the pair, weighted by the pair's softmax (what the
    binary gates estimate): L = <c, x + Σ_j p'_j o_j(x)>."""
    p = torch.softmax(alpha[pair], 0)
    with torch.no_grad():
        out = sum(p[k] * block.ops[j](x) for k, j in enumerate(pair))
    return float((c * (x + out)).sum())


def test_gate_gradient_matches_finite_differences_of_the_pair():
    """For a loss linear in the block's output, ∂L/∂g_j does not depend on which gate is on, so the
    binary-gate gradient of α equals the finite-difference gradient of the pair's mixed loss."""
    torch.manual_seed(1)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    c = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    pairs_seen = set()
    for trial in range(12):
        block = tiny_block(trial)
        block.mode = "arch"
        torch.manual_seed(100 + trial)
        block.alpha.grad = None
        (c * block(x)).sum().backward()
        pair = block.pair
        pairs_seen.add(tuple(sorted(pair)))
        alpha = block.alpha.detach().clone()
        h = 1e-6
        for i in range(len(alpha)):
            up, down = alpha.clone(), alpha.clone()
            up[i] += h
            down[i] -= h
            fd = (pair_loss(block, x, c, pair, up) - pair_loss(block, x, c, pair, down)) / (2 * h)
            assert block.alpha.grad[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-7), (trial, pair, i)
    assert len(pairs_seen) > 3  # the pairs really are sampled


def test_gate_gradient_expectation_matches_brute_force_enumeration():
    """A non-linear loss: the mean of the sampled gradients is the expectation enumerated over every
    (pair, active path) with its probability: pair (a, b) with p_a·p_b/(1−p_a), then p' over the pair."""
    torch.manual_seed(2)
    block = tiny_block(5)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)

    def loss_of(y):
        return (torch.tanh(y) ** 2).sum()

    p = torch.softmax(block.alpha.detach(), 0)
    outs = [op(x).detach() for op in block.ops]
    expected = torch.zeros_like(p)
    for a, b in itertools.permutations(range(len(p)), 2):
        prob_pair = p[a] * p[b] / (1 - p[a])
        for chosen in (0, 1):
            alpha = block.alpha.detach()[[a, b]].clone().requires_grad_(True)
            pp = torch.softmax(alpha, 0)
            g = torch.zeros(2, dtype=torch.float64, requires_grad=True)
            with torch.no_grad():
                g[chosen] = 1.0
            loss = loss_of(x + g[0] * outs[a] + g[1] * outs[b])
            dg, = torch.autograd.grad(loss, g)
            grad_pair = torch.autograd.grad((dg * pp).sum(), alpha)[0]  # Σ_j dL/dg_j ∂p'_j/∂α
            expected[[a, b]] += prob_pair * pp[chosen].detach() * grad_pair
    block.mode = "arch"
    samples = []
    for _ in range(600):
        block.alpha.grad = None
        loss_of(block(x)).backward()
        samples.append(block.alpha.grad.clone())
    samples = torch.stack(samples)
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    assert torch.all((mean - expected).abs() <= 4.5 * stderr + 1e-9), (mean, expected, stderr)


def test_binary_gates_follow_softmax_alpha():
    block = tiny_block(3)
    p = block.probs().detach()
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([block.sample_gate(g) for _ in range(4000)]), minlength=len(p))
    freq = counts.double() / 4000
    assert torch.all((freq - p).abs() < 4 * torch.sqrt(p * (1 - p) / 4000) + 1e-3)


def test_only_the_sampled_paths_run_and_hold_activations():
    net = SuperNet((1, 8, 8), 10)
    calls = {}
    for b, block in enumerate(net.blocks):
        for i, op in enumerate(block.ops):
            op.register_forward_hook(lambda m, inp, out, key=(b, i): calls.__setitem__(key, calls.get(key, 0) + 1))
    x = torch.randn(4, 1, 8, 8)
    for mode, per_block in (("weights", 1), ("arch", 2), ("full", None)):
        calls.clear()
        net.set_mode(mode)
        net(x)
        for b, block in enumerate(net.blocks):
            ran = sorted(i for (bb, i) in calls if bb == b)
            assert ran == sorted(block.active)
            assert len(ran) == (per_block or len(block.ops)), (mode, b, ran)
    net.set_mode("weights")
    one = activation_bytes(net, x)
    net.set_mode("full")
    every = activation_bytes(net, x)
    assert one * 3 < every, (one, every)


def test_rescaling_keeps_the_other_paths_probabilities():
    block = tiny_block(4)
    block.mode = "arch"
    torch.manual_seed(9)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    old = block.alpha.detach().clone()
    p_old = torch.softmax(old, 0)
    block(x).pow(2).sum().backward()
    with torch.no_grad():
        block.alpha -= 0.5 * block.alpha.grad
    block.rescale_pair(old)
    p_new = block.probs().detach()
    others = [i for i in range(len(p_old)) if i not in block.pair]
    assert torch.allclose(p_new[others], p_old[others])
    assert not torch.allclose(p_new[block.pair], p_old[block.pair])


# --- the latency table ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def table():
    return measure_table(SuperNet((1, 8, 8), 10), warmup=1, repeats=3)


def test_latency_table_round_trip_and_expected_latency(tmp_path, table):
    path = save_table(table, tmp_path / "t.json")
    loaded = load_table(path)
    assert loaded["entries"] == table["entries"] and loaded["machine"]["cpu"] == table["machine"]["cpu"]
    assert {e["op"] for e in loaded["entries"]} == set(CANDIDATES)
    assert all(e["ms"] > 0 for e in loaded["entries"] if e["op"] != "zero")
    net = SuperNet((1, 8, 8), 10)
    model = LatencyModel(loaded, net)
    e = model.expected(net)
    e.backward()
    for block, ms in zip(net.blocks, model.block_ms):
        p = block.probs().detach()
        analytic = p * (ms - (p * ms).sum())  # ∂/∂α_i Σ_j p_j lat_j = p_i (lat_i − E)
        assert torch.allclose(block.alpha.grad, analytic.float(), atol=1e-6)
    arch = ["k3e3", "zero", "k5e6", "zero"]
    assert model.predict(arch) == pytest.approx(
        sum(loaded["fixed"].values()) + sum(ms[b.candidates.index(op)].item()
                                           for op, ms, b in zip(arch, model.block_ms, net.blocks)))


def test_latency_forms_grow_with_latency():
    lat = torch.tensor(2.0, requires_grad=True)
    for form in ("add", "mul"):
        kind, term = latency_penalty(lat, 0.5, form, target_ms=1.0)
        assert kind == form
        (dt,) = torch.autograd.grad(term, lat)
        assert dt > 0


@pytest.mark.parametrize("change, message", [
    (lambda t: "not json at all", "not a JSON latency table"),
    (lambda t: b"\x80\x04\x95pickle", "not a JSON latency table"),
    (lambda t: {**t, "format": "other"}, "not a labkit latency table"),
    (lambda t: {**t, "version": 9}, "version 9 is not supported"),
    (lambda t: {**t, "fixed": {"stem": 1.0}}, "\"fixed\""),
    (lambda t: {**t, "entries": t["entries"][:1] + [{**t["entries"][0], "ms": -1}]}, "entries[1].ms"),
    (lambda t: {**t, "entries": [{**t["entries"][0], "op": "k9e9"}]}, "unknown operation 'k9e9'"),
    (lambda t: {**t, "entries": t["entries"] + t["entries"][:1]}, "appears twice"),
    (lambda t: {**t, "entries": [{**t["entries"][0], "input": [1, "8", 8]}]}, "input must be"),
    (lambda t: {**t, "entries": [{**t["entries"][0], "exec": "import os"}]}, "must have exactly"),
])
def test_bad_latency_tables_are_refused_naming_the_file(tmp_path, table, change, message):
    path = tmp_path / "bad.json"
    content = change(table)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    with pytest.raises(LatencyTableError) as e:
        load_table(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_nan_latency_is_refused(table):
    bad = json.loads(json.dumps(table))
    bad["entries"][0]["ms"] = float("nan")
    with pytest.raises(LatencyTableError, match="finite number"):
        check_table(bad, "x.json")


def test_overhead_is_a_finite_number_that_may_be_negative(table):
    fine = json.loads(json.dumps(table))
    fine["fixed"]["overhead"] = -0.02  # a network may run faster than its parts timed apart
    check_table(fine, "x.json")
    for bad in (float("nan"), "0.1", None):
        fine["fixed"]["overhead"] = bad
        with pytest.raises(LatencyTableError, match="fixed.overhead must be a finite number"):
            check_table(fine, "x.json")
    del fine["fixed"]["overhead"]
    with pytest.raises(LatencyTableError, match="stem, head, overhead"):
        check_table(fine, "x.json")


def _synthetic_ms(module) -> float:
    """A made-up timer: a block or a fixed part costs by its parameters (+ its shortcut's add); a
    whole network, its parts plus 0.25 ms of its own."""
    from labkit.nas.supernet import ChildNet, _Fixed

    if isinstance(module, ChildNet):
        return 0.25 + sum(_synthetic_ms(m) for m in (module.stem, *module.blocks, module.head))
    cost = 1e-5 * sum(p.numel() for p in module.parameters())
    if isinstance(module, _Fixed):
        return cost + (0.01 if module.shortcut else 0.0) + 0.002
    assert isinstance(module, torch.nn.Sequential), type(module)  # the stem or the head
    return cost + 0.003


def test_the_table_times_blocks_as_the_network_runs_them_and_fits_the_overhead(monkeypatch):
    """Without a clock: the table's entries are the network's own blocks (shortcut included), the
    overhead is fitted from networks timed in the same rounds, and so the prediction of any network
    is exactly its time under the same timer."""
    from labkit.nas import latency
    from labkit.nas.latency import check_predictions, child_of, sample_architectures

    calls = []

    def fake_time_modules(modules, shapes, device="cpu", warmup=10, repeats=50, clock="wall"):
        calls.append(len(modules))
        return [_synthetic_ms(m) for m in modules]

    monkeypatch.setattr(latency, "time_modules", fake_time_modules)
    net = SuperNet((1, 8, 8), 10)
    table = measure_table(net, fit_networks=3)
    assert len(calls) == 1  # entries, stem, head and the fitted networks: all in the same rounds
    assert table["fixed"]["overhead"] == pytest.approx(0.25)
    assert len(table["overhead_fit"]["networks"]) == 3
    model = LatencyModel(check_table(json.loads(json.dumps(table))), net)
    for arch in sample_architectures(net, 6, seed=7) + [["k3e3", "zero", "k5e6", "zero"]]:
        assert model.predict(arch) == pytest.approx(_synthetic_ms(child_of(net, arch)), abs=1e-6)  # float32 table
    checks = check_predictions(table, net, 4)
    assert [c["error"] for c in checks] == pytest.approx([0, 0, 0, 0], abs=1e-5)


def test_timing_warms_up_and_shuffles_the_rounds():
    from labkit.nas.latency import WARMUP_S, time_modules

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            seen.append(self.name)
            return x

    import time as clock

    t0 = clock.perf_counter()
    ms = time_modules([Probe("a"), Probe("b"), Probe("c")], [(1, 2, 2)] * 3, warmup=2, repeats=20)
    assert clock.perf_counter() - t0 >= WARMUP_S and len(ms) == 3
    timed = seen[-60:]
    rounds = [tuple(timed[i:i + 3]) for i in range(0, 60, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # each round times every module once
    assert len(set(rounds)) > 1  # in an order that changes


def test_table_for_another_network_names_the_missing_entry(tmp_path, table):
    small = {**table, "entries": [e for e in table["entries"] if e["op"] != "k7e6"]}
    path = save_table(small, tmp_path / "partial.json")
    with pytest.raises(LatencyTableError, match="no latency for k7e6@") as e:
        LatencyModel(load_table(path), SuperNet((1, 8, 8), 10))
    assert str(path) in str(e.value)


# --- the command ------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs: must be a whole number >= 1"),
    (["--latency-weight", "-1"], "--latency-weight: must be a number >= 0"),
    (["--latency-weight", "lots"], "--latency-weight: expected a number"),
    (["--latency-form", "pow"], "--latency-form: 'pow' is not one of add, mul"),
    (["--warmup-epochs", "6", "--epochs", "6"], "--warmup-epochs"),
    (["--dataset", "imagenet"], "--dataset: unknown dataset 'imagenet'"),
    (["--bogus", "1"], "unrecognized arguments"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    code, err = cli("nas", *args, "--run-dir", tmp_path / "run")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("labkit: error: ") and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_bad_latency_table_on_the_command_line(tmp_path):
    bad = tmp_path / "mine.json"
    bad.write_text('{"format": "labkit-latency-table", "version": 1}')
    result = run_cli("nas", "--latency-table", bad, "--run-dir", tmp_path / "run", timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("labkit: error: --latency-table: ") and str(bad) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(240)
def test_a_small_search_writes_a_run_directory(tmp_path, table):
    path = save_table(table, tmp_path / "table.json")
    run = tmp_path / "nas"
    result = run_cli("nas", "--epochs", "2", "--warmup-epochs", "1", "--retrain-epochs", "2",
                     "--latency-weight", "0.5", "--latency-table", path, "--run-dir", run, "--quiet", timeout=220)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    for key in ("architecture", "latency_predicted_ms", "latency_measured_ms", "test_accuracy", "parameters"):
        assert key in summary
    assert summary["status"] == "completed" and len(summary["architecture"]) == 4
    assert summary["test_accuracy"] > 0.3 and summary["latency_measured_ms"] > 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probs = [m["probs"] for m in metrics if m["kind"] == "train"]
    assert probs and probs[0] != probs[-1]  # α moved
    assert "latency predicted" in result.stdout
    shown = run_cli("show", run, timeout=60)
    assert shown.returncode == 0 and "nas" in shown.stdout and "completed" in shown.stdout
