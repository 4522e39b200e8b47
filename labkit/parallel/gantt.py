"""The timeline of a step as a Gantt chart: one row per rank, what it did when.

``timeline_from_run(run_dir)`` reads the ``timeline`` events a pipeline run writes to its
metrics (the latest logged step, or ``step``); ``draw_timeline(ax, per_rank_events)`` draws
forward and backward passes (labelled F0, B0, ...), sends, and the waits in a receive.
"""

from __future__ import annotations

COLORS = {"forward": "tab:blue", "backward": "tab:orange", "send": "tab:green", "recv": "lightgray"}


def timeline_from_run(run_dir, step: int | None = None) -> dict:
    """{"step", "ranks": [events of pipeline rank 0, 1, ...], "bubble_fraction": mean} from a
    run directory; ranks of the first data replica and tensor slice only. Empty when the run
    wrote no timeline (yet)."""
    from ..runs import RunDir

    events = [e for e in RunDir(run_dir).metrics(kind="event") if e.get("event") == "timeline"
              and e.get("data_index", 0) == 0 and e.get("tensor_index", 0) == 0]
    if not events:
        return {"step": None, "ranks": [], "bubble_fraction": None}
    step = max(e["step"] for e in events) if step is None else step
    chosen = sorted((e for e in events if e["step"] == step), key=lambda e: e["stage"])
    return {"step": step, "ranks": [e["events"] for e in chosen],
            "bubble_fraction": sum(e["bubble_fraction"] for e in chosen) / len(chosen) if chosen else None}


def draw_timeline(ax, per_rank_events: list[list[dict]], title: str = "") -> None:
    for rank, events in enumerate(per_rank_events):
        for e in events:
            width = e["end"] - e["start"]
            ax.barh(rank, width, left=e["start"], color=COLORS.get(e["kind"], "black"), edgecolor="white")
            if e["kind"] in ("forward", "backward") and width > 0:
                ax.text(e["start"] + width / 2, rank, ("F" if e["kind"] == "forward" else "B") + str(e["microbatch"]),
                        ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(per_rank_events)), [f"stage {r}" for r in range(len(per_rank_events))])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the start of the step")
    if title:
        ax.set_title(title)
