"""llada_jax's dense LLaDA exports load in the official modeling_llada.py with the same logits
(runs where the official files are fetched: tests/reference/official/README.md)."""

import os

import numpy as np
import pytest

pytest.importorskip("torch")
if not os.path.exists(os.path.join(os.path.dirname(__file__), "official", "modeling_llada.py")):
  pytest.skip("the vendored official files are absent", allow_module_level=True)

# pylint: disable=wrong-import-position
from llada_jax.interop.hf_checkpoint import load_hf, save_hf  # noqa: E402
from llada_jax.model.forward import logits  # noqa: E402
from reference import official_llada as ol  # noqa: E402


@pytest.mark.parametrize("tied,kv_heads", [(False, 4), (True, 2)])
def test_an_export_loads_in_the_official_code_with_the_same_logits(tmp_path, tied, kv_heads):
  source = tmp_path / "official"
  ol.build_llada_folder(str(source), n_kv_heads=kv_heads, weight_tying=tied, seed=5)
  config, params = load_hf(source)
  out = tmp_path / "export"
  save_hf(config, params, out, dtype="float32")
  tokens = np.random.RandomState(0).randint(0, 120, (2, 12))
  want = np.asarray(logits(config, params, tokens))
  got = ol.official_logits(str(out), tokens)
  assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) < 1e-5
