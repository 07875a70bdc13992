"""The notebooks execute end to end on micro settings, in a python3 kernel of this interpreter.

quickstart.ipynb and likelihood_and_eval.ipynb run from a temporary directory and share one micro
workdir (whichever runs first trains it, the other loads it); scaling_curves.ipynb trains a micro
ladder.
"""

import json
import os
import pathlib
import re
import sys

import pytest

nbclient = pytest.importorskip("nbclient", reason="executing notebooks needs nbclient")
nbformat = pytest.importorskip("nbformat", reason="executing notebooks needs nbformat")
pytest.importorskip("ipykernel", reason="executing notebooks needs ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
MICRO = (
    "CONFIG = 'tests/configs/micro.py'; OVERRIDES = {{'train': {{'eval_every': 2}}}}; "
    "WORKDIR = '{workdir}'; TRAIN_STEPS = 4"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("notebooks") / "micro"


@pytest.fixture
def kernel(tmp_path, monkeypatch):
  """A python3 kernel spec for this interpreter, found first; the kernel sees one CPU device."""
  spec = tmp_path / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(
      json.dumps(
          {
              "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
              "display_name": "Python 3",
              "language": "python",
          }
      )
  )
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv(
      "XLA_FLAGS",
      re.sub(
          r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
      ).strip(),
  )
  return tmp_path


def execute(name: str, parameters: str, cwd: pathlib.Path) -> tuple[str, list]:
  """Runs a notebook with `parameters` injected after its parameters cell: (stdout, outputs)."""
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert all(
      not c.outputs and c.execution_count is None for c in code
  ), "commit notebooks with their outputs stripped"
  index = next(
      i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])
  )
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters))
  nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
  ).execute()
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(
      o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout"
  )
  return text, outputs


def images(outputs: list) -> int:
  return sum("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")


def test_quickstart_trains_samples_and_draws_the_reverse_process(workdir, kernel):
  text, outputs = execute(
      "quickstart.ipynb",
      MICRO.format(workdir=workdir) + "\nGEN_LENGTH, STEPS, BLOCK_LENGTH = 16, 16, 8",
      kernel,
  )
  assert (workdir / "metrics.jsonl").exists()
  assert "ROMEO:" in text and "JULIET:" in text
  assert "block 0: positions 0-7" in text and "block 1: positions 8-15" in text
  assert images(outputs) == 2  # the training curve and the reverse process


def test_likelihood_notebook_agrees_with_the_bound_by_hand(workdir, kernel):
  text, outputs = execute(
      "likelihood_and_eval.ipynb",
      MICRO.format(workdir=workdir) + "\nMC_NUM = 16; N_ITEMS = 3; ELBO_SEQUENCES = 8",
      kernel,
  )
  gap = float(re.search(r"difference ([\d.]+) standard errors", text).group(1))
  assert gap < 3
  predictions = re.findall(r"item \d: gold \d, by hand (\d), evaluator (\d)", text)
  assert len(predictions) == 3 and all(mine == theirs for mine, theirs in predictions)
  difference = re.search(
      r"acc [\d.]+, acc_norm [\d.]+ over 3 items .* largest score difference " r"(\S+) nats", text
  )
  assert float(difference.group(1)) < 1e-3  # same keys as evaluate_multiple_choice
  assert re.search(r"tinyshakespeare: [\d.]+ ± [\d.]+ bits/byte over 8 sequences", text)
  assert images(outputs) == 1  # the spread against mc_num


def test_scaling_curves_notebook_trains_fits_and_plots(kernel):
  runs = kernel / "runs"
  text, outputs = execute(
      "scaling_curves.ipynb",
      (
          f"LADDER_FILE = 'tests/configs/micro_ladder.py'; ONLY = 'd16'; RUNS_DIR = '{runs}'; "
          "EVAL_POINTS = 4; BOOTSTRAP = 5; OBJECTIVES = ('mdm', 'arm')"
      ),
      NOTEBOOKS,
  )
  assert "trained d16-mdm-5e7" in text and "trained d16-arm-5e7" in text
  assert "mdm: b = " in text and "arm: b = " in text
  assert images(outputs) == 1  # the loss-vs-FLOPs plot llada-scaling writes
  assert (runs / "scaling.png").exists()
