"""Shared by the training benchmarks: run a list of configurations, tabulate their summaries."""

from __future__ import annotations

import json
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
    return format(value, spec) if isinstance(value, (int, float)) and value is not None else "-"


def dump_json(rows) -> None:
    print(json.dumps(rows, indent=2))
