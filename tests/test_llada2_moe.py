"""LLaDA 2.x (llada2_moe) checkpoints against the official modeling code.

tests/data/official/llada2_moe/ is a tiny random folder written by the official
`modeling_llada2_moe.py` (save_pretrained) with what that code computed on it (expected.npz,
generate.json): tests/reference/make_fixtures.py regenerates it where the official files are
fetched. Sizes: vocab 128, d 64, 3 layers (layer 0 dense), 4 heads, 2 KV heads, head_dim 16,
partial rotary 0.5, QK-norm, 8 experts (2 per token) in 4 groups (2 kept), one shared expert,
routed scaling 2.5 and a non-zero expert bias whose group limit changes choices.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from llada_jax.errors import CheckpointError
from llada_jax.interop import llada2_moe, rules
from llada_jax.interop.formats import hf_format
from llada_jax.model import ModelConfig, Transformer

FOLDER = pathlib.Path(__file__).parent / "data" / "official" / "llada2_moe"
EXPECTED = np.load(FOLDER / "expected.npz")
GENERATE = json.loads((FOLDER / "generate.json").read_text())


def _load(path=FOLDER, **overrides):
  return llada2_moe.load(path, mask_id=GENERATE["mask_id"], eos_id=GENERATE["eos_id"], **overrides)


@pytest.fixture(scope="module")
def imported():
  return _load()


def _forward(config, params, tokens):
  model = Transformer(ModelConfig.from_config(config))
  logits, state = model.apply(
      {"params": params}, np.asarray(tokens, np.int32), mutable="intermediates"
  )
  return np.asarray(logits), state["intermediates"]


def _relative_error(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_config_is_the_official_architecture(imported):
  config, _ = imported
  m = config.model
  assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size) == (64, 3, 4, 2, 128)
  assert m.qk_norm and m.rotary_dim == 8 and not m.causal
  assert (m.moe.num_experts, m.moe.experts_per_token, m.moe.num_shared_experts) == (8, 2, 1)
  assert (m.moe.n_group, m.moe.topk_group, m.moe.first_k_dense_replace) == (4, 2, 1)
  assert m.moe.routed_scaling_factor == 2.5 and config.diffusion.objective == "block"


@pytest.mark.parametrize("scan", [True, False])
def test_logits_and_router_choices_equal_the_official_model(imported, scan):
  config, params = imported if scan else _load(base=_unscanned(imported[0]))
  logits, intermediates = _forward(config, params, EXPECTED["tokens"])
  assert _relative_error(logits, EXPECTED["logits"]) < 1e-5
  if scan:
    choices = np.asarray(intermediates["moe_blocks"]["moe"]["experts"][0])  # [layers, B, L, k]
  else:
    choices = np.stack(
        [np.asarray(intermediates[f"blocks_{i}"]["moe"]["experts"][0]) for i in (1, 2)]
    )
  for layer, got in enumerate(choices):
    want = EXPECTED[f"router_{layer}"]
    np.testing.assert_array_equal(np.sort(got.reshape(want.shape), -1), np.sort(want, -1))


def _unscanned(config):
  base = config.copy_and_resolve_references()
  base.model.scan_layers = False
  return base


def test_merged_expert_layout_reads_the_same_parameters(imported, tmp_path):
  """dFactory's llada2_moe_veomni folders stack each layer's experts in one tensor."""
  tensors = safetensors.numpy.load_file(FOLDER / "model.safetensors")
  merged = {}
  for name, value in tensors.items():
    if ".mlp.experts." not in name:
      merged[name] = value
  for layer in (1, 2):
    for proj in ("gate_proj", "up_proj", "down_proj"):
      prefix = f"model.layers.{layer}.mlp.experts."
      merged[prefix + proj] = np.stack([tensors[f"{prefix}{e}.{proj}.weight"] for e in range(8)])
  safetensors.numpy.save_file(merged, tmp_path / "model.safetensors")
  hf = json.loads((FOLDER / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(hf, model_type="llada2_moe_veomni")))
  _, params = _load(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, imported[1])


def test_export_writes_the_official_tensors_and_config(imported, tmp_path):
  config, params = imported
  exported = dict(rules.to_hf_tensors(config, params, llada2_moe.rules(config), dtype="float32"))
  official = safetensors.numpy.load_file(FOLDER / "model.safetensors")
  assert list(exported) == rules.expected_names(config, llada2_moe.rules(config))
  assert sorted(exported) == sorted(official)
  for name, value in official.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  hf = llada2_moe.config_to_llada2_moe(config, "float32")
  stored = json.loads((FOLDER / "config.json").read_text())
  for key in (
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "num_key_value_heads",
      "head_dim",
      "num_experts",
      "num_experts_per_tok",
      "n_group",
      "topk_group",
      "routed_scaling_factor",
      "moe_intermediate_size",
      "first_k_dense_replace",
      "partial_rotary_factor",
      "rope_theta",
      "rms_norm_eps",
      "vocab_size",
      "use_qk_norm",
  ):
    assert hf[key] == stored[key], key
  assert hf["auto_map"]["AutoModelForCausalLM"] == "modeling_llada2_moe.LLaDA2MoeModelLM"
  # And back: the export reads in as the same model.
  from llada_jax.interop.hf_checkpoint import save_hf  # pylint: disable=g-import-not-at-top

  save_hf(config, params, tmp_path, dtype="float32")
  again, params_again = llada2_moe.load(tmp_path)
  assert (
      again.tokens.mask_id == config.tokens.mask_id and again.tokens.eos_id == config.tokens.eos_id
  )
  jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_hf_format_picks_the_family_by_config(tmp_path):
  read_config, _ = hf_format(str(FOLDER), mask_id=GENERATE["mask_id"])
  assert read_config(str(FOLDER), eos_id=GENERATE["eos_id"]).model.moe.num_experts == 8


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_bias": True}, "use_bias=True is not supported"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings=True is not supported"),
        ({"head_dim": 32}, "head_dim=32 is not supported"),
        ({"num_experts": None}, "has no 'num_experts'"),
    ],
)
def test_unsupported_folders_are_refused_in_one_line(tmp_path, change, message):
  hf = json.loads((FOLDER / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(hf, **change)))
  shutil.copy(FOLDER / "model.safetensors", tmp_path)
  with pytest.raises(CheckpointError, match=message):
    _load(tmp_path)


def test_family_token_ids_outside_a_tiny_vocabulary_are_named(tmp_path):
  from llada_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError, match=r"mask_id=156895 is not allowed.*pass --mask_id"):
    llada2_moe.read_config(FOLDER)


@pytest.mark.parametrize(
    "name, official, moe_layers",
    # The official modeling code's parameter counts (its nn.Module built on the meta device from
    # dFactory's config.json), without the expert_bias buffers, which llada_jax keeps as parameters.
    [("llada2_mini", 16_255_638_528, 19), ("llada2_flash", 102_889_697_280, 31)],
)
def test_configs_have_the_official_parameter_counts(name, official, moe_layers):
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(__file__).parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  shapes = rules.abstract_params(config)
  total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
  assert total == official + moe_layers * 256


def test_from_hf_writes_a_workdir_with_the_given_ids_and_other_folders_refuse_eos_id(tmp_path):
  from llada_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from llada_jax.interop.workdir import from_hf  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top

  count = from_hf(
      str(FOLDER), str(tmp_path / "w"), "float32", GENERATE["mask_id"], GENERATE["eos_id"]
  )
  config, params = load_model(str(tmp_path / "w"))
  assert (config.tokens.mask_id, config.tokens.eos_id) == (GENERATE["mask_id"], GENERATE["eos_id"])
  assert count == sum(x.size for x in jax.tree.leaves(params))
  logits, _ = _forward(config, params, EXPECTED["tokens"])
  assert _relative_error(logits, EXPECTED["logits"]) < 1e-5
  llama = tmp_path / "llama"
  llama.mkdir()
  (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(ConfigError, match=r"--eos_id=3 is not allowed .*\(llada2_moe\) folders"):
    hf_format(str(llama), eos_id=3)


def _official_options(kwargs):
  """Our options for the official `generate`'s keyword arguments. Our steps count over all
  gen_length / block_length blocks, the official per block. The official threshold 0.0 commits
  every masked position whose probability exceeds 0; here τ = 0 turns the threshold off, and any τ
  below 1 / vocab does what the official 0.0 does (an argmax's probability is at least 1 / V)."""
  blocks = kwargs["gen_length"] // kwargs["block_length"]
  return dict(
      gen_length=kwargs["gen_length"],
      steps=kwargs["steps"] * blocks,
      parallel_threshold=kwargs["threshold"] or 1e-6,
      temperature=kwargs["temperature"],
  )


def _answers(config, params, prompts, kwargs, cache="none"):
  """Our answers to prompts (lists of ids, left-padded into one batch), each cut after its first
  EOS as the official `generate` returns it."""
  from llada_jax.sampling.generate import generate  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.diffusion.block_size = kwargs["block_length"]
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), config.tokens.pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for row, p in enumerate(prompts):
    tokens[row, width - len(p) :], mask[row, width - len(p) :] = p, True
  out = np.asarray(
      generate(config, params, tokens, mask, cache=cache, **_official_options(kwargs))
  )[:, width:]
  eos = GENERATE["eos_id"]
  return [row[: list(row).index(eos) + 1] if eos in row else row for row in out.tolist()]


def test_generate_is_the_official_generate_token_for_token(imported):
  """The 18 official `generate` cases (thresholds 0, 0.5, 0.9, 0.95 and 1, 2 to 8 steps a block,
  blocks of 4 and 8, eos_early_stop; 6 end at EOS). Each setting's three prompts (3, 6 and 9
  tokens, so blocks align differently) run in one left-padded batch; the official code ran each
  alone. (The exact cache gives the uncached tokens: test_block.py.)"""
  config, params = imported
  assert config.tokens.eot_id == -1  # LLaDA 2.x ends at EOS only
  settings = {}
  for case in GENERATE["cases"]:
    settings.setdefault(json.dumps(case["kwargs"], sort_keys=True), []).append(case)
  for key, cases in settings.items():
    got = _answers(config, params, [c["prompt"] for c in cases], json.loads(key))
    assert got == [c["output"] for c in cases], key
