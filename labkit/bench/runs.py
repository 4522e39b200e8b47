"""Shared by the training benchmarks: run a list of configurations, tabulate their summaries."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path


def run_all(configs: list, labels: list[str], root: str | None = None) -> list[dict]:
    """Train each config (one after the other) under ``root``; return one row per run."""
    from tqdm.auto import tqdm

    from ..launch import train

    root = Path(root or tempfile.mkdtemp(prefix="labkit-bench-"))
    rows = []
    for label, cfg in tqdm(list(zip(labels, configs)), desc="runs", unit="run", file=sys.stderr):
        cfg = cfg.replace(run_dir=str(root / label.replace(" ", "_").replace("/", "-")))
        result = train(cfg, progress=False)
        s = result.summary
        rows.append({"label": label, "status": result.status, "test_accuracy": s.get("test_accuracy"),
                     "wall_time_s": s.get("wall_time_s"), "bytes_sent": s.get("bytes_sent"),
                     "comm_fraction": s.get("comm_fraction"), "samples_per_s": s.get("samples_per_s"),
                     "error": s.get("error"), "run_dir": str(result.run_dir)})
    return rows


def print_table(header: list[str], rows: list[list[str]], out=sys.stdout) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=out)


def fmt(value, spec: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if isinstance(value, float) and spec.endswith("d"):
        value = round(value)
    return format(value, spec)


def significant(value, digits: int = 4) -> str:
    """A measured number to the digits that mean something (``digits`` significant ones):
    0.9472222222222222 -> 0.9472, 7.858 -> 7.858, 12345.678 -> 12346, 1.5e-07 stays."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    text = f"{value:.{digits}g}"
    return f"{value:.0f}" if "e+" in text else text


# --- labkit show --------------------------------------------------------------------------------
SHOW_COLUMNS = ["run", "sync", "compression", "workers", "status", "steps", "test_acc", "wall_s", "bytes_sent",
                "comm_frac"]


def show_row(path) -> tuple[list[str], list[str], str | None]:
    """(table row, one line per damaged file, the reason a run stopped or failed) of one run
    directory. Nothing in it is trusted: any file may be cut short, altered or not JSON."""
    from ..runs import RunDir

    run = RunDir(path)
    problems = run.problems()
    try:
        cfg = run.read_config().get("config") or {}
        if not isinstance(cfg, dict):
            cfg = {}
    except (OSError, ValueError, AttributeError):
        cfg = {}
    s = run.settle(found_by="labkit show")
    if s is None:
        s = {"status": "damaged" if run.summary_path.exists() else "running"}
    if not isinstance(s, dict):
        s = {"status": "damaged"}
    steps = s.get("steps")
    if steps is None:
        steps = max((r.get("step", 0) for r in run.iter_metrics(kind="train") if isinstance(r.get("step"), int)),
                    default=None)
    row = [str(path), str(cfg.get("sync", "-")), str(cfg.get("compression", "-")), str(cfg.get("workers", "-")),
           str(s.get("status", "damaged")), fmt(steps, "d"), fmt(s.get("test_accuracy"), ".4f"),
           fmt(s.get("wall_time_s"), ".1f"), fmt(s.get("bytes_sent"), ",d"), fmt(s.get("comm_fraction"), ".2f")]
    why = s.get("error") if s.get("status") in ("failed", "stopped") else None
    return row, problems, why


def show(paths, out=None, err=None) -> int:
    """``labkit show RUN_DIR ...``: one row per run; each damaged file named in one line on
    stderr (exit status 1), each stopped or failed run's reason under the table; a path that
    is not a run directory: one line and exit status 2, nothing else printed."""
    from pathlib import Path

    out = out or sys.stdout
    err = err or sys.stderr
    for path in paths:
        p = Path(path)
        if not p.is_dir():
            what = "does not exist" if not p.exists() and not p.is_symlink() else "is not a directory"
            print(f"labkit: error: show: {path} {what}", file=err)
            return 2
        if not (p / "config.json").exists():
            print(f"labkit: error: show: {path} is not a labkit run directory (no config.json)", file=err)
            return 2
    rows, problems, reasons = [], [], []
    for path in paths:
        row, found, why = show_row(path)
        rows.append(row)
        problems += found
        if why:
            reasons.append(f"{path}: {row[4]}: {why}")
    print_table(SHOW_COLUMNS, rows, out=out)
    for line in reasons:
        print(line, file=out)
    for line in problems:
        print(f"labkit: show: {line}", file=err)
    return 1 if problems else 0


def dump_json(rows) -> None:
    print(json.dumps(rows, indent=2))
