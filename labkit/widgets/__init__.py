"""The course surface in a notebook: a control panel, live plots and a run comparison.

    from labkit.widgets import ControlPanel
    ControlPanel()

Every choice the panel offers comes from ``RunConfig``'s fields and the registries, so a
sync mode or compressor registered anywhere in ``labkit`` shows up here by itself.

``import labkit.widgets`` imports nothing heavy: each name below is imported from its
module (ipywidgets, matplotlib, and through the launcher torch) when it is first used.
"""

import importlib

_WHERE = {"ControlPanel": ".panel", "ConfigForm": ".form", "LivePlots": ".plots", "RunMetrics": ".plots",
          "RunTable": ".table"}

__all__ = ["ControlPanel", "ConfigForm", "LivePlots", "RunMetrics", "RunTable"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
