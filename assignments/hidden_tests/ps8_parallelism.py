"""Hidden tests of ps8_parallelism: the instructor's side only.

nbgrader releases source/ps8_parallelism/ and nothing else, so this file never reaches students. The
notebook's hidden test cells name a check here and run it through
labkit.grading.hidden.run_hidden_tests, which reports a failure as one line: the message of the
AssertionError raised below. Messages say which case failed, never the expected answer.
"""

import torch
from torch import nn
from torch.nn import functional as F

from labkit.parallel.core_groups import core_groups as reference_core_groups
from labkit.parallel.grid import GridShape
from labkit.parallel.model import split_stages
from labkit.parallel.pipeline import bubble_fraction_model, execute_in_process, simulate
from labkit.parallel.reference import make_mlp
from labkit.parallel.threads import run_threads


def schedules(gpipe, one_f_one_b):
    """Single-process gradients, stash peaks and the bubble for 1 to 5 stages and 1 to 8
    micro-batches, on MLPs of several depths."""
    cases = [(1, 1, (32,)), (1, 3, (16, 16)), (2, 1, (32,)), (2, 6, (16, 16)), (3, 2, (24, 24)),
             (3, 8, (16, 16, 16)), (5, 5, (8, 8, 8, 8)), (4, 3, (16, 16, 16))]
    for case, (p, m, hidden) in enumerate(cases, start=1):
        torch.manual_seed(100 + case)
        x, y = torch.randn(4 * m, 1, 8, 8), torch.randint(0, 10, (4 * m,))
        whole = make_mlp(seed=case, hidden=hidden)
        F.cross_entropy(whole(x), y).backward()
        for name, make in (("gpipe", gpipe), ("1f1b", one_f_one_b)):
            schedule = [[tuple(a) for a in actions] for actions in make(p, m)]
            assert len(schedule) == p, f"case {case}: {name} gives {len(schedule)} ranks for {p} stages"
            model = make_mlp(seed=case, hidden=hidden)
            try:
                run = execute_in_process(schedule, split_stages(model, p, (1, 8, 8)), x, y)
            except ValueError as error:
                raise AssertionError(f"case {case}: {name} with {p} stages, {m} micro-batches: {error}") from None
            for p_, q in zip(model.parameters(), whole.parameters()):
                assert torch.allclose(p_.grad, q.grad, atol=1e-5), (
                    f"case {case}: {name} with {p} stages, {m} micro-batches: not the single-process gradients")
            expected = [m] * p if name == "gpipe" else [min(p - s, m) for s in range(p)]
            assert run["peak_stashed"] == expected, (
                f"case {case}: {name} with {p} stages, {m} micro-batches: wrong number of stashed micro-batches")
            assert abs(simulate(schedule)["bubble"] - bubble_fraction_model(p, m)) < 1e-12, (
                f"case {case}: {name} with {p} stages, {m} micro-batches: the bubble is not (p-1)/(m+p-1)")


def tensor(column_parallel, row_parallel):
    """Column then row parallel MLPs on 1, 2 and 4 ranks against nn.Linear."""
    cases = [(1, 3, 4, 2, 2), (2, 5, 8, 3, 7), (4, 12, 16, 7, 3), (4, 4, 8, 4, 1), (2, 9, 2, 5, 4)]
    for case, (ranks, n_in, n_hidden, n_out, batch) in enumerate(cases, start=1):
        torch.manual_seed(200 + case)
        first, second = nn.Linear(n_in, n_hidden), nn.Linear(n_hidden, n_out)
        x = torch.randn(batch, n_in, requires_grad=True)
        grad_out = torch.randn(batch, n_out)
        hidden = first(x)
        want = second(torch.tanh(hidden))
        want.backward(grad_out)

        def rank(comm, x=x, first=first, second=second, grad_out=grad_out):
            mine = x.detach().clone().requires_grad_(True)
            column, row = column_parallel(first, comm), row_parallel(second, comm)
            h = column(mine)
            out = row(torch.tanh(h))
            out.backward(grad_out)
            return (h.detach(), out.detach(), mine.grad, column.weight.grad, column.bias.grad,
                    row.weight.grad, row.bias.grad)

        results = run_threads(ranks, rank)
        where = f"case {case}: {ranks} ranks, {n_in} -> {n_hidden} -> {n_out}"
        for t, (h, out, gx, gw1, gb1, gw2, gb2) in enumerate(results):
            assert torch.allclose(h, hidden.detach().chunk(ranks, -1)[t], atol=1e-6), (
                f"{where}: rank {t}'s column-parallel output is not its slice")
            assert torch.allclose(out, want.detach(), atol=1e-6), f"{where}: rank {t}'s output differs"
            assert gx is not None and torch.allclose(gx, x.grad, atol=1e-6), f"{where}: rank {t}'s input gradient"
            assert torch.allclose(gw1, first.weight.grad.chunk(ranks, 0)[t], atol=1e-6) and torch.allclose(
                gb1, first.bias.grad.chunk(ranks, 0)[t], atol=1e-6), f"{where}: rank {t}'s column gradients"
            assert torch.allclose(gw2, second.weight.grad.chunk(ranks, 1)[t], atol=1e-6) and torch.allclose(
                gb2, second.bias.grad, atol=1e-6), f"{where}: rank {t}'s row gradients"


def grid(hybrid_groups):
    for case, (d, p, t) in enumerate([(1, 1, 1), (4, 1, 1), (1, 3, 1), (1, 1, 2), (2, 3, 1), (3, 1, 2),
                                      (2, 2, 3)], start=1):
        shape = GridShape(d, p, t)
        got = hybrid_groups(d, p, t)
        for axis in ("data", "pipeline", "tensor"):
            assert sorted(got) == ["data", "pipeline", "tensor"] and [list(g) for g in got[axis]] == sorted(
                shape.groups(axis)), f"case {case}: {d} x {p} x {t}: the {axis} groups are wrong"


def hardware(host_device_bytes, step_time, core_groups):
    for case, (variant, gpus, params, batch) in enumerate([(1, 1, 5, 3), (2, 1, 5, 3), (1, 8, 4096, 256),
                                                            (2, 8, 4096, 256), (1, 3, 0, 7)], start=1):
        want = gpus * batch + (2 * gpus * params if variant == 1 else 0)
        assert host_device_bytes(variant, gpus, params, batch) == want, f"case {case}: host-device bytes"
    for case, (compute, comm) in enumerate([(1.0, 2.0), (2.5, 0.5), (0.0, 0.0)], start=1):
        for variant in (1, 2):
            assert step_time(variant, compute, comm) == compute + comm, f"case {case}: variant {variant} step time"
        assert step_time(3, compute, comm) == max(compute, comm), f"case {case}: variant 3 step time"
    for case, (n, groups) in enumerate([(1, 1), (2, 2), (7, 3), (72, 5), (68, 68), (10, 4)], start=1):
        cores = list(range(100, 100 + n))
        assert [list(g) for g in core_groups(cores, groups)] == reference_core_groups(groups, cores), (
            f"case {case}: {n} cores in {groups} groups")
