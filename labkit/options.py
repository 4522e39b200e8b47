"""Command-line values checked in one place: each bad value is one line naming what was expected.

Used as argparse ``type=`` functions by the commands whose options are not ``RunConfig`` fields
(``labkit bench ...``, ``python -m labkit.grading``); ``RunConfig`` checks its own fields."""

from __future__ import annotations

import argparse
import math


def whole_number(what: str = "a whole number", minimum: int = 1):
    """An argparse type: text -> int >= ``minimum``; ``what`` names the value in the message
    (``expected a whole number >= 1, got 'x'``)."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {value}")
        return value

    return parse


def positive_number(text: str) -> float:
    """An argparse type: text -> a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def whole_numbers(text: str, example: str = "1,2,4", what: str = "worker counts") -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]: whole numbers >= 1, each once, sorted."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected {what} like {example}, got {text!r}")
    values = []
    for p in parts:
        try:
            n = int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{p!r} is not a whole number (expected {what} like {example})") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{what} must be >= 1, got {n}")
        values.append(n)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"each of the {what} once, got {text!r}")
    return sorted(values)
