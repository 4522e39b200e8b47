"""Pipeline parallelism: the layer split of ``model.py`` fed with M micro-batches.

"Pipeline parallelism – limited by network size: layers/parameters can be distributed
across processors; sparse communication pattern (only pipeline stages)" (Demystifying
Parallel and Distributed Deep Learning, Ben-Nun & Hoefler). The mini-batch is cut into
M micro-batches, so stage s+1 works on micro-batch i while stage s works on i+1.

A schedule is a list of actions per rank, ``Action("F", i)`` (forward of micro-batch i)
and ``Action("B", i)`` (its backward); the sends and receives follow from them:

- **GPipe** (Huang et al., 2019): all M forwards, then all M backwards. Every stage
  keeps the activations of all M micro-batches until their backward.
- **1F1B** (PipeDream-flush, Narayanan et al., 2021): stage s does p−s−1 forwards to fill
  the pipe, then alternates one forward and one backward, then drains. The same bubble,
  but stage s keeps at most p−s micro-batches.

With a forward and a backward taking the same time on every stage, both schedules
finish in 2(M+p−1) slots of which each rank computes 2M: the bubble is (p−1)/(M+p−1)
(``bubble_fraction_model``); ``simulate`` plays a schedule on such a clock, and
``PipelineParallel`` runs it for real and measures it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .model import boundary_shapes, name_parameters, split_stages, stage_loss
from .timeline import Timeline


class Action(NamedTuple):
    kind: str  # "F" forward, "B" backward
    microbatch: int


def gpipe_schedule(stages: int, microbatches: int) -> list[list[Action]]:
    """Every rank: all forwards, then all backwards."""
    return [[Action("F", i) for i in range(microbatches)] + [Action("B", i) for i in range(microbatches)]
            for _ in range(stages)]


def one_f_one_b_schedule(stages: int, microbatches: int) -> list[list[Action]]:
    """Every rank: p−s−1 warm-up forwards, then one forward and one backward in turn, then
    the remaining backwards."""
    schedule = []
    for s in range(stages):
        warmup = min(stages - s - 1, microbatches)
        actions = [Action("F", i) for i in range(warmup)]
        f, b = warmup, 0
        while f < microbatches:
            actions += [Action("F", f), Action("B", b)]
            f, b = f + 1, b + 1
        actions += [Action("B", i) for i in range(b, microbatches)]
        schedule.append(actions)
    return schedule


SCHEDULES = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


def make_schedule(name: str, stages: int, microbatches: int) -> list[list[Action]]:
    if name not in SCHEDULES:
        raise ValueError(f"--schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    if stages < 1 or microbatches < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got {stages} and {microbatches}")
    return SCHEDULES[name](stages, microbatches)


def bubble_fraction_model(stages: int, microbatches: int) -> float:
    """(p−1)/(m+p−1): the idle share of each stage when all passes take the same time."""
    return (stages - 1) / (microbatches + stages - 1)


def peak_stashed(actions: list[Action]) -> int:
    """Most micro-batches whose forward is done and backward is not, over a rank's actions."""
    live = peak = 0
    for action in actions:
        live += 1 if action.kind == "F" else -1
        peak = max(peak, live)
    return peak


def check_schedule(schedule: list[list[Action]], microbatches: int) -> None:
    """Raise ValueError unless every rank does each forward and each backward once, each
    backward after its forward. (``simulate`` finds deadlocks.)"""
    for rank, actions in enumerate(schedule):
        actions = [Action(*a) for a in actions]
        for kind in "FB":
            done = sorted(a.microbatch for a in actions if a.kind == kind)
            if done != list(range(microbatches)):
                raise ValueError(f"rank {rank}: the {kind} actions are {done}, not micro-batches 0..{microbatches - 1} once each")
        if len(actions) != 2 * microbatches:
            raise ValueError(f"rank {rank}: {len(actions)} actions, expected {2 * microbatches}")
        forward_at = {a.microbatch: k for k, a in enumerate(actions) if a.kind == "F"}
        for k, a in enumerate(actions):
            if a.kind == "B" and k < forward_at[a.microbatch]:
                raise ValueError(f"rank {rank}: backward of micro-batch {a.microbatch} before its forward")


def simulate(schedule: list[list[Action]], forward: float = 1.0, backward: float = 1.0) -> dict:
    """Play a schedule on a clock where every forward takes ``forward`` and every backward
    ``backward`` time units and messages are instant. Each rank does its actions in order;
    F(s, i) waits for F(s−1, i), B(s, i) for B(s+1, i) (and for F(s, i)).

    Returns ``events`` (per rank: (kind, microbatch, start, end)), ``makespan``, ``bubble``
    (the idle share of the ranks) and ``peak_stashed`` per rank. Raises ValueError on a
    schedule that deadlocks.
    """
    p = len(schedule)
    schedule = [[Action(*a) for a in actions] for actions in schedule]
    done: dict[tuple, float] = {}  # (kind, stage, microbatch) -> end time
    position, clock = [0] * p, [0.0] * p
    events: list[list[tuple]] = [[] for _ in range(p)]
    remaining = sum(len(a) for a in schedule)
    while remaining:
        progressed = False
        for s in range(p):
            while position[s] < len(schedule[s]):
                kind, i = schedule[s][position[s]]
                needs = [("F", s - 1, i)] if kind == "F" and s > 0 else []
                if kind == "B":
                    needs = [("F", s, i)] + ([("B", s + 1, i)] if s < p - 1 else [])
                if any(n not in done for n in needs):
                    break
                start = max([clock[s]] + [done[n] for n in needs])
                end = start + (forward if kind == "F" else backward)
                done[(kind, s, i)] = clock[s] = end
                events[s].append((kind, i, start, end))
                position[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {s: schedule[s][position[s]] for s in range(p) if position[s] < len(schedule[s])}
            raise ValueError(f"the schedule deadlocks: ranks wait at {stuck}")
    makespan = max(clock)
    busy = sum(e[3] - e[2] for rank in events for e in rank)
    return {"events": events, "makespan": makespan, "bubble": 1 - busy / (p * makespan),
            "peak_stashed": [peak_stashed(a) for a in schedule]}


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward, while a forward runs: the memory
    a stashed micro-batch holds."""

    def __init__(self):
        self.count = 0

    def pack(self, tensor):
        self.count += tensor.numel() * tensor.element_size()
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor


class PipelineParallel:
    """One pipeline stage on this rank of ``comm`` (the pipeline group), running a schedule.

    ``forward_backward(x, y)`` splits the batch into micro-batches, runs this rank's
    actions (receiving activations from stage s−1 and gradients from stage s+1, sending
    with ``isend`` so that no rank blocks on a send), leaves the stage's gradients in
    ``.grad`` and returns the batch's mean loss (broadcast from the last stage). After a
    step, ``timeline`` holds the events, ``stashed_peak`` the most micro-batches held at
    once and ``stashed_bytes_peak`` the bytes autograd kept for them.
    """

    def __init__(self, model: nn.Module, comm, input_shape, microbatches: int, schedule: str = "1f1b",
                 transform=None):
        self.comm = comm
        self.stage_index, self.stages = comm.rank, comm.size
        self.microbatches = microbatches
        self.schedule_name = schedule
        self.actions = make_schedule(schedule, self.stages, microbatches)[self.stage_index]
        name_parameters(model)
        stages = split_stages(model, self.stages, input_shape)
        self.shapes = boundary_shapes(stages, input_shape)
        self.module = stages[self.stage_index]
        if transform is not None:  # for example tensor_parallel(stage, tensor_comm) in a hybrid grid
            self.module = transform(self.module)
        self.timeline = Timeline()
        self.stashed_peak = 0
        self.stashed_bytes_peak = 0
        self.last_correct = 0  # correctly classified samples of the last batch

    def parameters(self):
        return self.module.parameters()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        s, last, m, batch = self.stage_index, self.stages - 1, self.microbatches, len(x)
        if batch % m:
            raise ValueError(f"--microbatches {m} does not divide the batch of {batch}")
        xs, ys = x.chunk(m), y.chunk(m)
        size = batch // m
        record, comm = self.timeline.record, self.comm
        stash: dict[int, tuple] = {}
        stash_bytes: dict[int, int] = {}
        sends = []
        totals = torch.zeros(2, dtype=torch.float64)  # loss, correct (on the last stage)
        self.timeline.start()
        self.stashed_peak = self.stashed_bytes_peak = 0
        for kind, i in self.actions:
            if kind == "F":
                if s == 0:
                    inp = xs[i]
                else:
                    inp = torch.empty(size, *self.shapes[s], dtype=x.dtype)
                    with record("recv", i):
                        comm.irecv(inp, s - 1, tag=i).wait()
                    inp.requires_grad_(True)
                saved = _SavedBytes()
                with record("forward", i), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                    out = self.module(inp)
                    if s == last:
                        totals[1] += int((out.argmax(1) == ys[i]).sum())
                        out = stage_loss(out, ys[i], batch)
                        totals[0] += float(out.detach())
                stash[i], stash_bytes[i] = (inp, out), saved.count
                self.stashed_peak = max(self.stashed_peak, len(stash))
                self.stashed_bytes_peak = max(self.stashed_bytes_peak, sum(stash_bytes.values()))
                if s < last:
                    with record("send", i):
                        message = out.detach().contiguous()
                        sends.append((comm.isend(message, s + 1, tag=i), message))
            else:
                inp, out = stash.pop(i)
                stash_bytes.pop(i)
                if s < last:
                    grad = torch.empty_like(out)
                    with record("recv", i):
                        comm.irecv(grad, s + 1, tag=i).wait()
                    with record("backward", i):
                        out.backward(grad)
                else:
                    with record("backward", i):
                        out.backward()
                if s > 0:
                    with record("send", i):
                        message = inp.grad.contiguous()
                        sends.append((comm.isend(message, s - 1, tag=i), message))
        for handle, _ in sends:  # the message stays referenced until its send is done
            handle.wait()
        if self.stages > 1:
            comm.broadcast(totals, last)
        self.timeline.stop()
        self.last_correct = int(totals[1])
        return float(totals[0])

    def measured_bubble(self) -> float:
        """This rank's idle share of the last step (average it over the ranks)."""
        return self.timeline.idle_fraction()


def execute_in_process(schedule: list[list[Action]], stages: list[nn.Module], x: torch.Tensor,
                       y: torch.Tensor) -> dict:
    """Run a schedule on real stages in one process, one action per rank per round, each
    rank stopping at an action whose message has not arrived yet (a blocking receive).

    The gradients land in the stages' ``.grad``, as with ``PipelineParallel``; returns the
    mean loss, the order the actions ran in and the peak of stashed micro-batches per rank.
    Raises ValueError when the schedule is not a valid one or deadlocks.
    """
    p = len(stages)
    if len(schedule) != p:
        raise ValueError(f"the schedule has {len(schedule)} ranks for {p} stages")
    schedule = [[Action(*a) for a in actions] for actions in schedule]
    m = sum(1 for a in schedule[0] if a.kind == "F")
    check_schedule(schedule, m)
    if len(x) % m:
        raise ValueError(f"{m} micro-batches do not divide the batch of {len(x)}")
    xs, ys = x.chunk(m), y.chunk(m)
    activations, gradients = {}, {}  # messages in flight: (receiving stage, micro-batch) -> tensor
    stash: list[dict] = [{} for _ in range(p)]
    position, peak, order = [0] * p, [0] * p, []
    loss = 0.0
    while any(position[s] < len(schedule[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if position[s] == len(schedule[s]):
                continue
            kind, i = schedule[s][position[s]]
            if kind == "F":
                if s > 0 and (s, i) not in activations:
                    continue
                inp = xs[i] if s == 0 else activations.pop((s, i)).requires_grad_(True)
                out = stages[s](inp)
                if s == p - 1:
                    out = stage_loss(out, ys[i], len(x))
                    loss += float(out.detach())
                else:
                    activations[(s + 1, i)] = out.detach().clone()
                stash[s][i] = (inp, out)
                peak[s] = max(peak[s], len(stash[s]))
            else:
                if s < p - 1 and (s, i) not in gradients:
                    continue
                inp, out = stash[s].pop(i)
                out.backward(None if s == p - 1 else gradients.pop((s, i)))
                if s > 0:
                    gradients[(s - 1, i)] = inp.grad
            position[s] += 1
            order.append((s, kind, i))
            progressed = True
        if not progressed:
            stuck = {s: tuple(schedule[s][position[s]]) for s in range(p) if position[s] < len(schedule[s])}
            raise ValueError(f"the schedule deadlocks: ranks wait at {stuck}")
    return {"loss": loss, "order": order, "peak_stashed": peak}
