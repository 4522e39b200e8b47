"""The course notebooks run headless from top to bottom (as nbgrader and CI run them).

Every notebook in notebooks/ (a new one is picked up by the glob) is committed without outputs,
executes without an error in under 3 minutes on 2 cores, shows at least one plot, and writes its
runs under $LABKIT_RUNS_DIR.

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


WALKTHROUGHS = sorted(NOTEBOOKS.glob("*.ipynb"))
LIMIT_S = 180  # every notebook executes headless in under 3 minutes on 2 cores


def test_there_are_walkthroughs():
    names = [p.name for p in WALKTHROUGHS]
    assert "00_start_here.ipynb" in names and len(names) > 1, names


@pytest.mark.parametrize("path", [*WALKTHROUGHS, *sorted((NOTEBOOKS / "dashboards").glob("*.ipynb"))],
                         ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "labkit", "the notebook's kernel must be labkit"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source


@pytest.mark.slow
@pytest.mark.timeout(LIMIT_S + 60)
@pytest.mark.parametrize("path", WALKTHROUGHS, ids=lambda p: p.name)
def test_notebook_runs_headless_in_under_3_minutes(path, tmp_path, no_leftovers, monkeypatch):
    """Every walk-through runs top to bottom without an error, draws at least one plot, and
    keeps its runs under $LABKIT_RUNS_DIR."""
    runs = tmp_path / "labkit-runs"
    monkeypatch.setenv("LABKIT_RUNS_DIR", str(runs))
    nb, elapsed = execute(path, tmp_path, timeout=LIMIT_S - 10)
    print(f"{path.name} executed in {elapsed:.1f} s")
    errors = [f"{o.get('ename')}: {o.get('evalue')}" for o in outputs(nb, "error")]
    assert not errors, errors
    assert elapsed < LIMIT_S, f"{path.name} took {elapsed:.0f} s (limit {LIMIT_S} s)"
    images = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert images, f"{path.name} shows no plot"
    assert not (tmp_path / "runs").exists(), "a run went to ./runs instead of $LABKIT_RUNS_DIR"
    if path.name == "00_start_here.ipynb":
        check_start_here(nb, runs)


def check_start_here(nb, runs):
    text = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    accuracy = float(text.split("test_accuracy: ")[1].split()[0])
    assert accuracy > 0.9
    assert "status: completed" in text
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
