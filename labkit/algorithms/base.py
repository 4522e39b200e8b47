"""What every sync mode gets from the worker: one rank's training context.

A sync mode is a class registered in ``labkit.registry.SYNC_MODES`` with a method
``run(ctx)``. It declares at registration the RunConfig settings it takes
(``settings=("staleness",)``) and receives them as plain arguments of its constructor;
its ``validate`` check takes plain values too, by name. The :class:`RankContext` hands
it the model, the data shard, the communicators (plain, and compressing with
``--compression``), the optimizer factory and the bookkeeping (metrics, evaluation,
checkpoints), so that the mode's file holds only its own algorithm.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable, Iterator

import torch
from torch import nn

from ..data import Dataset, batches_per_epoch, shard_indices
from ..runs import RunDir


@dataclass
class Timers:
    """Cumulative seconds this rank spent computing, communicating and waiting."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    wait_s: float = 0.0

    @contextmanager
    def time(self, what: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, what + "_s", getattr(self, what + "_s") + time.perf_counter() - t0)


@dataclass
class RankContext:
    """Everything one rank needs to train, built by ``labkit.worker`` from a RunConfig."""

    comm: object  # labkit.comm.Communicator
    model: nn.Module
    make_optimizer: Callable[[list], torch.optim.Optimizer]
    data: Dataset
    device: torch.device
    run: RunDir
    batch_size: int
    seed: int
    total_steps: int
    eval_every: int
    log_every: int
    checkpoint_every: int
    start_time: float
    compressed: object = None  # labkit.compress.CompressedCommunicator over comm (--compression)
    fixed_steps: bool = False  # --steps was given (else --epochs sets total_steps)
    resume_state: dict | None = None
    timers: Timers = field(default_factory=Timers)
    loss_fn: Callable = field(default_factory=lambda: nn.CrossEntropyLoss())
    precision: str = "fp32"  # --precision: bf16 runs forward and loss under autocast

    # --- data -----------------------------------------------------------------------
    rank = property(attrgetter("comm.rank"), doc="this rank's index")
    world = property(attrgetter("comm.size"), doc="how many ranks the run has")

    @property
    def steps_per_epoch(self) -> int:
        return batches_per_epoch(len(self.data.y_train), self.world, self.batch_size)

    def batches(self, start_step: int = 0, rank: int | None = None, world: int | None = None
                ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Yield (step, epoch, x, y) for steps start_step+1 .. total_steps of this rank's shard.

        The order depends only on the seed, the epoch and the rank, so a resumed run sees
        exactly the batches the uninterrupted run would have seen.
        """
        rank = self.rank if rank is None else rank
        world = self.world if world is None else world
        n = len(self.data.y_train)
        per_epoch = batches_per_epoch(n, world, self.batch_size)
        step = start_step
        while step < self.total_steps:
            epoch = step // per_epoch
            shard = shard_indices(n, rank, world, epoch, self.seed)
            for i in range(step % per_epoch, per_epoch):
                if step >= self.total_steps:
                    return
                idx = shard[i * self.batch_size:(i + 1) * self.batch_size]
                step += 1
                self.seed_step(step, rank)
                yield step, epoch, self.data.x_train[idx].to(self.device), self.data.y_train[idx].to(self.device)

    def seed_step(self, step: int, rank: int | None = None) -> None:
        """Seed torch's RNG from (seed, rank, step): random draws survive a resume exactly."""
        rank = self.rank if rank is None else rank
        torch.manual_seed((self.seed * 1_000_003 + rank * 10_007 + step) % (2**63))

    # --- one step of plain SGD on a batch ---------------------------------------------
    def forward_backward(self, model: nn.Module, x, y) -> tuple[float, int]:
        """Forward and backward on (x, y); returns (loss, number correct). Timed as compute.

        With ``precision`` bf16 the forward pass and the loss run under
        :func:`labkit.precision.autocast` (matmuls and convolutions in bf16, the weights and
        their gradients in fp32); bf16 keeps fp32's exponent range, so no loss scaling."""
        with self.timers.time("compute"):
            model.zero_grad(set_to_none=False)
            if self.precision == "fp32":
                out = model(x)
                loss = self.loss_fn(out, y)
            else:
                from ..precision.mixed import autocast

                with autocast(self.precision, self.device):
                    out = model(x)
                    loss = self.loss_fn(out, y)
            loss.backward()
            correct = int((out.argmax(1) == y).sum())
        return float(loss.detach()), correct

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: int = 1024) -> tuple[float, float]:
        """(loss, accuracy) of ``model`` on the test set."""
        was = model.training
        model.eval()
        total_loss, correct, n = 0.0, 0, len(self.data.y_test)
        for i in range(0, n, batch):
            x = self.data.x_test[i:i + batch].to(self.device)
            y = self.data.y_test[i:i + batch].to(self.device)
            out = model(x)
            total_loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        model.train(was)
        return total_loss / n, correct / n

    # --- metrics ------------------------------------------------------------------------
    def now(self) -> float:
        return time.time() - self.start_time

    def event(self, name: str, **fields) -> None:
        self.run.append_metrics({"t": self.now(), "kind": "event", "event": name, "rank": self.rank,
                                 "host": socket.gethostname(), "pid": os.getpid(), **fields})

    def log_train(self, step: int, epoch: int, loss: float, accuracy: float, samples: int,
                  **extra) -> None:
        stats = self.comm.stats
        self.run.append_metrics({
            "t": self.now(), "step": step, "epoch": epoch, "rank": self.rank, "kind": "train",
            "loss": loss, "accuracy": accuracy, "samples": samples,
            "bytes_sent": stats.bytes_sent, "messages_sent": stats.messages_sent,
            "compute_s": self.timers.compute_s, "comm_s": self.timers.comm_s,
            "wait_s": self.timers.wait_s, **extra})

    def log_eval(self, step: int, epoch: int, model: nn.Module) -> tuple[float, float]:
        loss, acc = self.evaluate(model)
        self.run.append_metrics({"t": self.now(), "step": step, "epoch": epoch, "rank": self.rank,
                                 "kind": "eval", "loss": loss, "accuracy": acc})
        return loss, acc


class TrainMeter:
    """Running loss and accuracy over the current logging interval, and samples seen."""

    def __init__(self, samples: int = 0):
        self.samples = samples
        self.last_loss = float("nan")
        self.reset()

    def reset(self):
        self.loss_sum, self.correct, self.count, self.batches = 0.0, 0, 0, 0

    def add(self, loss: float, correct: int, n: int):
        self.loss_sum += loss
        self.batches += 1
        self.correct += correct
        self.count += n
        self.samples += n

    def add_report(self, report) -> None:
        """A worker's report (a master's meter): its batch's loss and accuracy; the
        master trains on no samples itself, so it counts none (the workers count theirs)."""
        self.loss_sum += report.loss
        self.batches += 1
        self.correct += report.correct
        self.count += report.samples

    def read(self) -> tuple[float, float]:
        loss = self.loss_sum / max(1, self.batches)
        acc = self.correct / max(1, self.count)
        self.reset()
        return loss, acc


class SyncMode:
    """Base class of the sync modes: ``run(ctx)`` trains this rank and returns its results.

    The results dict holds ``train_loss`` and, on the rank that evaluates, ``test_loss``
    and ``test_accuracy``.
    """

    def run(self, ctx: RankContext) -> dict:
        raise NotImplementedError


def gradient_pieces(flat: torch.Tensor, model: nn.Module, compressor) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) of what goes through the compressing communicator for one gradient:
    the flat buffer at once, or, for a ``layerwise`` compressor (PowerSGD needs each
    weight matrix's own shape), each layer's view into it, keyed by name."""
    if not compressor.layerwise:
        return [("grad", flat)]
    pieces, offset = [], 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            pieces.append((name, flat[offset:offset + p.numel()].view_as(p)))
            offset += p.numel()
    return pieces


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, **extra) -> dict:
    state = {"model": model.state_dict(), **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    return state


def restore(ctx: RankContext, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Load the resume checkpoint into ``model`` and ``optimizer``; return its step (0 if none)."""
    state = ctx.resume_state
    if not state:
        return 0
    model.load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def end_step(ctx: RankContext, step: int, epoch: int, meter: TrainMeter, model: nn.Module,
             state: Callable[[], dict] | None = None, evaluate: bool | None = None) -> None:
    """The bookkeeping after one step: log, evaluate (rank 0), checkpoint (rank 0).

    ``state`` builds the checkpoint dict when one is due (every ``checkpoint_every``
    steps, and after the last step: the final weights).
    """
    last = step == ctx.total_steps
    if step % ctx.log_every == 0 or last:
        loss, acc = meter.read()
        ctx.log_train(step, epoch, loss, acc, meter.samples)
        meter.last_loss = loss
    evaluate = ctx.rank == 0 if evaluate is None else evaluate
    if evaluate and (step % ctx.eval_every == 0 and not last):
        ctx.log_eval(step, epoch, model)
    if state is not None and ctx.rank == 0 and (last or (ctx.checkpoint_every and step % ctx.checkpoint_every == 0)):
        ctx.run.save_checkpoint(step, state())
