"""What every dashboard shares: figures drawn to PNG, the picture widget, a status line,
and where results are kept between sessions.

Figures are drawn on matplotlib's Agg canvas straight to PNG bytes and shown in an
``ipywidgets.Image`` (as ``labkit.widgets.plots`` does): no backend and no frontend
extension is needed, and Voila can never show the text ``<Figure size ...>`` in place of a
picture. Every control changes the picture from the kernel's own thread (a widget
callback), never from a background thread, whose updates Voila may drop.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import ipywidgets as w
from matplotlib.figure import Figure

STYLE = {"description_width": "initial"}  # labels in full, not cut to the default width
WIDE = w.Layout(width="auto")  # buttons as wide as their label
PLOT_CLASS = "labkit-plot"  # every picture of every dashboard carries it (the browser test looks for it)


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def legend_outside(ax, grid: bool = True) -> None:
    """Horizontal grid lines (unless ``grid`` is False), and the legend to the right of the plot."""
    if grid:
        ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def figure(width: float = 10, height: float = 4.5, dpi: int = 80) -> Figure:
    return Figure(figsize=(width, height), dpi=dpi)


def picture(name: str) -> w.Image:
    """An image widget for a dashboard's plot, with the classes the tests find it by."""
    image = w.Image(format="png", layout=w.Layout(max_width="900px", width="100%"))
    image.add_class(PLOT_CLASS)
    image.add_class(f"labkit-{name}-plot")
    return image


def status_line() -> w.HTML:
    label = w.HTML("")
    label.add_class("labkit-status")
    return label


def runs_dir() -> Path:
    """The user's saved runs: $LABKIT_RUNS_DIR, else ./runs (as ``labkit train``)."""
    return Path(os.environ.get("LABKIT_RUNS_DIR", "runs"))


def results_dir(name: str) -> Path:
    """Where a dashboard keeps what it measured, so the next visit starts from it:
    $LABKIT_DASHBOARDS_DIR/<name>, else <labkit's cache>/dashboards/<name>."""
    if os.environ.get("LABKIT_DASHBOARDS_DIR"):
        return Path(os.environ["LABKIT_DASHBOARDS_DIR"]) / name
    from ..data import cache_dir

    return cache_dir() / "dashboards" / name


def read_json(path: Path):
    """The JSON in ``path`` (data only: nothing in it can run), or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data) -> None:
    from ..runs import atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path), data)


def read_summaries(root: Path) -> list[tuple[Path, dict, dict]]:
    """(run directory, config.json, summary.json) of every finished run directly under ``root``."""
    out = []
    if not Path(root).is_dir():
        return out
    for path in sorted(Path(root).iterdir()):
        if not path.is_dir():
            continue
        summary, config = read_json(path / "summary.json"), read_json(path / "config.json")
        if isinstance(summary, dict) and isinstance(config, dict):
            out.append((path, config, summary))
    return out
