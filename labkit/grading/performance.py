"""Performance questions graded from the student's run directories (DESIGN 3.3), never re-run.

A performance question asks for runs that reach a target: here, a strong-scaling efficiency from one
worker to N on the same problem. The student hands in run directories made with ``labkit train``; the
grader reads them as untrusted data (plain JSON, size-limited, inside the submission, no symbolic
links, no checkpoint unpickled), checks that they are what the question asks for, and measures from
their own records:

- every run logs a training record every ``log_every`` steps with its time; each interval between
  two records gives one sample of seconds per step (the first interval, warm-up, is dropped). The
  samples of all runs of one worker count are pooled: *repeated timings*;
- the time per step of a configuration is the median of its samples, with the distribution-free
  confidence interval of the median (Le Boudec; Hoefler and Belli, as in ps5_measurement);
- efficiency E = T(1) / (N T(N)): the speedup over N. Its interval comes from the intervals of the
  two medians (slowest against fastest).

What decides the target is what the runs *count*, not how busy the machine was while they ran.
The timings of a run measure the machine as it was: on a shared machine a 2-worker step waits
for cores other programs hold, so a right configuration measures a low efficiency, and a
1-worker run slowed the same way makes a wrong one look efficient (on the course's 2-core machine,
under load averages from 2 to 10, the right runs measured 0.16 to 0.78 and runs of the default small
batch 0.10 to 0.73). Medians and intervals absorb a busy moment, not a busy hour. What a run
records without timing it cannot be moved by the load: the steps, the samples each worker
computes per step (``samples`` of its training records) and the bytes it sends per step. So the
verdict (:meth:`ScalingResult.verdict`) is the configuration's: the target is met when each of the
N workers computes at least ``min_batch`` samples per step, the smallest batch per worker whose
runs reach ``target - tolerance`` on the course's machine when it is quiet (the instructor's
measurement, stated with the question's hidden tests). The measured efficiency, with its interval,
is reported beside the verdict: it is what a student checks on a quiet machine, and what the
feedback shows. The grade depends on the files only, so grading the same submission again gives
the same grade.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

MAX_JSON_BYTES = 1 << 20  # config.json, summary.json
MAX_METRICS_BYTES = 16 << 20  # metrics.jsonl
MIN_INTERVALS = 5  # timed intervals per configuration, after warm-up
# What makes two runs the same problem for a strong-scaling comparison (the worker count and the
# batch per worker may differ; the global batch may not).
SAME_PROBLEM = ("model", "dataset", "parallelism", "sync", "compression", "precision", "steps",
                "optimizer", "lr", "seed", "device")


class RunCheckError(AssertionError):
    """A run directory that is not what the question asks for; the message is one line."""


@dataclass(frozen=True)
class Run:
    """What the grader uses of one run directory."""

    name: str  # as the student wrote it
    workers: int
    batch_size: int  # per worker
    steps: int
    config: dict
    summary: dict
    step_seconds: tuple  # one sample per timed interval
    bytes_per_step: int = 0  # rank 0's bytes sent per step (counted, not timed)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers


@dataclass
class ScalingResult:
    """The measured strong scaling of a set of runs."""

    workers: int  # N
    seconds: dict  # worker count -> (median, low, high) seconds per step
    samples: dict  # worker count -> number of timed intervals
    efficiency: float
    low: float
    high: float
    runs: dict = field(default_factory=dict)  # worker count -> [Run]
    batch_per_worker: int = 0  # samples each of the N workers computes per step (counted)
    bytes_per_step: int = 0  # bytes rank 0 of the N-worker runs sends per step (counted)

    def measured_above(self, target: float, tolerance: float) -> bool:
        """Whether the *measured* efficiency is at least ``target - tolerance`` (not the verdict)."""
        return self.efficiency >= target - tolerance

    def reaches(self, min_batch: int) -> bool:
        """Whether the configuration gives each worker at least ``min_batch`` samples a step."""
        return self.batch_per_worker >= min_batch

    def verdict(self, target: float, tolerance: float, min_batch: int) -> tuple[bool, str]:
        """(met, one line): the configuration decides; the measurement is reported beside it.

        ``min_batch``: the smallest batch per worker whose runs reach ``target - tolerance`` on the
        course's machine when it is quiet. The line names the configuration's counts and what the
        runs measured, never ``min_batch``."""
        threshold = target - tolerance
        counted = (f"each of the {self.workers} workers computes {self.batch_per_worker} samples per step "
                   f"and sends {self.bytes_per_step} bytes per step")
        measured = self.report()
        if self.reaches(min_batch):
            return True, (f"target met: {counted}, a configuration that reaches an efficiency of "
                          f"{threshold:g} on the course's machine; measured: {measured}")
        return False, (f"target not met: {counted}: a step too small to split, which stays below an "
                       f"efficiency of {threshold:g} on the course's machine even when it is quiet; "
                       f"measured: {measured}")

    def report(self, target: float | None = None, tolerance: float | None = None) -> str:
        one, many = self.seconds[1], self.seconds[self.workers]
        text = (f"1 worker: {one[0] * 1e3:.2f} ms/step (95% CI {one[1] * 1e3:.2f}-{one[2] * 1e3:.2f}, "
                f"{self.samples[1]} intervals); {self.workers} workers: {many[0] * 1e3:.2f} ms/step "
                f"(95% CI {many[1] * 1e3:.2f}-{many[2] * 1e3:.2f}, {self.samples[self.workers]} intervals); "
                f"efficiency {self.efficiency:.2f} (95% CI {self.low:.2f}-{self.high:.2f})")
        if target is not None:
            side = "at least" if self.measured_above(target, tolerance) else "below"
            text += (f"; measured {side} the target {target:g} less its tolerance {tolerance:g} "
                     f"(on a busy machine the measurement falls, see the question)")
        return text


def median_ci(samples, confidence=0.95):
    """(median, low, high): the median and its distribution-free confidence interval (ps5_measurement)."""
    x = sorted(samples)
    n = len(x)
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    j = min(n, max(1, math.floor((n - z * math.sqrt(n)) / 2)))
    k = min(n, max(1, math.ceil(1 + (n + z * math.sqrt(n)) / 2)))
    return statistics.median(x), x[j - 1], x[k - 1]


# --- reading a run directory without trusting it ---------------------------------------------------

def _inside(name, within: Path) -> Path:
    """The folder ``name`` names, relative to ``within``; refused if it leaves it or goes through a link."""
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise RunCheckError(f"{name!r} is not the path of a run directory")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise RunCheckError(f"{name}: give the run directory relative to the notebook's folder, inside it")
    path = within
    for part in relative.parts:
        path = path / part
        if path.is_symlink():
            raise RunCheckError(f"{name}: {part} is a symbolic link; hand in the run directory itself")
    if not path.is_dir():
        raise RunCheckError(f"{name}: no such run directory (hand in the folder with your notebook)")
    return path


def _read_text(path: Path, limit: int, name: str) -> str:
    if path.is_symlink() or not path.is_file():
        raise RunCheckError(f"{name}: no {path.name}")
    if path.stat().st_size > limit:
        raise RunCheckError(f"{name}: {path.name} is larger than {limit >> 20} MiB")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        raise RunCheckError(f"{name}: {path.name} cannot be read as text") from None


def _read_json(path: Path, name: str) -> dict:
    try:
        data = json.loads(_read_text(path, MAX_JSON_BYTES, name))
    except json.JSONDecodeError:
        raise RunCheckError(f"{name}: {path.name} is not JSON") from None
    if not isinstance(data, dict):
        raise RunCheckError(f"{name}: {path.name} is not a JSON object")
    return data


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_run(name, within=".") -> Run:
    """The run directory ``name`` (relative to ``within``), checked; its timed intervals."""
    path = _inside(name, Path(within).resolve())
    meta = _read_json(path / "config.json", name)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise RunCheckError(f"{name}: config.json has no run configuration (not made by labkit train?)")
    world = meta.get("world_size")
    workers, batch, steps = config.get("workers"), config.get("batch_size"), config.get("steps")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (world, workers, batch)):
        raise RunCheckError(f"{name}: config.json lacks a world size, workers or batch size")
    if world != workers:
        raise RunCheckError(f"{name}: world size {world} differs from its {workers} workers")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise RunCheckError(f"{name}: the run must be set by --steps (a number of steps)")
    summary = _read_json(path / "summary.json", name)
    if summary.get("status") != "completed":
        raise RunCheckError(f"{name}: the run did not complete (status {summary.get('status')!r})")
    records = []
    text = _read_text(path / "metrics.jsonl", MAX_METRICS_BYTES, name)
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RunCheckError(f"{name}: line {number} of metrics.jsonl is not JSON") from None
        if isinstance(record, dict) and record.get("kind") == "train":
            records.append(record)
    ranks = {r.get("rank") for r in records}
    if ranks != set(range(workers)):
        raise RunCheckError(f"{name}: training records from ranks {sorted(map(str, ranks))}, "
                            f"expected one from each of its {workers} workers")
    own = [r for r in records if r.get("rank") == 0]
    if not all(_number(r.get("t")) and isinstance(r.get("step"), int) for r in own):
        raise RunCheckError(f"{name}: a training record of rank 0 lacks its time or step")
    pairs = list(zip(own, own[1:]))
    if any(b["step"] <= a["step"] or b["t"] <= a["t"] for a, b in pairs):
        raise RunCheckError(f"{name}: rank 0's training records do not go forward in steps and time")
    if own and own[-1]["step"] != steps:
        raise RunCheckError(f"{name}: the last training record is step {own[-1]['step']}, not {steps}")
    samples = own[-1].get("samples") if own else None
    if own and samples != own[-1]["step"] * batch:
        raise RunCheckError(f"{name}: rank 0 saw {samples} samples in {steps} steps of batch {batch}")
    sent = own[-1].get("bytes_sent", 0) if own else 0
    if not isinstance(sent, int) or isinstance(sent, bool) or sent < 0:
        raise RunCheckError(f"{name}: rank 0's last training record has no count of bytes sent")
    intervals = tuple((b["t"] - a["t"]) / (b["step"] - a["step"]) for a, b in pairs)[1:]  # no warm-up
    return Run(str(name), workers, batch, steps, config, summary, intervals, sent // steps)


# --- strong scaling ---------------------------------------------------------------------------------

def strong_scaling(runs, within=".", workers=2, min_intervals=MIN_INTERVALS, **required) -> ScalingResult:
    """The strong scaling from 1 to ``workers`` workers of ``runs`` ({worker count: [run directory]}).

    ``required``: configuration values every run must have (dataset="digits", ...). Raises
    RunCheckError (an AssertionError) naming the first thing that is not as asked.
    """
    if not isinstance(runs, dict) or sorted(runs) != [1, workers]:
        raise RunCheckError(f"RUNS must be a dict with the keys 1 and {workers} (worker counts), "
                            f"each a list of run directories")
    read = {}
    for count, names in runs.items():
        if isinstance(names, (str, os.PathLike)):
            names = [names]
        if not isinstance(names, (list, tuple)) or not names:
            raise RunCheckError(f"RUNS[{count}] must be a list of run directories")
        read[count] = [read_run(name, within) for name in names]
    every = [run for group in read.values() for run in group]
    for count, group in read.items():
        for run in group:
            if run.workers != count:
                raise RunCheckError(f"{run.name} ran {run.workers} worker(s), listed under {count}")
    for run in every:
        for key, value in required.items():
            if run.config.get(key) != value:
                raise RunCheckError(f"{run.name}: {key} is {run.config.get(key)!r}, the question asks for {value!r}")
    first = every[0]
    for run in every[1:]:
        for key in SAME_PROBLEM:
            if run.config.get(key) != first.config.get(key):
                raise RunCheckError(f"{run.name} and {first.name} differ in {key} "
                                    f"({run.config.get(key)!r}, {first.config.get(key)!r}): not the same problem")
        if run.global_batch != first.global_batch:
            raise RunCheckError(
                f"{run.name} has a global batch of {run.global_batch} ({run.workers} x {run.batch_size}), "
                f"{first.name} of {first.global_batch}: strong scaling keeps the global batch")
    seconds, samples = {}, {}
    for count, group in read.items():
        pooled = [s for run in group for s in run.step_seconds]
        if len(pooled) < min_intervals:
            raise RunCheckError(
                f"the runs with {count} worker(s) have {len(pooled)} timed intervals, at least {min_intervals} "
                f"are needed (more steps, a smaller --log-every, or more runs)")
        seconds[count], samples[count] = median_ci(pooled), len(pooled)
    (t1, t1_low, t1_high), (tn, tn_low, tn_high) = seconds[1], seconds[workers]
    return ScalingResult(
        workers=workers, seconds=seconds, samples=samples,
        efficiency=t1 / (workers * tn), low=t1_low / (workers * tn_high), high=t1_high / (workers * tn_low),
        runs=read, batch_per_worker=read[workers][0].batch_size,
        bytes_per_step=max(run.bytes_per_step for run in read[workers]),
    )
