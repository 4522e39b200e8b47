"""Hidden tests of ps7_search: the instructor's side only.

Run through labkit.grading.hidden.run_hidden_tests; a failure is one line (the message of the
AssertionError raised here), which names the case, never the expected answer.
"""

import math
import random

import numpy as np
import torch


def gates(sample_gate, gate_alpha_gradient):
    """Frequencies of the gates against softmax(alpha); the gradient against labkit.nas's MixedOp."""
    from labkit.nas.supernet import MixedOp

    for case, alpha in enumerate([torch.tensor([3.0, 0.0, -2.0]), torch.tensor([0.1, 0.2, 0.3, 0.4, -0.5, 1.0, 0.0]),
                                  torch.tensor([-1.0, 1.0])], start=1):
        g = torch.Generator().manual_seed(case)
        n = 3000
        counts = np.bincount([sample_gate(alpha.clone(), g) for _ in range(n)], minlength=len(alpha))
        p = torch.softmax(alpha, 0).numpy()
        chi2 = float((((counts - n * p) ** 2) / (n * p)).sum())
        assert len(counts) == len(alpha) and chi2 < 3 * len(alpha) + 10, \
            f"case {case}: the gates do not follow softmax(alpha) ({len(alpha)} paths)"

    torch.manual_seed(0)
    for case in range(1, 6):
        block = MixedOp(2, 2, 1).double().eval()
        with torch.no_grad():
            block.alpha.copy_(torch.randn(len(block.candidates), dtype=torch.float64))
        block.mode = "arch"
        x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
        y = block(x)
        y.pow(3).sum().backward()
        # dL/dg_j = <dL/dy, o_j(x)> for the two paths the block sampled
        dy = 3 * y.detach() ** 2
        with torch.no_grad():
            gate_grads = [float((dy * block.ops[j](x)).sum()) for j in block.pair]
        mine = torch.as_tensor(gate_alpha_gradient(block.alpha.detach().clone(), list(block.pair), gate_grads),
                               dtype=torch.float64)
        assert mine.shape == block.alpha.shape and torch.allclose(mine, block.alpha.grad, atol=1e-6), \
            f"case {case}: the gradient of alpha through the gates of pair {block.pair} is wrong"


def latency(expected_latency, proxyless_loss, fastest_architecture):
    """E[latency] and the loss against autograd of the reference; CPU and GPU tables."""
    rng = np.random.default_rng(7)
    for case in range(1, 5):
        sizes = rng.integers(2, 8, size=rng.integers(1, 6))
        tables = [list(rng.uniform(0, 3, size=s)) for s in sizes]
        alphas = [torch.tensor(rng.normal(size=s), requires_grad=True) for s in sizes]
        ref_alphas = [a.detach().clone().requires_grad_(True) for a in alphas]
        ref = sum((torch.softmax(a, 0) * torch.tensor(t, dtype=a.dtype)).sum() for a, t in zip(ref_alphas, tables))
        mine = expected_latency(alphas, tables)
        assert torch.is_tensor(mine) and abs(mine.item() - ref.item()) < 1e-6, f"case {case}: E[latency] is wrong"
        mine.backward()
        ref.backward()
        for a, b in zip(alphas, ref_alphas):
            assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-6), \
                f"case {case}: the gradient of E[latency] in alpha is wrong"
        weights = [torch.tensor(rng.normal(size=(3, 2))), torch.tensor(rng.normal(size=4))]
        ce, l1, l2 = torch.tensor(float(rng.uniform(0.1, 2))), float(rng.uniform(0, 0.1)), float(rng.uniform(0, 5))
        want = float(ce) + l1 * sum(float((w * w).sum()) for w in weights) + l2 * ref.item()
        got = proxyless_loss(ce, weights, [a.detach() for a in alphas], tables, l1, l2)
        assert abs(torch.as_tensor(got).item() - want) < 1e-5, f"case {case}: the loss is not CE + l1*||w||^2 + l2*E[latency]"
    names = [["k3e3", "k3e6", "k5e3", "k5e6", "k7e3", "k7e6"], ["k3e3", "k3e6", "k5e3", "k5e6", "k7e3", "k7e6", "zero"]]
    # batch 1: a CPU pays for every multiply-add; a GPU pays a launch per kernel and likes wide ones
    cpu = [[0.30, 0.52, 0.41, 0.75, 0.55, 1.02], [0.30, 0.52, 0.41, 0.75, 0.55, 1.02, 0.0]]
    gpu = [[0.080, 0.081, 0.083, 0.084, 0.079, 0.086], [0.080, 0.081, 0.080, 0.084, 0.085, 0.086, 0.0]]
    assert list(fastest_architecture(cpu, names)) == ["k3e3", "zero"], "the CPU table's fastest blocks are wrong"
    assert list(fastest_architecture(gpu, names)) == ["k7e3", "zero"], "the GPU table's fastest blocks are wrong"
    assert list(fastest_architecture([[1.0, 1.0, 2.0]], [["a", "b", "c"]])) == ["a"], "a tie must pick the first"


def es(es_update):
    """Against labkit.search.es's gradient; and ES that learns a quadratic."""
    from labkit.search.es import NoiseTable, es_gradient

    noise = NoiseTable(seed=5, size=5000)
    rng = np.random.default_rng(3)
    for case in range(1, 5):
        dim, n = int(rng.integers(2, 20)), int(rng.integers(1, 12))
        theta = torch.tensor(rng.normal(size=dim), dtype=torch.float32)
        pairs = torch.tensor([[int(rng.integers(0, 5000 - dim)), rng.normal(), rng.normal()] for _ in range(n)],
                             dtype=torch.float64)
        sigma, lr = float(rng.uniform(0.01, 0.5)), float(rng.uniform(0.01, 1))
        want = theta + lr * es_gradient(pairs, noise, dim, sigma)
        got = es_update(theta.clone(), pairs, noise.noise, sigma, lr)
        assert torch.allclose(torch.as_tensor(got, dtype=torch.float32), want, atol=1e-5), \
            f"case {case}: {n} pairs, {dim} parameters: the update differs from the reference"
    target = torch.tensor([1.0, -2.0, 0.5])
    theta = torch.zeros(3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = noise.sample_indices(10, 3, g)
        rows = [[i, -float(((theta + 0.1 * noise.get(i, 3) - target) ** 2).sum()),
                 -float(((theta - 0.1 * noise.get(i, 3) - target) ** 2).sum())] for i in idx.tolist()]
        theta = torch.as_tensor(es_update(theta, torch.tensor(rows, dtype=torch.float64), noise.noise, 0.1, 0.05),
                                dtype=torch.float32)
    assert float(((theta - target) ** 2).sum()) < 0.1, "150 ES steps do not approach the optimum of a quadratic"


def pbt(exploit, explore):
    """Truncation selection for 2 to 25 members with ties; explore's clipping."""
    rng = random.Random(11)
    for case, n in enumerate((2, 3, 5, 7, 10, 13, 25), start=1):
        scores = [rng.choice([0.1, 0.5, 0.5, 0.9, rng.random()]) for _ in range(n)]
        c = max(1, int(round(0.2 * n)))
        order = sorted(range(n), key=lambda i: (scores[i], -i))
        want = list(zip(order[:c], order[::-1][:c]))
        got = [tuple(pair) for pair in exploit(scores, 0.2)]
        assert got == want, f"case {case}: {n} members: the wrong members copy, or copy the wrong parents"
    got = [tuple(pair) for pair in exploit([0.3, 0.1, 0.2, 0.4], 0.5)]
    assert got == [(1, 3), (2, 0)], "fraction 0.5 of 4 members: the wrong pairs"
    for case in range(1, 20):
        names = ["lr", "momentum", "batch_size"][: 1 + case % 3]
        hp = {k: rng.uniform(0.01, 2) for k in names}
        factors = {k: rng.choice([0.8, 1.2]) for k in names}
        low = {k: 0.05 for k in names}
        high = {k: 1.5 for k in names}
        got = explore(dict(hp), factors, low, high)
        assert set(got) == set(hp), f"case {case}: explore must return every hyperparameter"
        for k in names:
            assert math.isclose(got[k], min(max(hp[k] * factors[k], 0.05), 1.5), rel_tol=1e-9), \
                f"case {case}: {k} is not perturbed and clipped"
