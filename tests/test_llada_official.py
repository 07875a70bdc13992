"""Dense LLaDA checkpoints against the official modeling code (modeling_llada.py).

tests/data/official/{llada,illada}/ are tiny random folders written by the official code with the
logits it computed (expected.npz); tests/reference/make_fixtures.py regenerates them where the
official files are fetched. Both: vocab 128, d 64, 2 layers, 4 heads. "llada" is LLaDA-8B's
shape (multi-head attention, a head of its own); "illada" is iLLaDA-8B's (2 KV heads, tied
embeddings: the file has no ff_out.weight and the head is wte, mask id 5).
"""

import json

import flax.linen
import jax
import numpy as np
import pytest
import safetensors.numpy

from llada_jax.interop.hf_checkpoint import load_hf, save_hf
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.model.forward import logits
from tests.test_llada2_moe import FOLDER as LLADA2_FOLDER

OFFICIAL = LLADA2_FOLDER.parent
CASES = {"llada": (4, False, 127), "illada": (2, True, 5)}  # n_kv_heads, tied, mask id


@pytest.mark.parametrize("name", sorted(CASES))
def test_imported_logits_equal_the_official_model(name):
  config, params = load_hf(OFFICIAL / name)
  kv_heads, tied, mask_id = CASES[name]
  m = config.model
  assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads) == (64, 2, 4, kv_heads)
  assert m.tie_embeddings == tied and ("ff_out" in params) == (not tied)
  assert config.tokens.mask_id == mask_id
  expected = np.load(OFFICIAL / name / "expected.npz")
  got = np.asarray(logits(config, params, expected["tokens"]))
  want = expected["logits"]
  assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) < 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_is_the_official_folder(name, tmp_path):
  """The export holds exactly the official file's tensors (a tied model: no ff_out.weight) and
  weight_tying as the folder had it; it reads back as the same model."""
  folder = OFFICIAL / name
  config, params = load_hf(folder)
  save_hf(config, params, tmp_path, dtype="float32")
  exported = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  official = safetensors.numpy.load_file(folder / "model.safetensors")
  assert sorted(exported) == sorted(official)
  for key, value in official.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["weight_tying"] is CASES[name][1] and hf["n_kv_heads"] == CASES[name][0]
  again, _ = load_hf(tmp_path)
  assert again.model.tie_embeddings == CASES[name][1]


def test_a_tied_model_trains_one_matrix_for_embedding_and_head(tiny_config):
  """With model.tie_embeddings the head's gradient reaches the embedding: the embedding gradient
  of the tied model is its untied twin's embedding gradient plus its head gradient, transposed
  (chunked and unchunked losses alike)."""
  tied_config = tiny_config.copy_and_resolve_references()
  tied_config.model.tie_embeddings = True
  tied = MaskedDiffusionLM(tied_config)
  params = flax.linen.meta.unbox(tied.init(jax.random.PRNGKey(0)))
  assert "ff_out" not in params
  untied_params = dict(params, ff_out={"kernel": params["wte"]["embedding"].T})
  untied = MaskedDiffusionLM(tiny_config)
  rng = np.random.RandomState(0)
  inputs, targets = rng.randint(0, 200, (2, 2, 32)).astype(np.int32)
  batch = {
      "targets": targets,
      "valid": np.ones((2, 32), bool),
      "positions": np.broadcast_to(np.arange(32), (2, 32)),
      "segment_ids": None,
  }

  def mean_ce(model, p, chunk):
    model.config.train.loss_chunk = chunk
    return model.cross_entropy(p, inputs, batch)[0].ce.mean()

  for chunk in (0, 16):
    g_tied = jax.grad(lambda p, c=chunk: mean_ce(tied, p, c))(params)
    g_untied = jax.grad(lambda p, c=chunk: mean_ce(untied, p, c))(untied_params)
    np.testing.assert_allclose(
        g_tied["wte"]["embedding"],
        g_untied["wte"]["embedding"] + g_untied["ff_out"]["kernel"].T,
        rtol=1e-5,
        atol=1e-7,
    )
