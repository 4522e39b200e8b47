"""What a rank did when: the events of model and pipeline parallelism.

Each rank records its forward and backward passes, its sends and the time it spent
waiting in a receive, with start and end times relative to the start of the step. The
idle time of a rank is what is left of the step: its share of the step is the measured
bubble, which ``pipeline.bubble_fraction_model`` predicts as (p−1)/(m+p−1).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

COMPUTE_KINDS = ("forward", "backward")


@dataclass
class Event:
    kind: str  # forward | backward | send | recv
    microbatch: int
    start: float  # seconds since the start of the step
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def as_dict(self, rank: int | None = None) -> dict:
        out = {"kind": self.kind, "microbatch": self.microbatch, "start": round(self.start, 6),
               "end": round(self.end, 6)}
        if rank is not None:
            out["rank"] = rank
        return out


@dataclass
class Timeline:
    """The events of one step on one rank."""

    events: list[Event] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    span: float = 0.0  # wall time of the whole step

    def start(self) -> None:
        self.events.clear()
        self.t0 = time.perf_counter()
        self.span = 0.0

    @contextmanager
    def record(self, kind: str, microbatch: int):
        start = time.perf_counter() - self.t0
        try:
            yield
        finally:
            self.events.append(Event(kind, microbatch, start, time.perf_counter() - self.t0))

    def stop(self) -> None:
        self.span = time.perf_counter() - self.t0

    def compute_seconds(self) -> float:
        return sum(e.seconds for e in self.events if e.kind in COMPUTE_KINDS)

    def idle_fraction(self) -> float:
        """The share of the step this rank did not compute: waiting, sending, idle."""
        if self.span <= 0:
            return 0.0
        return max(0.0, 1.0 - self.compute_seconds() / self.span)
