"""Local SGD, gossip and federated averaging: their pieces in-process (non-IID shards, client
rounds, the gossip ring routing around a dead rank), then the modes end to end."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from labkit.algorithms.fedavg import Federation, label_skewed_shards
from labkit.algorithms.gossip import Ring
from labkit.algorithms.local_sgd import is_averaging_step
from labkit.comm import PeerError
from labkit.data import load_dataset
from labkit.runs import RunDir

from .conftest import run_cli
from .sync_runs import events, train, train_and_kill

MODES = ["local-sgd", "gossip", "fedavg"]


# --- local SGD ----------------------------------------------------------------------------------
def test_local_sgd_averages_every_h_steps_at_checkpoints_and_at_the_end():
    ctx = SimpleNamespace(checkpoint_every=10, total_steps=23)
    assert [s for s in range(1, 24) if is_averaging_step(ctx, s, every=4)] == [4, 8, 10, 12, 16, 20, 23]
    ctx.checkpoint_every = 0
    assert [s for s in range(1, 24) if is_averaging_step(ctx, s, every=8)] == [8, 16, 23]


# --- federated averaging ----------------------------------------------------------------------
def test_label_skewed_shards_split_the_data_with_few_labels_per_client():
    labels = load_dataset("digits", None).y_train
    shards = label_skewed_shards(labels, clients=16, seed=0)
    everything = torch.cat(shards)
    assert torch.equal(everything.sort().values, torch.arange(len(labels)))  # each sample once
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 2
    distinct = [len(labels[s].unique()) for s in shards]
    assert max(distinct) <= 4 and sum(distinct) / len(distinct) <= 3  # of the ten digits
    assert all(torch.equal(a, b) for a, b in zip(shards, label_skewed_shards(labels, 16, seed=0)))


def test_federation_shares_each_round_between_the_ranks():
    data = load_dataset("digits", None)
    options = {"clients": 16, "client_fraction": 0.5, "local_epochs": 2}

    def federation(rank):
        ctx = SimpleNamespace(data=data, seed=3, rank=rank, world=4, batch_size=32,
                              device=torch.device("cpu"))
        return Federation(ctx, **options)

    ranks = [federation(rank) for rank in range(4)]
    for round_ in (1, 2):
        shares = [f.round_clients(round_) for f in ranks]
        chosen = sum(shares, [])
        assert len(chosen) == len(set(chosen)) == 8  # C K clients, each trained by one rank
        assert all(len(share) == 2 for share in shares)
    assert ranks[0].round_clients(1) != ranks[0].round_clients(2)
    client = ranks[0].round_clients(1)[0]
    batches = list(ranks[0].client_batches(1, client))
    assert sum(len(y) for _, y in batches) == 2 * ranks[0].samples(client)  # two local epochs


# --- the gossip ring, over in-process ranks with blocking sends -------------------------------
class World:
    """Ranks as threads; a send waits until the message is received, as gloo's does; a rank
    that dies makes every send to it and every receive from it fail."""

    def __init__(self, size: int):
        self.size = size
        self.messages: dict = {}
        self.dead: set[int] = set()
        self.changed = threading.Condition()

    def kill(self, rank: int) -> None:
        with self.changed:
            self.dead.add(rank)
            for (src, dst), queue in self.messages.items():
                if rank in (src, dst):
                    queue.clear()  # its sends never completed, nor the sends to it
            self.changed.notify_all()

    def comm(self, rank: int):
        world = self

        class Comm:
            def send(self, tensor, dst):
                delivered = threading.Event()
                with world.changed:
                    queue = world.messages.setdefault((rank, dst), [])
                    queue.append((tensor.clone(), delivered))
                    world.changed.notify_all()
                    while not delivered.is_set():
                        if dst in world.dead:
                            queue.clear()
                            raise PeerError(f"send to {dst}: dead")
                        world.changed.wait(0.01)

            def recv(self, tensor, src):
                with world.changed:
                    while not world.messages.get((src, rank)):
                        if src in world.dead:
                            raise PeerError(f"recv from {src}: dead")
                        world.changed.wait(0.01)
                    message, delivered = world.messages[(src, rank)].pop(0)
                    tensor.copy_(message)
                    delivered.set()
                    world.changed.notify_all()
                return src

        return Comm()


def gossip_on_threads(size: int, steps: int, victim: int, dies_after: int, half_exchange: bool):
    """Every rank starts from weights (rank, rank) and gossips for ``steps`` steps; the victim
    dies after ``dies_after`` steps, or with ``half_exchange`` in the middle of the next one,
    having exchanged with its right neighbour only (which then notices a step later)."""
    world, weights, rings, logged = World(size), {}, {}, []

    def rank_main(rank):
        ctx = SimpleNamespace(rank=rank, world=size, comm=world.comm(rank),
                              event=lambda name, **fields: logged.append((rank, name, fields)))
        mine = torch.full((2,), float(rank))
        ring = rings[rank] = Ring(ctx, size=3)
        for step in range(1, steps + 1):
            if rank == victim and step > dies_after:
                if half_exchange:
                    right = ring.neighbours()[-1]
                    ctx.comm.send(torch.cat([mine, mine.new_zeros(1)]), right)
                    ring.mailbox(right).get()
                world.kill(rank)
                return
            theirs = ring.exchange(mine, final=step == steps)
            mine = torch.stack([mine, *theirs]).mean(0)
        ring.drain(mine)
        ring.report_done()
        weights[rank] = mine

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a rank is stuck"
    assert not {pair: q for pair, q in world.messages.items() if q}, "a message was never received"
    return weights, rings, logged


def test_ring_neighbours_skip_dead_ranks():
    ring = Ring(SimpleNamespace(rank=1, world=4), size=3)
    assert ring.neighbours() == [0, 2]
    ring.dead.add(2)
    assert ring.neighbours() == [0, 3]
    ring.dead.update({0, 3})
    assert ring.neighbours() == []
    assert Ring(SimpleNamespace(rank=0, world=2), size=3).neighbours() == [1]


@pytest.mark.timeout(60)
def test_gossip_brings_the_replicas_together():
    weights, _, logged = gossip_on_threads(size=5, steps=40, victim=None, dies_after=0, half_exchange=False)
    values = torch.stack(list(weights.values()))
    assert values.max() - values.min() < 1e-3
    assert torch.allclose(values.mean(), torch.tensor(2.0))  # the ring's mixing keeps the mean
    assert logged == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("half_exchange", [False, True])
def test_gossip_routes_around_a_dead_rank(half_exchange):
    weights, rings, logged = gossip_on_threads(size=4, steps=40, victim=2, dies_after=10,
                                               half_exchange=half_exchange)
    assert sorted(weights) == [0, 1, 3]
    values = torch.stack(list(weights.values()))
    assert values.max() - values.min() < 1e-3  # the three go on agreeing
    assert sorted((rank, fields["lost"]) for rank, name, fields in logged) == [(1, 2), (3, 2)]
    assert rings[1].neighbours() == [0, 3] and rings[3].neighbours() == [1, 0]
    assert rings[0].dead == {2}  # rank 0 heard from every live rank at the end


# --- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", ["local", "mpi"])
@pytest.mark.parametrize("mode", MODES)
def test_mode_reaches_93_percent(tmp_path, no_leftovers, mode, launcher):
    result = train(tmp_path / "run", sync=mode, launcher=launcher)
    assert result.status == "completed", result.error
    assert result.test_accuracy >= 0.93
    assert result.summary["bytes_sent"] > 0 and 0 < result.summary["comm_fraction"] < 1
    last = {r["rank"]: r for r in result.metrics("train")}
    assert sorted(last) == [0, 1, 2, 3]
    for record in last.values():
        assert {"loss", "accuracy", "samples", "bytes_sent", "compute_s", "comm_s", "wait_s"} <= set(record)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_gossip_survives_a_killed_worker(tmp_path, no_leftovers):
    result, killed_at = train_and_kill(tmp_path / "run", victim=2, at_step=20, sync="gossip")
    assert result.status == "completed", result.error
    assert killed_at < result.summary["steps"]
    assert result.test_accuracy >= 0.9
    assert [e["rank"] for e in events(result.run_dir, "worker_lost")] == [2]
    assert sorted(e["rank"] for e in events(result.run_dir, "gossip_reroute")) == [1, 3]
    assert result.summary["ranks_lost"] == [2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_sgd_fails_cleanly_and_resume_finishes(tmp_path, no_leftovers):
    run_dir = tmp_path / "run"
    result, _ = train_and_kill(run_dir, victim=2, at_step=30, sync="local-sgd", checkpoint_every=20)
    assert result.status == "failed"
    assert "rank 2" in result.error
    assert RunDir(run_dir).latest_checkpoint() is not None
    resumed = run_cli("train", "--run-dir", run_dir, "--resume", "--quiet", timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    summary = RunDir(run_dir).read_summary()
    assert summary["status"] == "completed" and summary["test_accuracy"] >= 0.93
