"""The course notebooks run headless from top to bottom (as nbgrader and CI run them).

A widget cell must not hang or fail without a browser: the control panel is shown but
stays inert, so the only processes a notebook starts are the runs its cells ask for.
"""

import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from .conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def kernel_name() -> str:
    """The kernel ``make setup`` registers, else this interpreter's own."""
    return "labkit" if "labkit" in KernelSpecManager().find_kernel_specs() else "python3"


def execute(path, cwd, timeout):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_name(), timeout=timeout,
                            resources={"metadata": {"path": str(cwd)}})
    start = time.monotonic()
    client.execute()
    return nb, time.monotonic() - start


def outputs(nb, output_type=None):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if output_type is None or o.output_type == output_type]


@pytest.mark.parametrize("path", [NOTEBOOKS / "00_start_here.ipynb", NOTEBOOKS / "dashboards" / "training.ipynb"],
                         ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_start_here_runs_headless_in_under_3_minutes(tmp_path, no_leftovers, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("LABKIT_RUNS_DIR", str(runs))
    nb, elapsed = execute(NOTEBOOKS / "00_start_here.ipynb", tmp_path, timeout=170)
    print(f"00_start_here.ipynb executed in {elapsed:.1f} s")
    assert elapsed < 180
    assert not outputs(nb, "error")
    text = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    accuracy = float(text.split("test_accuracy: ")[1].split()[0])
    assert accuracy > 0.9
    assert "status: completed" in text
    assert any("image/png" in o.get("data", {}) for o in outputs(nb, "display_data"))
    assert any(WIDGET_VIEW in o.get("data", {}) for o in outputs(nb, "execute_result"))
    # the notebook's own run is the only one: the panel started nothing by itself
    (first_run,) = runs.iterdir()
    assert (first_run / "summary.json").exists()


@pytest.mark.timeout(120)
def test_dashboard_runs_headless_and_stays_inert(tmp_path, no_leftovers, monkeypatch):
    monkeypatch.setenv("LABKIT_RUNS_DIR", str(tmp_path / "panel-runs"))
    nb, _ = execute(NOTEBOOKS / "dashboards" / "training.ipynb", tmp_path, timeout=90)
    assert not outputs(nb, "error")
    (panel,) = [o for o in outputs(nb, "execute_result") if WIDGET_VIEW in o["data"]]
    assert panel["data"][WIDGET_VIEW]["model_id"]
    assert not (tmp_path / "panel-runs").exists()
