"""LLaDA-MoE (modeling_lladamoe.py) checkpoints against the official modeling code.

tests/data/official/llada_moe/ is a tiny random folder written by the official code (save_pretrained)
with the logits and router choices it computed (expected.npz): tests/reference/make_fixtures.py
regenerates it where the official files are fetched. Sizes: vocab 128, d 64, 3 layers (layer 0
dense), 4 heads, 2 KV heads, head_dim 16, partial rotary 0.5, QK-norm, 8 experts (2 per token),
one shared expert of the expert size, a non-zero expert bias (added to the softmax probabilities,
so it changes both the choices and the weights).
"""

import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from llada_jax.errors import CheckpointError
from llada_jax.interop import llada_moe, rules
from llada_jax.interop.formats import hf_format
from llada_jax.model import ModelConfig, Transformer
from tests.test_llada2_moe import FOLDER as LLADA2_FOLDER

FOLDER = LLADA2_FOLDER.parent / "llada_moe"
EXPECTED = np.load(FOLDER / "expected.npz")
MASK = 127  # the fixture's vocabulary is 128 tokens; the family's mask id 156895 is outside it


@pytest.fixture(scope="module")
def imported():
  return llada_moe.load(FOLDER, mask_id=MASK)


def test_config_is_the_official_architecture(imported):
  config, _ = imported
  m = config.model
  assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size) == (64, 3, 4, 2, 128)
  assert m.qk_norm and m.rotary_dim == 8 and not m.causal and m.mlp_hidden_size == 96
  assert (m.moe.num_experts, m.moe.experts_per_token, m.moe.num_shared_experts) == (8, 2, 1)
  assert m.moe.first_k_dense_replace == 1 and m.moe.router == "softmax"
  assert not m.moe.norm_topk_prob and m.moe.aux_loss_coef == 0.01
  assert config.diffusion.objective == "mdm" and config.tokens.eos_id == 126


@pytest.mark.parametrize("scan", [True, False])
def test_logits_and_router_choices_equal_the_official_model(imported, scan):
  config, params = imported
  if not scan:
    base = config.copy_and_resolve_references()
    base.model.scan_layers = False
    config, params = llada_moe.load(FOLDER, mask_id=MASK, base=base)
  model = Transformer(ModelConfig.from_config(config))
  logits, state = model.apply(
      {"params": params}, np.asarray(EXPECTED["tokens"], np.int32), mutable="intermediates"
  )
  want = EXPECTED["logits"]
  assert float(np.max(np.abs(np.asarray(logits) - want)) / np.max(np.abs(want))) < 1e-5
  found = state["intermediates"]
  if scan:
    choices = np.asarray(found["moe_blocks"]["moe"]["experts"][0])
  else:
    choices = np.stack([np.asarray(found[f"blocks_{i}"]["moe"]["experts"][0]) for i in (1, 2)])
  for layer, got in enumerate(choices):
    want_choice = EXPECTED[f"router_{layer}"]
    np.testing.assert_array_equal(
        np.sort(got.reshape(want_choice.shape), -1), np.sort(want_choice, -1)
    )


def test_export_writes_the_official_tensors_and_config(imported, tmp_path):
  """The export holds the official file's tensors exactly and the official class's fields, so
  the official code loads it as the same model; and it reads back as the same parameters."""
  from llada_jax.interop.hf_checkpoint import save_hf  # pylint: disable=g-import-not-at-top

  config, params = imported
  save_hf(config, params, tmp_path, dtype="float32")
  exported = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  official = safetensors.numpy.load_file(FOLDER / "model.safetensors")
  assert sorted(exported) == sorted(official)
  for name, value in official.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  hf = json.loads((tmp_path / "config.json").read_text())
  stored = json.loads((FOLDER / "config.json").read_text())
  for key in (
      "architectures",
      "hidden_size",
      "dense_intermediate_size",
      "expert_intermediate_size",
      "shared_expert_intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "num_key_value_heads",
      "num_experts",
      "num_experts_per_tok",
      "moe_layer_freq",
      "partial_rotary_factor",
      "rope_theta",
      "rms_norm_eps",
      "vocab_size",
      "qk_layernorm",
      "moe_router_enable_expert_bias",
      "moe_router_score_function",
      "norm_topk_prob",
  ):
    assert hf[key] == stored[key], key
  assert hf["auto_map"]["AutoModelForCausalLM"] == "modeling_lladamoe.LLaDAMoEModelLM"
  again, params_again = llada_moe.load(tmp_path)  # the export records its mask id
  assert (again.tokens.mask_id, again.tokens.eos_id) == (MASK, config.tokens.eos_id)
  jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_the_hub_config_is_recognised_by_architecture_and_a_folder_without_bias_loads(tmp_path):
  """The hub's config.json says model_type "llada" (the dense LLaDA's name) with architecture
  LLaDAMoEModelLM; without moe_router_enable_expert_bias the folder has no bias buffer and the
  biases are zero."""
  hf = json.loads((FOLDER / "config.json").read_text())
  hf.update(model_type="llada", moe_router_enable_expert_bias=False)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  tensors = safetensors.numpy.load_file(FOLDER / "model.safetensors")
  safetensors.numpy.save_file(
      {k: v for k, v in tensors.items() if not k.endswith("expert_bias")},
      tmp_path / "model.safetensors",
  )
  _, load = hf_format(str(tmp_path), mask_id=MASK)
  config, params = load(str(tmp_path))
  assert config.model.moe.router == "softmax"
  np.testing.assert_array_equal(params["moe_blocks"]["moe"]["expert_bias"], np.zeros((2, 8)))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"moe_layer_freq": [1, 0, 1]}, r"moe_layer_freq=\[1, 0, 1\] is not supported"),
        ({"clip_qkv": 8.0}, "clip_qkv=8.0 is not supported"),
        ({"shared_expert_intermediate_size": 48}, "shared_expert_intermediate_size=48"),
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"num_experts": None}, "has no 'num_experts'"),
    ],
)
def test_unsupported_folders_are_refused_in_one_line(tmp_path, change, message):
  hf = json.loads((FOLDER / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(hf, **change)))
  shutil.copy(FOLDER / "model.safetensors", tmp_path)
  with pytest.raises(CheckpointError, match=message):
    llada_moe.load(tmp_path, mask_id=MASK)


def test_the_family_mask_id_outside_a_tiny_vocabulary_is_named():
  from llada_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError, match=r"mask_id=156895 is not allowed.*pass --mask_id"):
    llada_moe.read_config(FOLDER)


def test_expected_names_cover_the_official_file(imported):
  config, _ = imported
  official = safetensors.numpy.load_file(FOLDER / "model.safetensors")
  assert sorted(rules.expected_names(config, llada_moe.rules(config))) == sorted(official)
