"""Federated averaging (FedAvg): many clients with their own, non-IID data; a few per round.

The NTHU slides (*Distributed & Parallel Computing for Deep Learning*, chap. 12, slide
"Federated Learning": "training the model with local data, preserving data privacy"), with
the algorithm of McMahan et al., *Communication-Efficient Learning of Deep Networks from
Decentralized Data* (AISTATS 2017), Algorithm 1 "FederatedAveraging". Each round t:

    choose m = max(round(C K), 1) of the K clients at random: S_t
    each client k in S_t starts from w_t and runs E epochs of SGD on its own n_k samples
    w_{t+1} = Σ_{k in S_t} (n_k / n) w^k_{t+1},    n = Σ_{k in S_t} n_k

with K = ``--clients``, C = ``--client-fraction``, E = ``--local-epochs`` and the run's
optimizer and batch size. The clients are simulated: the N ranks share the clients of a
round (rank r trains the r-th, (r+N)-th, ... of them) and one allreduce per round sums
Σ n_k (w^k_{t+1} − w_t) and Σ n_k (the update compressed with ``--compression``), so every
rank gets w_{t+1}. The data never leaves its client; only weights travel.

A step here is a communication round: ``--steps`` and ``--epochs`` set the number of rounds
as they set the number of synchronizations in the other modes. The metrics' ``epoch`` is
the number of passes over the training set the clients have made together so far.

The clients' data is not IID: :func:`label_skewed_shards` deals it as McMahan et al.'s
"pathological non-IID" split, so that each client holds two to four digits only. Every rank
holds the global model; rank 0 evaluates and checkpoints it. A lost rank stops the
round's allreduce: the run fails, and ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..registry import SYNC_MODES
from .base import RankContext, SyncMode, TrainMeter, checkpoint_state, end_step, restore

SHARDS_PER_CLIENT = 2


def label_skewed_shards(labels: torch.Tensor, clients: int, seed: int) -> list[torch.Tensor]:
    """The indices of each client's samples: sorted by label, cut into 2K shards, 2 per client.

    Sorting by label (ties in a seeded random order) and cutting the sorted list into
    equal shards makes each shard hold one label, or two where it straddles a boundary;
    each client gets two shards at random, so it sees two to four of the ten digits.
    """
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(labels), generator=generator)
    by_label = shuffled[torch.argsort(labels[shuffled], stable=True)]
    shards = torch.tensor_split(by_label, SHARDS_PER_CLIENT * clients)
    dealt = torch.randperm(len(shards), generator=generator).view(clients, SHARDS_PER_CLIENT)
    return [torch.cat([shards[j] for j in hand]) for hand in dealt.tolist()]


def too_many_clients(clients: int, dataset: str, data_dir: str | None):
    from ..data import train_size

    n = train_size(dataset, data_dir)
    if SHARDS_PER_CLIENT * clients > n:
        return "--clients", (f"{clients} clients need {SHARDS_PER_CLIENT * clients} shards of "
                             f"{dataset}'s {n} training samples; use at most {n // SHARDS_PER_CLIENT}")
    return None


class Federation:
    """The clients' shards and who takes part in which round (the same on every rank)."""

    def __init__(self, ctx: RankContext, clients: int, client_fraction: float, local_epochs: int):
        self.ctx = ctx
        self.shards = label_skewed_shards(ctx.data.y_train, clients, ctx.seed)
        self.per_round = max(1, round(client_fraction * clients))
        self.local_epochs = local_epochs

    def round_clients(self, round_: int) -> list[int]:
        """The clients this rank trains in ``round_``: its share of the round's random pick."""
        generator = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + round_)
        chosen = torch.randperm(len(self.shards), generator=generator)[:self.per_round].tolist()
        return chosen[self.ctx.rank::self.ctx.world]

    def samples(self, client: int) -> int:
        return len(self.shards[client])

    def epochs_done(self, round_: int) -> int:
        """Passes over the whole training set that ``round_`` rounds amount to."""
        return round_ * self.per_round * self.local_epochs // len(self.shards)

    def client_batches(self, round_: int, client: int):
        """The client's own data, ``--local-epochs`` times, reshuffled each time."""
        ctx, indices = self.ctx, self.shards[client]
        generator = torch.Generator().manual_seed((ctx.seed * 1_000_003 + round_) * 1_009 + client)
        for _ in range(self.local_epochs):
            order = indices[torch.randperm(len(indices), generator=generator)]
            for batch in order.split(ctx.batch_size):
                yield ctx.data.x_train[batch].to(ctx.device), ctx.data.y_train[batch].to(ctx.device)


def sum_over_ranks(ctx: RankContext, update, weight: float):
    """Σ over ranks of the weighted update (compressed with ``--compression``) and of the weight."""
    with ctx.timers.time("comm"):
        ctx.compressed.allreduce(update, key="client-update")
        return update, float(ctx.comm.allreduce(torch.tensor([weight], dtype=torch.float64)))


@SYNC_MODES.register("fedavg", help="federated averaging: --clients with non-IID data, a --client-fraction of "
                                    "them per round, --local-epochs each",
                     settings=("clients", "client_fraction", "local_epochs"), validate=too_many_clients)
class FederatedAveraging(SyncMode):
    def __init__(self, clients: int, client_fraction: float, local_epochs: int):
        self.settings = {"clients": clients, "client_fraction": client_fraction, "local_epochs": local_epochs}

    def run(self, ctx: RankContext) -> dict:
        model = ctx.model
        federation = Federation(ctx, **self.settings)
        start = restore(ctx, model, None)
        done_before = sum(federation.local_epochs * federation.samples(client)
                          for round_ in range(1, start + 1) for client in federation.round_clients(round_))
        meter = TrainMeter(samples=done_before)
        for round_ in range(start + 1, ctx.total_steps + 1):
            global_weights = parameters_to_vector(model.parameters()).detach().clone()
            update, weight = torch.zeros_like(global_weights), 0.0
            for client in federation.round_clients(round_):
                vector_to_parameters(global_weights.clone(), model.parameters())
                optimizer = ctx.make_optimizer(model.parameters())  # a client's own, fresh optimizer
                for x, y in federation.client_batches(round_, client):
                    loss, correct = ctx.forward_backward(model, x, y)
                    with ctx.timers.time("compute"):
                        optimizer.step()
                    meter.add(loss, correct, len(y))
                n_k = federation.samples(client)
                update += n_k * (parameters_to_vector(model.parameters()).detach() - global_weights)
                weight += n_k
            update_sum, weight_sum = sum_over_ranks(ctx, update, weight)
            vector_to_parameters(global_weights + update_sum / weight_sum, model.parameters())
            end_step(ctx, round_, federation.epochs_done(round_), meter, model,
                     lambda: checkpoint_state(model, None))
        return {"model": model, "train_loss": meter.last_loss}
