"""notebooks/scaling_curves.ipynb executes end to end on a micro ladder (nbclient, python3 kernel)."""

import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def test_scaling_curves_notebook_trains_fits_and_plots(tmp_path):
  notebook = nbformat.read(NOTEBOOKS / "scaling_curves.ipynb", as_version=4)
  assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), (
      "commit notebooks with their outputs stripped")
  index = next(i for i, c in enumerate(notebook.cells)
               if "parameters" in c.metadata.get("tags", []))
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
      f"LADDER_FILE = 'tests/configs/micro_ladder.py'; ONLY = 'd16'; RUNS_DIR = '{tmp_path}'; "
      "EVAL_POINTS = 4; BOOTSTRAP = 5"))
  nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "trained d16-mdm-5e7" in text and "trained d16-arm-5e7" in text
  assert "mdm: b = " in text and "arm: b = " in text
  assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
  assert (tmp_path / "scaling.png").exists()
