"""A latency table measured on this machine, and the differentiable expected latency.

ProxylessNAS makes latency differentiable by modelling it: every candidate operation of
every block is timed once on the target hardware, and the latency of a block is its
expectation over the path probabilities, E[lat] = Σ_i p_i · lat_i, a smooth function of α.
The latency of a network is the sum over its blocks plus the fixed parts (stem, head).

Timings are taken at batch 1 on the device (CPU by default; CUDA with a synchronize after
each call), after a warm-up, and the table keeps the median of many timings. The table is
saved as JSON with a description of the machine. A table a user hands in is untrusted: it
is read with ``json`` only and every field is checked; every error names the file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from .supernet import CANDIDATES, ChildNet, SuperNet, make_op

TABLE_FORMAT = "labkit-latency-table"
TABLE_VERSION = 1
MAX_TABLE_BYTES = 4 << 20
FIXED_PARTS = ("stem", "head")


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


def time_modules(modules: list, shapes: list, device: str = "cpu", warmup: int = 10,
                 repeats: int = 50) -> list[float]:
    """Median milliseconds of one batch-1 forward pass of each module, timed round robin.

    Every round times each module once, so a burst of load from elsewhere on the machine
    slows all of them alike instead of one entry of the table.
    """
    cuda = device.startswith("cuda")
    modules = [m.to(device).eval() for m in modules]
    inputs = [torch.randn(1, *shape, device=device) for shape in shapes]
    times: list[list[float]] = [[] for _ in modules]
    with torch.inference_mode():
        for m, x in zip(modules, inputs):
            for _ in range(warmup):
                m(x)
        for _ in range(repeats):
            for i, (m, x) in enumerate(zip(modules, inputs)):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                m(x)
                if cuda:
                    torch.cuda.synchronize()
                times[i].append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]


def measure_table(net: SuperNet, device: str = "cpu", warmup: int = 10, repeats: int = 100,
                  threads: int | None = 1) -> dict:
    """Time every candidate of every block of ``net`` (and the stem and head) on ``device``."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        keys, modules, shapes, entries = set(), [], [], []
        for (_cin, cout, stride), shape, block in zip(net.layout, net.block_inputs(), net.blocks):
            for op in block.candidates:
                key = _key(op, shape, cout, stride)
                if key in keys:
                    continue
                keys.add(key)
                entries.append({"op": op, "input": list(shape), "out_channels": cout, "stride": stride, "ms": 0.0})
                if op != "zero":
                    modules.append((len(entries) - 1, make_op(op, shape[0], cout, stride)))
                    shapes.append(shape)
        parts = [net.stem, net.head]
        ms = time_modules([m for _, m in modules] + parts, shapes + [net.input_shape, _output_shape(net)],
                          device, warmup, repeats)
        for (index, _), value in zip(modules, ms):
            entries[index]["ms"] = value
        fixed = {"stem": ms[-2], "head": ms[-1]}
    finally:
        torch.set_num_threads(old_threads)
    return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "batch": 1, "device": device,
            "warmup": warmup, "repeats": repeats, "statistic": "median",
            "machine": machine_description(device, threads), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fixed": fixed, "entries": entries}


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
    for part in FIXED_PARTS:
        _number(fixed[part], f"fixed.{part}", file)
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
        self.fixed_ms = float(sum(table["fixed"].values()))
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
        """E[latency] = fixed + Σ_blocks Σ_i p_i · lat_i: differentiable in every α."""
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
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return time_module(model, input_shape, device, warmup, repeats)
    finally:
        torch.set_num_threads(old)


def measure_with_parts(architecture: list[str], input_shape, num_classes: int, device: str = "cpu",
                       warmup: int = 20, repeats: int = 200, threads: int | None = 1) -> tuple[float, float]:
    """(whole network ms, sum of its parts ms), timed round robin in the same rounds.

    The table is measured once, maybe under another load; timing the derived network and its own
    table entries together separates the error of the additive latency model from the drift of
    the machine.
    """
    from .supernet import default_layout

    layout = default_layout(input_shape)
    net = SuperNet(input_shape, num_classes)
    child = ChildNet(input_shape, num_classes, architecture)
    parts, shapes = [net.stem, net.head], [tuple(input_shape), _output_shape(net)]
    for op, (cin, cout, stride), shape in zip(architecture, layout, net.block_inputs()):
        if op != "zero":
            parts.append(make_op(op, cin, cout, stride))
            shapes.append(shape)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        ms = time_modules([child, *parts], [tuple(input_shape), *shapes], device, warmup, repeats)
    finally:
        torch.set_num_threads(old)
    return ms[0], sum(ms[1:])


__all__ = ["measure_with_parts", "LatencyTableError", "LatencyModel", "measure_table", "save_table", "load_table", "check_table",
           "measure_network", "machine_description", "ChildNet"]
