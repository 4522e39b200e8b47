"""Gossip: decentralized SGD on a ring, no master.

Hoefler, *HPC for ML and ML for HPC* (SC'19 keynote), slide "Parameter (and Model)
consistency - decentralized": the training agents exchange parameters with each other
instead of with a parameter server, and "may also consider limited/slower distribution -
gossip [Jin et al. 2016]". Lian et al. (*Can Decentralized Algorithms Outperform
Centralized Algorithms?*, NeurIPS 2017) show that such decentralized SGD converges like
the centralized kind.

The ranks sit on a ring. After every local step of the run's optimizer (SGD with
``--momentum``), each rank sends its weights to its two neighbours, receives theirs, and
replaces its weights by the mean of the three. No rank ever waits for more than its two
neighbours, and nobody holds a global model: the replicas agree only approximately,
pulled together a little at every step. Rank 0 evaluates and checkpoints its own replica.

A rank that dies is routed around: its neighbours notice (sending to it or receiving from
it fails), record a ``gossip_reroute`` event and take the next live rank on that side as
their neighbour; the ring closes again and training goes on. A run whose rank 0 dies
fails: rank 0 is the one that evaluates and reports.

The end of the run: each rank's last message is marked final, and a rank keeps receiving
from a neighbour until that neighbour's final message has come (a neighbour found after a
reroute may be a step ahead or behind), then tells rank 0 that it is done, so that rank 0
writes the summary only once every live rank has logged its last step.
"""

from __future__ import annotations

import queue
import threading

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..comm import PeerError
from ..registry import SYNC_MODES
from .base import RankContext, SyncMode, TrainMeter, checkpoint_state, end_step, restore


def no_compression(compression: str):
    if compression != "none":
        return "--compression", "gossip exchanges whole models between neighbours; it does not compress"
    return None


class Ring:
    """This rank's place on the ring of live ranks, and its messages to and from its neighbours.

    A message is the weights followed by one number: 1 on a rank's final message, else 0.
    One thread per neighbour keeps receiving that neighbour's messages into a mailbox, so a
    send never waits for its receiver to be ready: with gloo's blocking sends, ranks that
    sent to each other in a fixed order could otherwise wait on each other in a circle
    (which a reroute, pairing two ranks that are a step apart, would bring about).
    """

    def __init__(self, ctx: RankContext, size: int):
        self.ctx = ctx
        self.size = size  # of a message
        self.dead: set[int] = set()
        self.finished: set[int] = set()  # neighbours whose final message has come
        self.told_final: set[int] = set()
        self.mailboxes: dict[int, queue.Queue] = {}
        self.listeners: list[threading.Thread] = []

    def neighbours(self) -> list[int]:
        """[left, right]: the live ranks just before and just after this one (one if the same)."""
        live = [r for r in range(self.ctx.world) if r not in self.dead]
        if len(live) == 1:
            return []
        i = live.index(self.ctx.rank)
        return list(dict.fromkeys([live[i - 1], live[(i + 1) % len(live)]]))

    def lose(self, peer: int) -> None:
        if peer not in self.dead:
            self.dead.add(peer)
            self.finished.discard(peer)
            self.ctx.event("gossip_reroute", lost=peer, neighbours=self.neighbours())

    def mailbox(self, peer: int) -> queue.Queue:
        """``peer``'s messages as they come (None once receiving from it failed)."""
        if peer not in self.mailboxes:
            self.mailboxes[peer] = queue.Queue()
            listener = threading.Thread(target=self._listen, args=(peer, self.mailboxes[peer]),
                                        name=f"gossip-from-{peer}", daemon=True)
            listener.start()
            self.listeners.append(listener)
        return self.mailboxes[peer]

    def _listen(self, peer: int, mailbox: queue.Queue) -> None:
        while True:
            incoming = torch.empty(self.size)
            try:
                self.ctx.comm.recv(incoming, peer)
            except PeerError:
                mailbox.put(None)
                return
            mailbox.put(incoming)
            if incoming[-1] == 1:
                return

    def _tell(self, peer: int, message) -> bool:
        """Send ``message`` to ``peer``; False, and the peer counted lost, if it is gone."""
        try:
            self.ctx.comm.send(message, peer)
        except PeerError:
            self.lose(peer)
            return False
        return True

    def exchange(self, weights, final: bool) -> list:
        """Send ``weights`` to the neighbours and take one message from each; their weights.

        The first rank found on each side is the neighbour; if it is dead, the next live one
        on that side, and so on. A neighbour that has sent its final message gets nothing
        more until this rank's own final message, and is not waited for.
        """
        message = torch.cat([weights, weights.new_tensor([1.0 if final else 0.0])])
        sent, heard, received = set(), set(), []
        while True:
            around = self.neighbours()
            skip = self.told_final if final else self.finished
            to_send = [p for p in around if p not in sent and p not in skip]
            to_hear = [p for p in around if p not in heard and p not in self.finished]
            if not to_send and not to_hear:
                return received
            for peer in to_hear:
                self.mailbox(peer)  # listen before sending, so that two new neighbours meet
            for peer in to_send:
                if not self._tell(peer, message):
                    continue
                sent.add(peer)
                if final:
                    self.told_final.add(peer)
            for peer in to_hear:
                if peer in self.dead:
                    continue
                incoming = self.mailbox(peer).get()
                if incoming is None:
                    self.lose(peer)
                    continue
                heard.add(peer)
                received.append(incoming[:-1])
                if incoming[-1] == 1:
                    self.finished.add(peer)

    def drain(self, weights) -> None:
        """After the last step: read each neighbour's messages until its final one has come."""
        while any(p not in self.finished for p in self.neighbours()):
            self.exchange(weights, final=True)
        for listener in self.listeners:
            listener.join()

    def report_done(self) -> None:
        """Every rank tells rank 0 that it is done; rank 0 listens to every rank still alive."""
        token = torch.zeros(1)
        if self.ctx.rank != 0:
            self.ctx.comm.send(token, 0)
            return
        for rank in range(1, self.ctx.world):
            if rank in self.dead:
                continue
            try:
                self.ctx.comm.recv(token, rank)
            except PeerError:
                self.dead.add(rank)


@SYNC_MODES.register("gossip", help="gossip: decentralized SGD, each rank averages with its two ring neighbours",
                     survives_worker_loss=True, validate=no_compression)
class GossipSGD(SyncMode):
    def run(self, ctx: RankContext) -> dict:
        model = ctx.model
        optimizer = ctx.make_optimizer(model.parameters())
        start = restore(ctx, model, optimizer)
        meter = TrainMeter(samples=start * ctx.batch_size)
        ring = Ring(ctx, size=sum(p.numel() for p in model.parameters()) + 1)
        for step, epoch, x, y in ctx.batches(start):
            loss, correct = ctx.forward_backward(model, x, y)
            with ctx.timers.time("compute"):
                optimizer.step()
            weights = parameters_to_vector(model.parameters()).detach()
            with ctx.timers.time("comm"):
                theirs = ring.exchange(weights, final=step == ctx.total_steps)
            with ctx.timers.time("compute"):
                vector_to_parameters(torch.stack([weights, *theirs]).mean(0), model.parameters())
            meter.add(loss, correct, len(y))
            end_step(ctx, step, epoch, meter, model, lambda: checkpoint_state(model, optimizer))
        with ctx.timers.time("wait"):
            ring.drain(parameters_to_vector(model.parameters()).detach())
            ring.report_done()
        return {"model": model, "train_loss": meter.last_loss, "ranks_lost": sorted(ring.dead)}
