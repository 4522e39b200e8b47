"""Hidden tests of ps0_warmup: the instructor's side only.

nbgrader releases source/ps0_warmup/ and nothing else, so this file never reaches students. The
notebook's hidden test cells name a check here and run it through
labkit.grading.hidden.run_hidden_tests. Each check yields its cases, (label, function): every case
runs, each failing one is reported as its label and the message of the AssertionError raised
below, and the cell's points are split over the cases. Labels say on what a case runs and
messages what went wrong, never the expected answer.
"""

import numpy as np
import torch


def sgd(mse_gradients, data_parallel_step):
    """N workers with equal shards take the step torch.optim.SGD takes on the whole batch; one
    case per (model, batch, workers)."""
    cases = [  # (inputs, outputs, batch, workers, learning rate)
        (3, 1, 12, 4, 0.05),
        (5, 3, 16, 2, 0.3),
        (4, 2, 30, 5, 0.001),
        (1, 1, 6, 3, 1.0),
    ]
    for case, (n_in, n_out, batch, workers, lr) in enumerate(cases, start=1):
        label = f"case {case}: {workers} workers, batch {batch}, a ({n_out}, {n_in}) model"
        yield label, lambda args=(case, n_in, n_out, batch, workers, lr): _sgd_case(
            mse_gradients, data_parallel_step, *args)


def _sgd_case(mse_gradients, data_parallel_step, case, n_in, n_out, batch, workers, lr):
    rng = np.random.default_rng(100 + case)
    w, b = rng.normal(size=(n_out, n_in)), rng.normal(size=n_out)
    x, y = rng.normal(size=(batch, n_in)), rng.normal(size=(batch, n_out))

    model = torch.nn.Linear(n_in, n_out, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w))
        model.bias.copy_(torch.from_numpy(b))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.nn.functional.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()

    grad_w, grad_b = mse_gradients(w, b, x, y)
    assert np.allclose(grad_w, model.weight.grad.numpy()) and np.allclose(
        grad_b, model.bias.grad.numpy()
    ), "mse_gradients is wrong"

    optimizer.step()
    shards = list(zip(np.split(x, workers), np.split(y, workers)))
    new_w, new_b = data_parallel_step(w.copy(), b.copy(), shards, lr)
    assert np.allclose(new_w, model.weight.detach().numpy()) and np.allclose(
        new_b, model.bias.detach().numpy()
    ), f"{workers} workers do not take the whole-batch SGD step"


def _reference_schedule(n):
    return [[(r - s) % n for r in range(n)] for s in range(n - 1)] + [
        [(r + 1 - s) % n for r in range(n)] for s in range(n - 1)
    ]


def ring(ring_schedule, ring_allreduce):
    """One case per ring: its schedule, and the sums and bytes of one buffer length and dtype
    (lengths the ring size does not divide, several dtypes)."""
    for n, length, dtype in ((1, 5, np.float64), (2, 7, np.float32), (5, 23, np.float64),
                             (7, 70, np.int64), (6, 4, np.float64)):
        label = f"{n} ranks, {length} elements of {np.dtype(dtype).name}"
        yield label, lambda args=(n, length, dtype): _ring_case(ring_schedule, ring_allreduce, *args)


def _ring_case(ring_schedule, ring_allreduce, n, length, dtype):
    assert np.array_equal(
        np.array(ring_schedule(n)).reshape(-1), np.array(_reference_schedule(n)).reshape(-1)
    ) and len(ring_schedule(n)) == 2 * (n - 1), f"ring_schedule({n}) is wrong"

    rng = np.random.default_rng(n * 1000 + length)
    buffers = [(rng.normal(size=length) * 10).astype(dtype) for _ in range(n)]
    originals = [buffer.copy() for buffer in buffers]
    results, bytes_sent = ring_allreduce(buffers)

    assert len(results) == n, "expected one result per rank"
    total = np.sum(originals, axis=0)
    for rank, result in enumerate(results):
        assert np.shape(result) == (length,) and np.allclose(result, total), (
            f"rank {rank} does not hold the sum")
    assert all(np.array_equal(a, o) for a, o in zip(buffers, originals)), "the input buffers changed"

    chunk_bytes = [c.nbytes for c in np.array_split(originals[0], n)]
    expected = [sum(chunk_bytes[step[rank]] for step in _reference_schedule(n)) for rank in range(n)]
    assert np.array_equal(bytes_sent, expected), "wrong bytes sent per rank"
