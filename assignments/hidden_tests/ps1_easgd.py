"""Hidden tests of ps1_easgd: the instructor's side only (never released; see docs/grading.md).

Every reference here is built on labkit's own update rules, labkit.algorithms.easgd.worker_update
and center_update (equations (1) and (2)), on the same seeds as the student's code. Messages say
which case failed, never the expected answer.
"""

import numpy as np
import torch
import torch.nn.functional as F

from labkit.algorithms.easgd import center_update, worker_update


def _least_squares(workers, dim, seed):
    """grad_fn(i, t, w): worker i's least-squares gradient plus noise fixed by (i, t)."""
    rng = np.random.default_rng(seed)
    data = [(torch.from_numpy(rng.normal(size=(8, dim))), torch.from_numpy(rng.normal(size=8)))
            for _ in range(workers)]

    def grad_fn(i, t, w):
        a, b = data[i]
        noise = torch.from_numpy(np.random.default_rng(seed * 1000 + 31 * i + t).normal(size=dim))
        return a.T @ (a @ w - b) / len(b) + 0.1 * noise
    return grad_fn


def _close(a, b):
    return all(torch.allclose(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64))
               for x, y in zip(a, b)) and len(a) == len(b)


def easgd(student_worker_update, student_center_update, round_robin_easgd):
    """(1), (2) on random tensors; Algorithm 1 for 1 to 4 workers against a labkit-built loop."""
    rng = np.random.default_rng(11)
    for case, (dim, lr, rho) in enumerate([(3, 0.05, 0.9), (7, 0.3, 0.1), (1, 1.0, 2.0)], start=1):
        w, g, c = (torch.from_numpy(rng.normal(size=dim)) for _ in range(3))
        assert torch.allclose(student_worker_update(w, g, c, lr, rho), worker_update(w, g, c, lr, rho)), (
            f"case {case}: worker_update differs from equation (1)")
        ws = [torch.from_numpy(rng.normal(size=dim)) for _ in range(case + 1)]
        assert torch.allclose(student_center_update(c, ws, lr, rho), center_update(c, ws, lr, rho)), (
            f"case {case}: center_update differs from equation (2) with {len(ws)} workers")
        assert torch.equal(w, w.clone()) and torch.equal(c, c.clone())

    for case, (workers, steps, dim, lr, rho) in enumerate(
            [(1, 5, 3, 0.1, 0.5), (3, 7, 4, 0.05, 0.9), (4, 13, 2, 0.2, 0.3), (2, 1, 5, 0.1, 1.0)], start=1):
        grad_fn = _least_squares(workers, dim, seed=case)
        rng = np.random.default_rng(50 + case)
        start_center = torch.from_numpy(rng.normal(size=dim))
        start = [torch.from_numpy(rng.normal(size=dim)) for _ in range(workers)]
        center, ws = start_center.clone(), [w.clone() for w in start]
        for t in range(steps):
            i = t % workers
            received = ws[i]
            ws[i] = worker_update(received, grad_fn(i, t, received), center, lr, rho)
            center = center_update(center, [received], lr, rho)
        got_center, got_workers = round_robin_easgd(start_center.clone(), [w.clone() for w in start],
                                                    grad_fn, steps, lr, rho)
        assert _close(list(got_workers), ws), f"round robin, {workers} workers, {steps} steps: the workers' weights"
        assert _close([got_center], [center]), f"round robin, {workers} workers, {steps} steps: the center"


def _reference_ps(w, grad_fn, schedule, lr, lock):
    version, read_version, pending, staleness = 0, {}, {}, []
    for worker, event in schedule:
        if event == "read" and not lock:
            pending[worker], read_version[worker] = grad_fn(worker, w), version
        elif event == "write":
            if lock:
                pending[worker], read_version[worker] = grad_fn(worker, w), version
            w = w - lr * pending.pop(worker)
            staleness.append(version - read_version.pop(worker))
            version += 1
    return w, staleness


def _random_schedule(rng, workers, rounds):
    """Each worker reads then writes, `rounds` times, the workers' events interleaved at random."""
    queues = {k: [(k, e) for _ in range(rounds) for e in ("read", "write")] for k in range(workers)}
    schedule = []
    while queues:
        k = list(queues)[rng.integers(len(queues))]
        schedule.append(queues[k].pop(0))
        if not queues[k]:
            del queues[k]
    return schedule


def _reference_async(center, workers, grad_fn, arrivals, lr, rho, momentum):
    workers = list(workers)
    velocities = [torch.zeros_like(w) for w in workers]
    for group in arrivals:
        read, written = center, center
        for i in group:
            received = workers[i]
            velocities[i] = momentum * velocities[i] - lr * grad_fn(i, received)
            # (1) with momentum: W + V - lr rho (W - center) is worker_update with grad = -V / lr
            workers[i] = worker_update(received, -velocities[i] / lr, read, lr, rho)
            written = center_update(read, [received], lr, rho)
        center = written
    return center, workers


def asynchronous(ps_sgd, async_easgd):
    """Random schedules with and without the lock; Async, Hogwild and momentum EASGD."""
    for case, (workers, rounds, dim) in enumerate([(2, 3, 3), (3, 4, 2), (5, 2, 4)], start=1):
        rng = np.random.default_rng(200 + case)
        targets = [torch.from_numpy(rng.normal(size=dim)) for _ in range(workers)]
        grad_fn = lambda k, w: 2 * (w - targets[k])  # noqa: E731
        schedule = _random_schedule(rng, workers, rounds)
        w0 = torch.from_numpy(rng.normal(size=dim))
        for lock in (True, False):
            want_w, want_staleness = _reference_ps(w0.clone(), grad_fn, schedule, 0.1, lock)
            got_w, got_staleness = ps_sgd(w0.clone(), grad_fn, schedule, 0.1, lock)
            what = "with the lock" if lock else "Hogwild"
            assert list(got_staleness) == want_staleness, f"case {case}, {what}: the staleness of the writes"
            assert _close([got_w], [want_w]), f"case {case}, {what}: the final weights"

    for case, (workers, arrivals, momentum) in enumerate([
            (2, [(0,), (1,), (1,), (0,), (0,)], 0.0),
            (3, [(0, 1), (2,), (1, 2, 0), (1,)], 0.0),
            (3, [(0,), (1,), (0,), (2,), (0,), (1,)], 0.9),
            (2, [(0, 1), (1, 0), (0,)], 0.5)], start=1):
        rng = np.random.default_rng(300 + case)
        targets = [torch.from_numpy(rng.normal(size=3)) for _ in range(workers)]
        grad_fn = lambda k, w: w - targets[k]  # noqa: E731
        center0 = torch.from_numpy(rng.normal(size=3))
        start = [torch.from_numpy(rng.normal(size=3)) for _ in range(workers)]
        want_center, want_workers = _reference_async(center0.clone(), start, grad_fn, arrivals, 0.2, 0.7, momentum)
        got_center, got_workers = async_easgd(center0.clone(), [w.clone() for w in start], grad_fn, arrivals,
                                              0.2, 0.7, momentum)
        kind = "Async MEASGD" if momentum else ("Hogwild EASGD" if any(len(g) > 1 for g in arrivals)
                                                else "Async EASGD")
        assert _close(list(got_workers), want_workers), f"case {case} ({kind}): the workers' weights"
        assert _close([got_center], [want_center]), f"case {case} ({kind}): the center"


def synchronous(pack, unpack, tree_sum, sync_easgd_step):
    """Packing other models; tree levels for 1 to 9 workers; several Sync EASGD steps."""
    torch.manual_seed(0)
    for case, model in enumerate([torch.nn.Conv2d(2, 3, 3), torch.nn.Sequential(
            torch.nn.Linear(1, 5), torch.nn.Linear(5, 5, bias=False), torch.nn.LayerNorm(5))], start=1):
        layers = [p.detach().clone() for p in model.parameters()]
        flat = pack(layers)
        assert flat.dim() == 1 and torch.equal(flat, torch.nn.utils.parameters_to_vector(layers)), (
            f"model {case}: pack differs from parameters_to_vector")
        back = unpack(flat, layers)
        assert len(back) == len(layers) and all(a.shape == b.shape and torch.equal(a, b)
                                                for a, b in zip(back, layers)), f"model {case}: unpack"
    for workers in range(1, 10):
        items = [torch.full((3,), 2.0 ** k) for k in range(workers)]
        total, levels = tree_sum(items)
        assert torch.equal(total, sum(items)), f"tree_sum of {workers} tensors: the sum"
        assert levels == int(np.ceil(np.log2(workers))), f"tree_sum of {workers} tensors: the number of levels"
    rng = np.random.default_rng(400)
    for workers in (1, 3, 6):
        center = torch.from_numpy(rng.normal(size=4))
        ws = [torch.from_numpy(rng.normal(size=4)) for _ in range(workers)]
        want_center, want_workers = center.clone(), [w.clone() for w in ws]
        for step in range(3):
            grads = [torch.from_numpy(np.random.default_rng(step * 10 + k).normal(size=4)) for k in range(workers)]
            center, ws = sync_easgd_step(center, ws, grads, 0.1, 0.5)
            new_workers = [worker_update(w, g, want_center, 0.1, 0.5) for w, g in zip(want_workers, grads)]
            want_center = center_update(want_center, want_workers, 0.1, 0.5)
            want_workers = new_workers
        assert _close([center], [want_center]) and _close(list(ws), want_workers), (
            f"Sync EASGD with {workers} workers, 3 steps")


def cnn(cnn_forward, cnn_gradients, master_step):
    """Other sizes and uneven shards against autograd and torch.optim.SGD."""
    for case, (batch, channels, size, classes, cuts, lr) in enumerate(
            [(5, 1, 5, 2, [1, 5], 0.3), (9, 3, 7, 4, [2, 5, 9], 0.05), (4, 2, 4, 5, [4], 1.0)], start=1):
        rng = np.random.default_rng(500 + case)
        hidden = channels * (size - 2) ** 2
        params = {"conv": rng.normal(size=(channels, 1, 3, 3)), "weight": rng.normal(size=(classes, hidden)) * 0.3,
                  "bias": rng.normal(size=classes)}
        x, y = rng.normal(size=(batch, 1, size, size)), rng.integers(0, classes, size=batch)
        tensors = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
        logits = F.linear(F.relu(F.conv2d(torch.from_numpy(x), tensors["conv"])).flatten(1),
                          tensors["weight"], tensors["bias"])
        assert np.allclose(cnn_forward(params, x), logits.detach().numpy()), f"case {case}: the forward pass"
        F.cross_entropy(logits, torch.from_numpy(y), reduction="sum").backward()
        grads = cnn_gradients(params, x, y)
        for name, tensor in tensors.items():
            assert np.allclose(grads[name], tensor.grad.numpy()), f"case {case}: the gradient of {name}"
        for tensor in tensors.values():
            tensor.grad /= batch
        torch.optim.SGD(tensors.values(), lr=lr).step()
        bounds = [0, *cuts]
        shards = [(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]
        new = master_step(params, shards, lr)
        for name, tensor in tensors.items():
            assert np.allclose(new[name], tensor.detach().numpy()), (
                f"case {case}: {name} after the master's step over {len(shards)} shards")
