"""notebooks/tutorial.ipynb: stored without outputs, and executed top to bottom in a real Jupyter
kernel on the real MNIST with its short parameters (issue 18)."""

import json
import os

import pytest

from tests.conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "tutorial.ipynb"


def test_the_tutorial_is_stored_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)
    assert "parameters" in code[0]["metadata"].get("tags", [])  # the short settings, first


@pytest.mark.slow
def test_the_tutorial_runs_top_to_bottom_in_a_kernel(real_data_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    monkeypatch.setenv("MNIST_LAB_DATA", str(real_data_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, on the first error.
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 6  # the curves and the digits
    assert (tmp_path / "outputs" / "runs").is_dir() and (tmp_path / "outputs" / "sweeps").is_dir()
    text = "".join(str(output.get("data", {}).get("text/plain", "")) + output.get("text", "") for output in outputs)
    assert "LeNet-5, augment=affine" in text and "transpose" in text
