"""The numerics walk-throughs (001b, 004d) run headless, show plots, and carry their topic tags."""

import nbformat
import pytest

from .test_notebooks import NOTEBOOKS

TOPICS = {"001b_lns_and_kahan.ipynb": ["001.11", "001.12", "001.13", "001.14"],
          "004d_numerics.ipynb": ["004.02", "004.03", "004.06", "004.15", "004.21", "004.24", "004.25"]}


@pytest.mark.parametrize("name", TOPICS)
def test_committed_without_outputs_and_tagged(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    tags = [t for cell in nb.cells for t in cell.metadata.get("tags", [])]
    assert sorted(tags) == [f"topic-{t}" for t in TOPICS[name]]
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source



# Their headless run (under 3 minutes, no error, plots) is tests/test_notebooks.py's, which
# executes every walk-through once.
