"""The course surface in a notebook: a control panel, live plots and a run comparison.

    from labkit.widgets import ControlPanel
    ControlPanel()

Every choice the panel offers comes from ``RunConfig``'s fields and the registries, so a
sync mode or compressor registered anywhere in ``labkit`` shows up here by itself.
"""

from .form import ConfigForm
from .panel import ControlPanel
from .plots import LivePlots, RunMetrics
from .table import RunTable

__all__ = ["ControlPanel", "ConfigForm", "LivePlots", "RunMetrics", "RunTable"]
