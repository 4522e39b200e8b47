"""Hyperparameters of a labkit run, and running a batch of members at once through the launcher."""

from __future__ import annotations

import math
import random

from .common import SearchError

# The space PBT and the particle swarm search: name -> (low, high, scale).
SPACE = {
    "lr": (0.003, 0.5, "log"),
    "momentum": (0.0, 0.95, "linear"),
    "batch_size": (8, 128, "intlog"),
    "compression_ratio": (0.01, 1.0, "log"),  # top-k ratio; 1.0 means no compression
}


def check_space(names: list[str]) -> None:
    """``--space``: at least one hyperparameter, each one of SPACE."""
    unknown = [n for n in names if n not in SPACE]
    if unknown or not names:
        raise SearchError("--space", f"unknown hyperparameter {unknown[0] if unknown else '(none given)'!r}; "
                                     f"choose from {', '.join(SPACE)}")


def space_names(space: str) -> list[str]:
    """The hyperparameters of ``--space``, a comma-separated list."""
    return [n.strip() for n in str(space).split(",") if n.strip()]


def base_config(space: list[str], run_dir, **settings):
    """The RunConfig every member starts from, checked with the largest batch the space allows
    (each rank's share must fit it); a bad setting is a SearchError naming its option."""
    from ..config import ConfigError, RunConfig
    from .common import SearchError

    try:
        base = RunConfig(**settings)
        big = {"batch_size": SPACE["batch_size"][1]} if "batch_size" in space else {}
        base.replace(**big).validate()
    except ConfigError as e:
        raise SearchError(e.option, str(e).split(": ", 1)[1]) from None
    return base.replace(run_dir=str(run_dir))


def sample(space: list[str], rng: random.Random) -> dict:
    return {name: from_unit(name, rng.random()) for name in space}


def from_unit(name: str, u: float):
    """The value at position ``u`` in [0, 1] of the range of ``name``."""
    low, high, scale = SPACE[name]
    u = min(max(u, 0.0), 1.0)
    if scale == "linear":
        return low + u * (high - low)
    value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    return int(round(value)) if scale == "intlog" else value


def to_unit(name: str, value) -> float:
    low, high, scale = SPACE[name]
    if scale == "linear":
        return (value - low) / (high - low)
    return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))


def clip(name: str, value):
    low, high, scale = SPACE[name]
    value = min(max(value, low), high)
    return int(round(value)) if scale == "intlog" else value


def config_for(base, hparams: dict, **changes):
    """A RunConfig: ``base`` with the member's hyperparameters (compression_ratio → top-k)."""
    values = {k: v for k, v in hparams.items() if k != "compression_ratio"}
    ratio = hparams.get("compression_ratio")
    if ratio is not None and ratio < 1.0:
        values.update(compression="topk", compression_params={"ratio": float(ratio)})
    elif ratio is not None:
        values.update(compression="none", compression_params={})
    return base.replace(**values, **changes)


def run_members(configs: list, timeout: float, on_start=None) -> list[dict]:
    """Launch every config at once (each a labkit run), wait for all; their summaries.

    A member that fails or is killed gets a ``failed`` summary; the others go on.
    """
    import time

    from ..launch import launch

    runs = [launch(c) for c in configs]
    if on_start:
        on_start(runs)
    deadline = time.monotonic() + timeout
    out = []
    for run in runs:
        result = run.wait(timeout=max(1.0, deadline - time.monotonic()))
        if result.status == "running":
            result = run.stop()
        out.append(result.summary)
    return out


def score(summary: dict | None) -> float:
    """A member's fitness: its last evaluation accuracy; a member that failed scores -inf."""
    if not summary or summary.get("status") != "completed" or summary.get("test_accuracy") is None:
        return float("-inf")
    return float(summary["test_accuracy"])
