"""A latency table measured on this machine, and the differentiable expected latency.

ProxylessNAS makes latency differentiable by modelling it: every candidate operation of
every block is timed once on the target hardware, and the latency of a block is its
expectation over the path probabilities, E[lat] = Σ_i p_i · lat_i, a smooth function of α.
The latency of a network is the sum over its blocks plus the fixed parts: stem, head, and
the network's own overhead.

Timings are taken at batch 1 on the device (CPU by default; CUDA with a synchronize after
each call), after a warm-up, and the table keeps the median of many timings. Each entry
times a block as the derived network runs it (the operation with its shortcut; zero with a
shortcut is the identity), and with the threads the network is timed with. What a whole
network costs beyond the sum of its parts (calling the blocks one after the other, the
containers, caches warm from the previous block rather than from the same block) is one
more fixed term, ``overhead``, fitted on a few networks drawn at random from the search
space: the median of (network − its parts), all timed round robin in the same rounds as the
table, so that a change of load on the machine moves the parts and the networks alike.
The table is saved as JSON with a description of the machine. A table a user hands in is
untrusted: it is read with ``json`` only and every field is checked; every error names the
file.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from .supernet import CANDIDATES, ChildNet, SuperNet, child_block

TABLE_FORMAT = "labkit-latency-table"
TABLE_VERSION = 2
MAX_TABLE_BYTES = 4 << 20
FIXED_PARTS = ("stem", "head", "overhead")
FIT_NETWORKS = 4  # random networks the overhead is fitted on


class LatencyTableError(ValueError):
    """A latency table that cannot be used; the message names the file."""


def machine_description(device: str = "cpu", threads: int | None = None) -> dict:
    """What the timings were taken on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "device": device,
            "threads": threads or torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def time_module(module: nn.Module, input_shape, device: str = "cpu", warmup: int = 10, repeats: int = 50) -> float:
    """Median milliseconds of one forward pass of ``module`` on one input of ``input_shape``."""
    return time_modules([module], [input_shape], device, warmup, repeats)[0]


def _key(op: str, shape, cout: int, stride: int) -> str:
    c, h, w = shape
    return f"{op}@{c}x{h}x{w}->{cout}/s{stride}"


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
WARMUP_S = 0.5


def time_modules(modules: list, shapes: list, device: str = "cpu", warmup: int = 10,
                 repeats: int = 50, clock: str = "wall") -> list[float]:
    """Median milliseconds of one batch-1 forward pass of each module, timed round robin.

    Every round times each module once, so a burst of load from elsewhere on the machine
    slows all of them alike instead of one entry of the table; the order is shuffled every
    round, so that no module always sits at the same place in the scheduler's time slice
    (on a loaded machine a fixed order hands the preemptions to the same few). ``clock``: ``wall`` (the
    latency) or ``thread``, the CPU time of this thread: on a CPU with one thread, what the
    latency would be on an idle machine, since the time other processes hold the core is
    not counted (on a loaded machine the wall clock of a batch-1 pass is mostly theirs).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r}: choose one of {', '.join(CLOCKS)}")
    if clock == "thread" and (device != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("the thread clock times one CPU thread: use it with --device cpu --threads 1")
    now = CLOCKS[clock]
    cuda = device.startswith("cuda")
    modules = [m.to(device).eval() for m in modules]
    inputs = [torch.randn(1, *shape, device=device) for shape in shapes]
    times: list[list[float]] = [[] for _ in modules]
    with torch.inference_mode():
        # warm-up: rounds of every module, at least ``warmup`` of them and WARMUP_S seconds (the first
        # calls of a fresh process are often slower: cold caches, the allocator growing, kernels built)
        start = time.perf_counter()
        rounds = 0
        while rounds < warmup or time.perf_counter() - start < WARMUP_S:
            for m, x in zip(modules, inputs):
                m(x)
            rounds += 1
        order = random.Random(0)
        for _ in range(repeats):
            for i in order.sample(range(len(modules)), len(modules)):
                m, x = modules[i], inputs[i]
                if cuda:
                    torch.cuda.synchronize()
                start = now()
                m(x)
                if cuda:
                    torch.cuda.synchronize()
                times[i].append((now() - start) * 1000)
    return [statistics.median(t) for t in times]


def sample_architectures(net: SuperNet, count: int, seed: int = 0) -> list[list[str]]:
    """``count`` architectures of ``net``'s search space, each block's candidate drawn uniformly."""
    rng = random.Random(seed)
    return [[rng.choice(block.candidates) for block in net.blocks] for _ in range(count)]


def child_of(net: SuperNet, architecture: list[str]) -> ChildNet:
    """The derived network of ``architecture`` on ``net``'s layout (stem and head alike)."""
    return ChildNet(net.input_shape, net.head[-1].out_features, architecture, layout=net.layout,
                    stem_channels=net.stem[0].out_channels)


def _block_keys(net: SuperNet, architecture: list[str]) -> list[str]:
    """The table keys of the chosen operation of every block."""
    return [_key(op, shape, cout, stride)
            for op, (_cin, cout, stride), shape in zip(architecture, net.layout, net.block_inputs())]


def _parts(net: SuperNet, architecture=None) -> list[tuple[str, nn.Module, tuple, dict | None]]:
    """(table key, module, input shape, table entry) of the stem, the head (no entry: they are
    fixed parts) and the blocks: every candidate of every block, or the chosen one of
    ``architecture``."""
    parts = [("stem", copy.deepcopy(net.stem), net.input_shape, None),  # copies: timing sets eval mode
             ("head", copy.deepcopy(net.head), _output_shape(net), None)]
    for b, ((cin, cout, stride), shape, block) in enumerate(zip(net.layout, net.block_inputs(), net.blocks)):
        for op in (block.candidates if architecture is None else [architecture[b]]):
            entry = {"op": op, "input": list(shape), "out_channels": cout, "stride": stride}
            parts.append((_key(op, shape, cout, stride), child_block(op, cin, cout, stride), shape, entry))
    return parts


def _with_threads(threads, fn, *args, **kwargs):
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(old)


def measure_table(net: SuperNet, device: str = "cpu", warmup: int = 10, repeats: int = 100,
                  threads: int | None = 1, fit_networks: int = FIT_NETWORKS, seed: int = 0,
                  clock: str = "wall") -> dict:
    """Time every candidate of every block of ``net`` (and the stem and head) on ``device``, and
    fit the network overhead on ``fit_networks`` random networks timed in the same rounds."""
    unique = {}
    for key, module, shape, entry in _parts(net):
        unique.setdefault(key, (module, shape, entry))
    keys = list(unique)
    fits = sample_architectures(net, fit_networks, seed)
    modules = [unique[k][0] for k in keys] + [child_of(net, a) for a in fits]
    shapes = [unique[k][1] for k in keys] + [net.input_shape] * len(fits)
    ms = _with_threads(threads, time_modules, modules, shapes, device, warmup, repeats, clock)
    by_key = dict(zip(keys, ms))
    residuals = [whole - by_key["stem"] - by_key["head"] - sum(by_key[k] for k in _block_keys(net, arch))
                 for arch, whole in zip(fits, ms[len(keys):])]
    entries = [{**unique[k][2], "ms": by_key[k]} for k in keys if unique[k][2] is not None]
    fixed = {"stem": by_key["stem"], "head": by_key["head"],
             "overhead": statistics.median(residuals) if residuals else 0.0}
    return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "batch": 1, "device": device,
            "warmup": warmup, "repeats": repeats, "statistic": "median", "clock": clock,
            "machine": machine_description(device, threads), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fixed": fixed, "overhead_fit": {"networks": fits, "residual_ms": residuals}, "entries": entries}


def _output_shape(net: SuperNet):
    (_cin, h, w), (_, cout, stride) = net.block_inputs()[-1], net.layout[-1]
    return (cout, math.ceil(h / stride), math.ceil(w / stride))


def save_table(table: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _number(value, where: str, file) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise LatencyTableError(f"{file}: {where} must be a finite number >= 0, got {value!r}")
    return float(value)


def load_table(path) -> dict:
    """Read and check a latency table (JSON only); LatencyTableError names the file and the fault."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LatencyTableError(f"{path}: no such file") from None
    if not path.is_file():
        raise LatencyTableError(f"{path}: not a file")
    if size > MAX_TABLE_BYTES:
        raise LatencyTableError(f"{path}: {size} bytes is too large for a latency table")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LatencyTableError(f"{path}: not a JSON latency table ({e})") from None
    return check_table(data, path)


def check_table(data, file="<table>") -> dict:
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise LatencyTableError(f"{file}: not a labkit latency table (\"format\" must be {TABLE_FORMAT!r})")
    if data.get("version") != TABLE_VERSION:
        raise LatencyTableError(f"{file}: version {data.get('version')!r} is not supported (expected {TABLE_VERSION})")
    if not isinstance(data.get("machine"), dict):
        raise LatencyTableError(f"{file}: \"machine\" must describe the machine the table was measured on")
    fixed = data.get("fixed")
    if not isinstance(fixed, dict) or set(fixed) != set(FIXED_PARTS):
        raise LatencyTableError(f"{file}: \"fixed\" must give the latency of exactly {', '.join(FIXED_PARTS)}")
    for part in ("stem", "head"):
        _number(fixed[part], f"fixed.{part}", file)
    overhead = fixed["overhead"]  # the fitted overhead may be below zero: a network can beat its parts
    if isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or not math.isfinite(overhead):
        raise LatencyTableError(f"{file}: fixed.overhead must be a finite number, got {overhead!r}")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise LatencyTableError(f"{file}: \"entries\" must be a non-empty list")
    seen = set()
    for n, entry in enumerate(entries):
        where = f"entries[{n}]"
        if not isinstance(entry, dict) or set(entry) != {"op", "input", "out_channels", "stride", "ms"}:
            raise LatencyTableError(f"{file}: {where} must have exactly op, input, out_channels, stride, ms")
        if entry["op"] not in CANDIDATES:
            raise LatencyTableError(f"{file}: {where}: unknown operation {entry['op']!r}")
        shape = entry["input"]
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise LatencyTableError(f"{file}: {where}: input must be [C, H, W], positive whole numbers")
        for name in ("out_channels", "stride"):
            v = entry[name]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise LatencyTableError(f"{file}: {where}: {name} must be a positive whole number")
        _number(entry["ms"], f"{where}.ms", file)
        key = _key(entry["op"], shape, entry["out_channels"], entry["stride"])
        if key in seen:
            raise LatencyTableError(f"{file}: {where}: {key} appears twice")
        seen.add(key)
    data["_file"] = str(file)
    return data


class LatencyModel:
    """Per-block latency vectors from a table, and the expected latency of a supernet."""

    def __init__(self, table: dict, net: SuperNet):
        lookup = {_key(e["op"], e["input"], e["out_channels"], e["stride"]): e["ms"] for e in table["entries"]}
        file = table.get("_file", "the latency table")
        self.fixed_ms = float(sum(table["fixed"].values()))  # stem + head + overhead
        self.overhead_ms = float(table["fixed"]["overhead"])
        self.block_ms = []
        for (_cin, cout, stride), shape, block in zip(net.layout, net.block_inputs(), net.blocks):
            row = []
            for op in block.candidates:
                key = _key(op, shape, cout, stride)
                if key not in lookup:
                    raise LatencyTableError(f"{file}: no latency for {key}; measure a table for this network "
                                            "(labkit nas --measure-latency, or labkit bench latency)")
                row.append(lookup[key])
            self.block_ms.append(torch.tensor(row))
        self.candidates = [b.candidates for b in net.blocks]

    def expected(self, net: SuperNet) -> torch.Tensor:
        """E[latency] = fixed + Σ_blocks Σ_i p_i · lat_i: differentiable in every α (the fixed
        part, stem + head + overhead, does not depend on α)."""
        total = torch.tensor(self.fixed_ms)
        for block, ms in zip(net.blocks, self.block_ms):
            total = total + (block.probs() * ms).sum()
        return total

    def predict(self, architecture: list[str]) -> float:
        """The latency the table predicts for one derived architecture."""
        return self.fixed_ms + sum(float(ms[names.index(op)])
                                   for op, ms, names in zip(architecture, self.block_ms, self.candidates))


def measure_network(model: nn.Module, input_shape, device: str = "cpu", warmup: int = 20, repeats: int = 100,
                    threads: int | None = 1) -> float:
    """Median milliseconds of one batch-1 forward pass of a whole network."""
    return _with_threads(threads, time_module, model, input_shape, device, warmup, repeats)


def measure_with_parts(architecture: list[str], input_shape, num_classes: int, device: str = "cpu",
                       warmup: int = 20, repeats: int = 200, threads: int | None = 1) -> tuple[float, float]:
    """(whole network ms, sum of its table entries ms: stem, head, blocks), timed round robin in the
    same rounds.

    The table is measured once, maybe under another load; timing the derived network and its own
    table entries together separates the error of the additive latency model from the drift of
    the machine.
    """
    net = SuperNet(input_shape, num_classes)
    parts = _parts(net, architecture)
    ms = _with_threads(threads, time_modules, [child_of(net, architecture), *(p[1] for p in parts)],
                       [net.input_shape, *(p[2] for p in parts)], device, warmup, repeats)
    return ms[0], sum(ms[1:])


def check_predictions(table: dict, net: SuperNet, count: int, seed: int = 1, device: str = "cpu",
                      warmup: int = 20, repeats: int = 100, threads: int | None = 1,
                      clock: str = "wall") -> list[dict]:
    """The table's prediction against the measured latency (median of ``repeats`` timings, the
    networks timed round robin) for ``count`` random networks other than those of the fit."""
    model = LatencyModel(table, net)
    archs = sample_architectures(net, count, seed)
    ms = _with_threads(threads, time_modules, [child_of(net, a) for a in archs], [net.input_shape] * count,
                       device, warmup, repeats, clock)
    return [{"architecture": a, "predicted_ms": model.predict(a), "measured_ms": m,
             "error": abs(model.predict(a) - m) / m} for a, m in zip(archs, ms)]


__all__ = ["measure_with_parts", "LatencyTableError", "LatencyModel", "measure_table", "save_table", "load_table",
           "check_table", "check_predictions", "sample_architectures", "measure_network", "machine_description",
           "ChildNet"]
