"""Hidden tests of ps2_consistency: the instructor's side only (never released; see docs/grading.md).

Messages say which case failed, never the expected answer. The SSP checks use threads with short
timeouts, so a clock that never wakes its readers fails in a second rather than hanging.
"""

import threading
import time

import numpy as np


def ssp(SSPClock):
    """Random tick orders against the rule; readers woken exactly by the tick that frees them."""
    for case, (workers, staleness) in enumerate([(2, 0), (3, 1), (5, 2), (4, 3)], start=1):
        rng = np.random.default_rng(case)
        clock, clocks = SSPClock(workers, staleness), [0] * workers
        for _ in range(25):
            k = int(rng.integers(workers))
            clock.tick(k)
            clocks[k] += 1
            for p in range(workers):
                want = clocks[p] - min(clocks) <= staleness
                assert clock.wait(p, timeout=0 if want else 0.01) is want, (
                    f"case {case}: {workers} workers, s = {staleness}: wait() at clocks {clocks} for worker {p}")

    # Readers blocked at once; each tick wakes exactly those it frees.
    clock = SSPClock(3, staleness=1)
    for _ in range(3):
        clock.tick(0)  # worker 0 at 3: needs min >= 2
    for _ in range(2):
        clock.tick(1)  # worker 1 at 2: needs min >= 1
    results = {}

    def read(worker):
        results[worker] = clock.wait(worker, timeout=5)

    readers = [threading.Thread(target=read, args=(w,), daemon=True) for w in (0, 1)]
    for reader in readers:
        reader.start()
    time.sleep(0.15)
    assert not results, "3 workers, s = 1, clocks [3, 2, 0]: workers 0 and 1 must both block"
    clock.tick(2)  # clocks [3, 2, 1]: frees worker 1 only
    readers[1].join(timeout=2)
    time.sleep(0.1)
    assert results.get(1) is True, "clocks [3, 2, 1], s = 1: worker 1 must be woken"
    assert 0 not in results, "clocks [3, 2, 1], s = 1: worker 0 must still block"
    clock.tick(2)  # [3, 2, 2]: frees worker 0
    readers[0].join(timeout=2)
    assert results.get(0) is True, "clocks [3, 2, 2], s = 1: worker 0 must be woken"
    start = time.monotonic()
    assert clock.wait(2, timeout=None) is True and time.monotonic() - start < 1, (
        "the slowest worker never blocks, with no timeout")


def gossip(ring_mixing_matrix, gossip_average):
    """Rings of 1 to 9 nodes, vectors per node, the mean kept and reached."""
    for n in range(1, 10):
        mixing = np.asarray(ring_mixing_matrix(n), dtype=float)
        want = np.zeros((n, n))
        for i in range(n):
            group = {i, (i - 1) % n, (i + 1) % n}
            for j in group:
                want[i, j] = 1 / len(group)
        assert mixing.shape == (n, n) and np.allclose(mixing, want), f"ring_mixing_matrix({n})"
        rng = np.random.default_rng(n)
        values = rng.normal(size=(n, 3)) * 10
        kept = values.copy()
        for rounds in (0, 1, 3):
            got = np.asarray(gossip_average(values, mixing, rounds))
            assert got.shape == values.shape and np.allclose(got, np.linalg.matrix_power(want, rounds) @ values), (
                f"{n} nodes, {rounds} rounds: the values")
            assert np.allclose(got.mean(axis=0), values.mean(axis=0)), f"{n} nodes, {rounds} rounds: the mean moved"
        assert np.array_equal(values, kept), f"{n} nodes: gossip_average changed its input"
        assert np.allclose(gossip_average(values, mixing, 400), values.mean(axis=0)), f"{n} nodes: no convergence"
    # another doubly stochastic matrix: a complete graph on 4 nodes
    complete = np.full((4, 4), 0.25)
    assert np.allclose(gossip_average(np.arange(4.0), complete, 1), 1.5), "any mixing matrix: one round"


def _reference_averaging(w, grad_fns, steps, period, lr):
    replicas = [np.array(w, dtype=float) for _ in grad_fns]
    for step in range(1, steps + 1):
        replicas = [r - lr * g(r) for r, g in zip(replicas, grad_fns)]
        if step % period == 0:
            mean = sum(replicas) / len(replicas)
            replicas = [mean.copy() for _ in replicas]
    return sum(replicas) / len(replicas)


def averaging(model_averaging, fedavg):
    """1 to 4 workers, several periods; FedAvg with unequal clients."""
    for case, (workers, steps, period) in enumerate([(1, 3, 1), (2, 5, 2), (3, 6, 3), (4, 7, 1), (3, 4, 5)], start=1):
        rng = np.random.default_rng(70 + case)
        mats = [rng.normal(size=(3, 3)) for _ in range(workers)]
        targets = [rng.normal(size=3) for _ in range(workers)]
        grad_fns = [lambda w, a=a, t=t: a.T @ (a @ w - t) / 3 for a, t in zip(mats, targets)]
        w = rng.normal(size=3)
        got = model_averaging(w.copy(), grad_fns, steps, period, 0.1)
        assert np.allclose(got, _reference_averaging(w, grad_fns, steps, period, 0.1)), (
            f"case {case}: {workers} workers, {steps} steps, period {period}")
        if period == 1:
            sync = w.copy()
            for _ in range(steps):
                sync = sync - 0.1 * np.mean([g(sync) for g in grad_fns], axis=0)
            assert np.allclose(got, sync), f"case {case}: period 1 must be synchronous SGD"
    models = [np.array([1.0, 2.0]), np.array([3.0, -1.0]), np.array([0.0, 0.0])]
    assert np.allclose(fedavg(models, [1, 2, 7]), (models[0] + 2 * models[1]) / 10), "FedAvg, 3 clients"
    assert np.allclose(fedavg(models[:1], [5]), models[0]), "FedAvg, one client"


def _random_events(rng, workers, pushes, steps_per_push):
    queues = {}
    for k in range(workers):
        queue = []
        for _ in range(pushes):
            queue += [(k, "fetch")] + [(k, "step")] * steps_per_push + [(k, "push")]
        queues[k] = queue
    events = []
    while queues:
        k = list(queues)[rng.integers(len(queues))]
        events.append(queues[k].pop(0))
        if not queues[k]:
            del queues[k]
    return events


def downpour(downpour):
    """Random interleavings of fetch / step / push."""
    for case, (workers, pushes, steps_per_push) in enumerate([(2, 3, 1), (3, 2, 3), (4, 3, 2)], start=1):
        rng = np.random.default_rng(90 + case)
        targets = [rng.normal(size=2) for _ in range(workers)]
        grad_fn = lambda k, w: 2 * (w - targets[k])  # noqa: E731
        events = _random_events(rng, workers, pushes, steps_per_push)
        version, local, fetched, acc, staleness, w = 0, {}, {}, {}, [], np.zeros(2)
        for k, event in events:
            if event == "fetch":
                local[k], fetched[k], acc[k] = w.copy(), version, 0.0
            elif event == "step":
                g = grad_fn(k, local[k])
                local[k], acc[k] = local[k] - 0.05 * g, acc[k] + g
            else:
                w, acc[k] = w - 0.05 * acc[k], 0.0
                staleness.append(version - fetched[k])
                version += 1
        got_w, got_staleness = downpour(np.zeros(2), grad_fn, events, 0.05)
        assert list(got_staleness) == staleness, f"case {case}: {workers} workers, the staleness of each push"
        assert np.allclose(got_w, w), f"case {case}: {workers} workers, the server's weights"
