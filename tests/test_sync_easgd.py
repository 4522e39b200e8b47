"""EASGD: the update rules against hand-computed examples, the tree reduction, and the five
modes end to end (accuracy under both launchers, the variants of Sync EASGD, lost workers)."""

from __future__ import annotations

import threading

import pytest
import torch

from labkit.algorithms.easgd import (
    center_update,
    center_update_reduced,
    momentum_worker_update,
    worker_update,
)
from labkit.comm.collectives import tree_reduce
from labkit.data import batches_per_epoch, train_size
from labkit.runs import RunDir

from .sync_runs import events, train, train_and_kill

EASGD_MODES = ["easgd-rr", "easgd-async", "measgd-async", "easgd-hogwild", "easgd-sync"]


# --- equations (1) and (2), by hand ---------------------------------------------------------
def test_worker_update_is_equation_1():
    w, grad, center = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.0, 0.0])
    # 1 - 0.1 * (0.5 + 2 * (1 - 0)) = 0.75;  -2 - 0.1 * (1 + 2 * (-2 - 0)) = -1.7
    assert torch.allclose(worker_update(w, grad, center, lr=0.1, rho=2.0), torch.tensor([0.75, -1.7]))


def test_worker_update_without_gradient_moves_toward_the_center():
    # 4 - 0.25 * 1 * (4 - 0) = 3
    assert worker_update(torch.tensor([4.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.25, 1.0).item() == 3.0


def test_center_update_is_equation_2():
    center = torch.tensor([1.0, 0.0])
    workers = [torch.tensor([3.0, 1.0]), torch.tensor([0.0, -3.0])]
    # differences (2, 1) and (-1, -3): sum (1, -2); times rho 0.5 and lr 0.5: (0.25, -0.5)
    assert torch.allclose(center_update(center, workers, lr=0.5, rho=0.5), torch.tensor([1.25, -0.5]))


def test_center_update_with_one_worker_is_line_13_of_algorithm_1():
    # 2 + 0.1 * 2 * (4 - 2) = 2.4
    assert center_update(torch.tensor([2.0]), [torch.tensor([4.0])], lr=0.1, rho=2.0).item() == pytest.approx(2.4)


def test_center_update_from_the_reduced_sum_is_the_same_equation():
    generator = torch.Generator().manual_seed(0)
    center = torch.randn(5, generator=generator)
    workers = [torch.randn(5, generator=generator) for _ in range(3)]
    reduced = sum(w - center for w in workers)
    assert torch.allclose(center_update_reduced(center, reduced, 0.05, 2.0), center_update(center, workers, 0.05, 2.0))


def test_momentum_worker_update_by_hand():
    w, velocity, grad, center = (torch.tensor([x]) for x in (1.0, 0.5, 2.0, 0.0))
    new_w, new_velocity = momentum_worker_update(w, velocity, grad, center, lr=0.1, rho=1.0, momentum=0.9)
    # V = 0.9 * 0.5 - 0.1 * 2 = 0.25;  W = 1 + 0.25 - 0.1 * 1 * (1 - 0) = 1.15
    assert new_velocity.item() == pytest.approx(0.25)
    assert new_w.item() == pytest.approx(1.15)


def test_momentum_worker_update_without_momentum_is_equation_1():
    w, grad, center = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.3, 0.1])
    new_w, _ = momentum_worker_update(w, torch.zeros(2), grad, center, 0.1, 2.0, momentum=0.0)
    assert torch.allclose(new_w, worker_update(w, grad, center, 0.1, 2.0))


def test_elastic_force_conserves_the_sum_of_workers_and_center():
    """Without gradients, (1) and (2) move weight between workers and center, nothing else."""
    center, workers = torch.tensor([0.0, 1.0]), [torch.tensor([2.0, -1.0]), torch.tensor([4.0, 3.0])]
    moved = [worker_update(w, torch.zeros(2), center, 0.1, 2.0) for w in workers]
    new_center = center_update(center, workers, 0.1, 2.0)
    assert torch.allclose(sum(moved) + new_center, sum(workers) + center)


# --- the tree reduction of Sync EASGD 1, over an in-process communicator ---------------------
class Mailboxes:
    """Point-to-point messages between threads standing in for ranks."""

    def __init__(self):
        self.boxes: dict = {}
        self.lock = threading.Condition()

    def comm(self, rank: int, size: int):
        boxes = self

        class Comm:
            def __init__(self):
                self.rank, self.size = rank, size

            def send(self, tensor, dst):
                with boxes.lock:
                    boxes.boxes.setdefault((rank, dst), []).append(tensor.clone())
                    boxes.lock.notify_all()

            def recv(self, tensor, src):
                with boxes.lock:
                    boxes.lock.wait_for(lambda: boxes.boxes.get((src, rank)), timeout=10)
                    tensor.copy_(boxes.boxes[(src, rank)].pop(0))
                return src

        return Comm()


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8])
def test_tree_reduce_sums_onto_rank_0(size):
    boxes, results = Mailboxes(), {}

    def run(rank):
        results[rank] = tree_reduce(boxes.comm(rank, size), torch.tensor([float(rank + 1), 1.0]))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert torch.equal(results[0], torch.tensor([size * (size + 1) / 2, float(size)]))
    assert all(results[r] is None for r in range(1, size))
    assert not any(boxes.boxes.values()), "a message was sent and never received"


# --- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", ["local", "mpi"])
@pytest.mark.parametrize("mode", EASGD_MODES)
def test_easgd_mode_reaches_93_percent(tmp_path, no_leftovers, mode, launcher):
    result = train(tmp_path / "run", sync=mode, launcher=launcher)
    assert result.status == "completed", result.error
    assert result.test_accuracy >= 0.93
    summary = result.summary
    assert summary["bytes_sent"] > 0 and 0 < summary["comm_fraction"] < 1
    # every rank logged the same metrics as allreduce; the master evaluated the center
    last = {r["rank"]: r for r in result.metrics("train")}
    assert sorted(last) == [0, 1, 2, 3]
    for record in last.values():
        assert {"loss", "accuracy", "samples", "bytes_sent", "compute_s", "comm_s", "wait_s"} <= set(record)
    assert [r["rank"] for r in result.metrics("eval")] == [0] * len(result.metrics("eval"))
    # --epochs counts passes of each of the 3 workers over its third of the data
    assert summary["steps"] == 10 * batches_per_epoch(train_size("digits", None), 3, 32)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sync_easgd_variants_compute_the_same_weights(tmp_path, no_leftovers):
    """Variant 3 (overlapped) computes exactly what variant 1 does; compressing the elastic
    differences sends fewer bytes."""
    results = {variant: train(tmp_path / f"v{variant}", sync="easgd-sync", easgd_variant=variant, steps=12)
               for variant in (1, 3)}
    assert all(r.status == "completed" for r in results.values())
    weights = [RunDir(r.run_dir).load_checkpoint()["model"] for r in results.values()]
    for other in weights[1:]:
        assert all(torch.equal(weights[0][name], other[name]) for name in weights[0])
    topk = train(tmp_path / "topk", sync="easgd-sync", easgd_variant=3, steps=12, compression="topk",
                 compression_params={"ratio": 0.05})
    assert topk.status == "completed", topk.error
    assert topk.summary["bytes_sent"] < 0.6 * results[3].summary["bytes_sent"]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["easgd-async", "measgd-async", "easgd-hogwild"])
def test_async_easgd_survives_a_killed_worker(tmp_path, no_leftovers, mode):
    result, killed_at = train_and_kill(tmp_path / "run", victim=2, at_step=20, sync=mode)
    assert result.status == "completed", result.error
    assert killed_at < result.summary["steps"], "the worker was killed too late to matter"
    assert result.test_accuracy >= 0.9
    assert [e["rank"] for e in events(result.run_dir, "worker_lost")] == [2]
    assert [e["worker"] for e in events(result.run_dir, "worker_dropped")] == [2]
    assert result.summary["workers_lost"] == [2]
