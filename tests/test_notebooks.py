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


def _choice_scores_by_hand(workdir, items, samples=64, seed=0):
  """Monte-Carlo estimates of log p(prefix + choice | context) of every choice of `items`, written
  out here: lm-eval's window (the last model.max_sequence_length tokens of context ++
  continuation), l uniform in 1..L, l random continuation tokens masked, L / l times the sum of
  their log-probabilities under the plain network. (estimates, standard errors), item-major."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from llada_jax.data.codec import text_codec  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top
  from llada_jax.model import logits  # pylint: disable=g-import-not-at-top

  config, params = load_model(workdir)
  codec, limit = text_codec(config), config.model.max_sequence_length
  rng = np.random.default_rng(seed)
  rows, masks, weights = [], [], []
  for item in items:
    context = list(codec.encode(item.context))
    for choice in item.choices:
      answer = list(codec.encode(item.continuation_prefix + choice))[-(limit - 1) :]
      row = (context + answer)[-limit:]
      for _ in range(samples):
        chosen = rng.permutation(len(answer))[: rng.integers(1, len(answer) + 1)]
        mask = np.zeros(limit, bool)
        mask[len(row) - len(answer) + chosen] = True
        rows.append(row + [0] * (limit - len(row)))
        masks.append(mask)
        weights.append(len(answer) / len(chosen))
  tokens, masks = np.asarray(rows), np.asarray(masks)
  valid = np.arange(limit)[None] < np.asarray([len(r) for r in rows])[:, None]
  noisy = np.where(masks, config.tokens.mask_id, tokens)
  logp = np.asarray(jax.nn.log_softmax(logits(config, params, noisy, valid)), np.float64)
  picked = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  draws = (np.where(masks, picked, 0.0).sum(-1) * np.asarray(weights)).reshape(-1, samples)
  return draws.mean(-1), draws.std(-1, ddof=1) / np.sqrt(samples)


def test_likelihood_notebook_agrees_with_the_bound_by_hand(workdir, kernel):
  import numpy as np  # pylint: disable=g-import-not-at-top

  from llada_jax.evaluation.tasks import MULTIPLE_CHOICE  # pylint: disable=g-import-not-at-top

  text, outputs = execute(
      "likelihood_and_eval.ipynb",
      MICRO.format(workdir=workdir) + "\nMC_NUM = 16; N_ITEMS = 3; ELBO_SEQUENCES = 8",
      kernel,
  )
  gap = float(re.search(r"difference ([\d.]+) standard errors", text).group(1))
  assert gap < 3
  # (c): every choice's printed score (16 samples) against 64 samples of the bound drawn here
  # (4.5 standard errors: 12 comparisons, and the print's 0.005 rounding).
  items = MULTIPLE_CHOICE["arc_easy"]()[:3]
  printed = re.findall(r"^  [* ][> ] +(-?[\d.]+) ± +([\d.]+)  ", text, re.MULTILINE)
  assert len(printed) == sum(len(item.choices) for item in items)
  scores, errors = np.asarray(printed, float).T
  mine, mine_errors = _choice_scores_by_hand(workdir, items)
  assert np.all(np.abs(scores - mine) < 4.5 * np.hypot(errors, mine_errors) + 0.01), (scores, mine)
  # The evaluator's predictions and summary: each item's highest printed score (to the print's
  # precision), its gold read here, and acc the share of items predicted right.
  found = [
      tuple(map(int, f))
      for f in re.findall(r"item (\d): gold (\d), by hand (\d), evaluator (\d)", text)
  ]
  first = np.cumsum([0] + [len(item.choices) for item in items])
  assert len(found) == len(items)
  for n, (item, (number, gold, by_hand, predicted)) in enumerate(zip(items, found)):
    item_scores = scores[first[n] : first[n + 1]]
    assert (number, gold, by_hand) == (n, item.gold, predicted)
    assert item_scores[predicted] >= item_scores.max() - 0.01
  summary = re.search(
      r"acc ([\d.]+), acc_norm [\d.]+ over 3 items .* largest score difference (\S+) nats", text
  )
  assert float(summary.group(1)) == round(np.mean([f[3] == f[1] for f in found]), 2)
  assert float(summary.group(2)) < 1e-3  # the evaluator draws with log_likelihood's keys
  assert re.search(r"tinyshakespeare: [\d.]+ ± [\d.]+ bits/byte over 8 sequences", text)
  assert images(outputs) == 1  # the spread against mc_num


@pytest.mark.slow  # test_analysis.py fits and plots the scaling runs in make test
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
