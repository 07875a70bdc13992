"""Smoke checks of the official-model harness (reference/official_moe.py) on tiny sizes."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
if not os.path.exists(
    os.path.join(os.path.dirname(__file__), "official", "modeling_llada2_moe.py")
):
  pytest.skip("the vendored official files are absent", allow_module_level=True)

# pylint: disable=wrong-import-position
import safetensors.numpy  # noqa: E402

from reference import official_moe as om  # noqa: E402

OFFICIAL = os.path.join(os.path.dirname(__file__), "official")
V, MASK, EOS = 128, 126, 125


@pytest.fixture(name="llada2", scope="module")
def _llada2_folder(tmp_path_factory) -> tuple[str, dict]:
  path = str(tmp_path_factory.mktemp("llada2_moe"))
  return path, om.build_llada2_moe_folder(path)


@pytest.fixture(name="lladamoe", scope="module")
def _lladamoe_folder(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("lladamoe"))
  om.build_llada_moe_folder(path, moe_layer_freq=[0, 1, 1], moe_router_enable_expert_bias=True)
  return path


def _tokens(b: int = 2, n: int = 12) -> np.ndarray:
  return np.random.RandomState(0).randint(0, MASK, (b, n))


def test_llada2_folder(llada2):
  path, stats = llada2
  assert len(stats["group_limit_changed"]) == 2 and all(c > 0 for c in stats["group_limit_changed"])
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  assert config["model_type"] == "llada2_moe" and config["architectures"] == ["LLaDA2MoeModelLM"]
  assert config["rope_scaling"] is None and config["rotary_dim"] == 8 and "auto_map" in config
  w = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
  assert w["model.word_embeddings.weight"].shape == (V, 64) and w["lm_head.weight"].shape == (V, 64)
  assert w["model.layers.0.attention.query_key_value.weight"].shape == ((4 + 2 * 2) * 16, 64)
  assert w["model.layers.0.mlp.gate_proj.weight"].shape == (96, 64)
  assert w["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (64, 32)
  assert w["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (32, 64)
  assert w["model.layers.1.mlp.gate.weight"].shape == (8, 64)
  assert np.abs(w["model.layers.2.mlp.gate.expert_bias"]).min() > 0
  assert np.abs(w["model.norm.weight"] - 1).max() > 0.01


def test_llada2_logits_and_masks(llada2):
  path, _ = llada2
  tokens = _tokens()
  logits = om.official_logits(path, tokens)
  assert logits.shape == (2, 12, V) and logits.dtype == np.float32 and np.isfinite(logits).all()
  changed = tokens.copy()
  changed[:, -1] = (changed[:, -1] + 1) % MASK
  assert (
      np.abs(om.official_logits(path, changed)[:, 0] - logits[:, 0]).max() > 1e-3
  )  # bidirectional
  full = np.ones((2, 1, 12, 12), bool)
  np.testing.assert_array_equal(om.official_logits(path, tokens, full), logits)
  causal = np.tril(full)
  eager = om.official_logits(path, tokens, attn_implementation="eager")  # eager: causal by default
  np.testing.assert_allclose(om.official_logits(path, tokens, causal), eager, atol=1e-5)


def test_llada2_router_choice(llada2):
  path, _ = llada2
  choice = om.official_router_choice(path, _tokens())
  assert len(choice) == 2
  for c in choice:
    assert c.shape == (24, 2) and c.min() >= 0 and c.max() < 8 and (c[:, 0] != c[:, 1]).all()


def test_llada2_generate(llada2):
  path, _ = llada2
  prompt = _tokens(1, 6)
  kw = dict(block_length=4, steps=2, gen_length=10, mask_id=MASK, eos_id=EOS)
  out = om.official_generate(path, prompt, **kw)
  assert out.shape[0] == 1 and 1 <= out.shape[1] <= 10 and (out != MASK).all()
  np.testing.assert_array_equal(out, om.official_generate(path, prompt, **kw))


def test_lladamoe(lladamoe):
  w = safetensors.numpy.load_file(os.path.join(lladamoe, "model.safetensors"))
  assert w["model.layers.0.mlp.gate_proj.weight"].shape == (96, 64)
  assert w["model.layers.1.self_attn.q_norm.weight"].shape == (16,)
  assert w["model.layers.1.mlp.expert_bias"].shape == (8,)
  assert not any("shared" in k for k in w)
  tokens = _tokens()
  logits = om.official_logits(lladamoe, tokens)
  assert logits.shape == (2, 12, V) and np.isfinite(logits).all()
  np.testing.assert_allclose(
      om.official_logits(lladamoe, tokens, attn_implementation="eager"), logits, atol=1e-5
  )
  choice = om.official_router_choice(lladamoe, tokens)
  assert [c.shape for c in choice] == [(24, 2), (24, 2)]


def test_dfactory_parameter_counts():
  mini = om.llada2_parameter_counts(os.path.join(OFFICIAL, "dfactory/llada2_mini/config.json"))
  flash = om.llada2_parameter_counts(os.path.join(OFFICIAL, "dfactory/llada2_flash/config.json"))
  assert mini == {
      "parameters": 16_255_638_528,
      "expert_bias": 19 * 256,
      "with_expert_bias": 16_255_643_392,
  }
  assert flash == {
      "parameters": 102_889_697_280,
      "expert_bias": 31 * 256,
      "with_expert_bias": 102_889_705_216,
  }


@pytest.mark.parametrize("family", ["llada2_moe", "llada_moe"])
def test_our_export_loads_in_the_official_code_with_the_same_logits(family, tmp_path):
  """llada_jax imports the committed official folder, exports it (`save_hf`, float32) and the
  official class loads the export strictly (every tensor named and shaped as it expects) and
  computes the logits it computed on the original."""
  import pathlib  # pylint: disable=import-outside-toplevel

  from llada_jax.interop import formats  # pylint: disable=import-outside-toplevel
  from llada_jax.interop.hf_checkpoint import save_hf  # pylint: disable=import-outside-toplevel

  folder = pathlib.Path(__file__).parents[1] / "data" / "official" / family
  expected = np.load(folder / "expected.npz")
  ids = {"mask_id": 127}
  if family == "llada2_moe":  # its config.json's pad/EOS id is the mask's: take generate.json's
    ids["eos_id"] = json.loads((folder / "generate.json").read_text())["eos_id"]
  _, load = formats.hf_format(str(folder), **ids)
  config, params = load(str(folder))
  save_hf(config, params, tmp_path, dtype="float32")
  got = om.official_logits(str(tmp_path), expected["tokens"])
  np.testing.assert_allclose(got, expected["logits"], rtol=0, atol=1e-5)
