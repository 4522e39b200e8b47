"""What the searchers share: settings checks, the search's own run directory, member runs."""

from __future__ import annotations

import math
import time
import typing
from pathlib import Path


class SearchError(ValueError):
    """A bad setting; ``option`` is the command-line flag at fault."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(f"{option}: {message}")


def typed_value(option: str, text: str, kind, error=None):
    """What a user typed for ``option``, as the field type ``kind`` (int, float, str, or
    Optional of one, where "" and "none" mean None); a bad number raises ``error(option,
    message)`` (SearchError unless another error class is given)."""
    error = error or SearchError
    if typing.get_origin(kind) is not None or type(None) in typing.get_args(kind):
        if text.strip().lower() in ("", "none"):
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is int:
        try:
            value = float(text)
        except ValueError:
            raise error(option, f"expected a whole number, got {text!r}") from None
        if not value.is_integer():
            raise error(option, f"expected a whole number, got {text!r}")
        return int(value)
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise error(option, f"expected a number, got {text!r}") from None
    return text


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_number(config, name: str, whole: bool = False, low: float | None = None, high: float | None = None,
                 positive: bool = False) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if whole:
        ok = ok and float(value).is_integer()
    if not ok:
        raise SearchError(flag(name), f"expected {'a whole number' if whole else 'a finite number'}, got {value!r}")
    if positive and value <= 0:
        raise SearchError(flag(name), f"must be > 0, got {value!r}")
    if low is not None and value < low:
        raise SearchError(flag(name), f"must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise SearchError(flag(name), f"must be <= {high}, got {value!r}")


def check_new_run_dir(path) -> None:
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise SearchError("--run-dir", f"{path} already exists and is not an empty directory")


class SearchRun:
    """The search's own run directory: config.json, metrics.jsonl (one event per decision),
    summary.json; its members are run directories under ``members/``."""

    def __init__(self, kind: str, settings: dict, run_dir: str | None, population: int):
        from ..runs import RunDir, default_run_dir

        path = run_dir or str(default_run_dir(kind, "search", population))
        self.run = RunDir(path)
        self.run.create({**settings, "command": f"search {kind}", "sync": kind, "compression": "none",
                         "workers": population, "model": settings.get("model", kind)}, population)
        self.members = self.run.path / "members"
        self.members.mkdir(exist_ok=True)
        self.start = time.time()

    @property
    def path(self) -> Path:
        return self.run.path

    def event(self, event: str, **fields) -> None:
        self.run.append_metrics({"t": time.time() - self.start, "kind": "event", "event": event, "rank": 0, **fields})

    def finish(self, summary: dict) -> dict:
        summary = {"status": "completed", "wall_time_s": time.time() - self.start, "run_dir": str(self.path), **summary}
        self.run.write_summary(summary)
        return summary
