"""The notebooks run top to bottom, unchanged, on a CPU (with their small budget, VDM_NOTEBOOK_QUICK=1).

Each is executed by a real Jupyter kernel (nbclient), as Colab would run it; the notebooks
assert their own checks (the schedule is monotone, estimates agree with closed forms, ...),
so an execution error is a failed check as well as a broken notebook.
"""
import os

import pytest
from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))


def test_the_three_notebooks_are_there():
    assert NOTEBOOKS == ["01_vdm_2d.ipynb", "02_mnist_quickstart.ipynb", "03_schedules_and_weightings.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    monkeypatch.setenv("VDM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit notebooks without outputs"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
