"""A table comparing the runs of this session, read from their run directories."""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as w

from ..runs import RunDir

COLUMNS = ("run", "parallelism", "sync", "compression", "workers", "status", "test accuracy", "wall time (s)",
           "MB sent", "comm fraction")


def _number(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _parallelism(config: dict, summary: dict) -> str:
    """The parallelism, its grid D x P x T once the run has one, and a pipeline's measured bubble."""
    text = config.get("parallelism", "data")
    grid = summary.get("grid")
    if grid:
        text += f" {grid['data']}x{grid['pipeline']}x{grid['tensor']}"
    if summary.get("bubble_fraction") is not None:
        text += f", bubble {summary['bubble_fraction']:.2f}"
    return text


def run_row(run_dir) -> dict:
    """One row of the table: what the run was (config.json) and how it went (summary.json)."""
    run = RunDir(run_dir)
    try:
        config = run.read_config().get("config") or {}
    except (OSError, ValueError, AttributeError):
        config = {}  # damaged: the row shows what can be read
    # a run whose launching process is gone is finalized here, by its first reader
    summary = run.settle(found_by="the run table") or {"status": "running"}
    params = ",".join(f"{k}={v}" for k, v in sorted((config.get("compression_params") or {}).items()))
    sent = summary.get("bytes_sent")
    return {
        "run": run.path.name,
        "parallelism": _parallelism(config, summary),
        "sync": str(config.get("sync", "?")),
        "compression": str(config.get("compression", "?")) + (f" ({params})" if params else ""),
        "workers": str(config.get("workers", "?")),
        "status": str(summary.get("status", "damaged")),
        "test accuracy": _number(summary.get("test_accuracy"), 4),
        "wall time (s)": _number(summary.get("wall_time_s"), 1),
        "MB sent": _number(None if sent is None else sent / 1e6, 2),
        "comm fraction": _number(summary.get("comm_fraction"), 2),
    }


class RunTable:
    """An HTML table with one row per run; ``add()`` a run directory, ``refresh()`` to re-read."""

    def __init__(self):
        self.run_dirs: list[Path] = []
        self.widget = w.HTML()
        self.widget.add_class("labkit-run-table")
        self.refresh()

    def add(self, run_dir) -> None:
        self.run_dirs.append(Path(run_dir))
        self.refresh()

    def rows(self) -> list[dict]:
        return [run_row(path) for path in self.run_dirs]

    def refresh(self) -> None:
        if not self.run_dirs:
            self.widget.value = "<i>Runs you start appear here, one row each, to compare.</i>"
            return
        head = "".join(f"<th style='padding:2px 8px'>{html.escape(c)}</th>" for c in COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td style='padding:2px 8px'>{html.escape(row[c])}</td>" for c in COLUMNS) + "</tr>"
            for row in self.rows())
        self.widget.value = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
