"""Config schema: defaults validate, every class of bad value fails with a one-line message."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import llada_1b, llada_8b, tiny
from llada_jax import config as config_lib
from llada_jax.errors import ConfigError
from llada_jax.model import ModelConfig, Transformer


@pytest.mark.parametrize("module", [tiny, llada_1b, llada_8b])
def test_shipped_configs_validate(module):
  config_lib.validate(module.get_config())


def test_8b_architecture_matches_the_official_model():
  m = llada_8b.get_config().model
  assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_hidden_size, m.vocab_size) == (
      4096,
      32,
      32,
      32,
      12288,
      126464,
  )
  assert m.rope_theta == 500000.0 and llada_8b.get_config().tokens.mask_id == 126336


def _bad(path: str, value) -> str:
  """Validates the defaults with one value replaced (through JSON, as a stored config would)."""
  section, name = path.split(".")
  with pytest.raises(ConfigError) as err:
    config_lib.from_json(json.dumps({section: {name: value}}))
  message = str(err.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize(
    "path,value,needle",
    [
        ("model.d_model", 0, "model.d_model=0"),
        ("model.n_layers", -2, "model.n_layers=-2"),
        ("model.n_kv_heads", 3, "divisor of model.n_heads"),
        ("tokens.mask_id", 100, "real tokens"),
        ("tokens.mask_id", 260, "mask_id < model.vocab_size=260"),
        ("data.sequence_length", 512, "at most model.max_sequence_length=128"),
        ("sampling.block_length", 48, "divisor of gen_length=112"),
        ("sampling.steps", 6, "multiple of the number of blocks"),
        ("model.dtype", "float8", "one of float32, bfloat16, float16"),
        ("diffusion.eps", 1.5, "0 < eps < 1"),
        ("model.d_model", 256.0, "type int"),
        ("optimizer.decay_fraction", 2.0, "a fraction in [0, 1]"),
        ("mesh.fsdp", 0, "a positive size or -1"),
        ("mesh.dcn_data", 0, "mesh.dcn_data=0"),
        ("data.vocabulary", "bpe", "one of byte, spm8k, llada_hf"),
        ("data.packing", "greedy", "one of chunk, pack"),
        ("data.masking", "host", "one of pipeline, device"),
        ("data.num_shards", 3, "a divisor of data.batch_size=16"),
        ("data.num_shards", 0, "a positive number of shards or -1"),
        ("data.task", "", "the name of a registered task"),
        ("data.batch_size", 0, "data.batch_size=0"),
        ("data.prefetch", -1, "data.prefetch=-1"),
        ("tokens.eos_id", 259, "different from tokens.mask_id=259"),
        ("tokens.pad_id", 999, "an id in [0, model.vocab_size=260)"),
        ("diffusion.objective", "ar", "one of mdm, arm"),
        ("diffusion.random_length_prob", 1.5, "a probability in [0, 1]"),
        ("train.nonfinite", "ignore", "one of skip, rollback"),
        ("train.rollback_lr_factor", 1.0, "0 < factor < 1"),
        ("train.max_rollbacks", -1, "train.max_rollbacks=-1"),
        ("train.num_steps", 0, "train.num_steps=0"),
        ("checkpoint.keep", 0, "checkpoint.keep=0"),
        ("optimizer.b2", 1.0, "0 <= value < 1"),
        ("sampling.remasking", "topk", "one of low_confidence, random, margin, entropy"),
        ("evaluation.mc_num", 20, "a multiple of evaluation.mc_batch_size=16"),
        ("evaluation.limit", 0, "evaluation.limit=0"),
        ("train.profile_steps", "5", '"a:b" with integers 0 <= a < b'),
        ("train.loss_chunk", 48, "0 or a divisor of data.sequence_length=128"),
        ("train.grad_accum_steps", 3, "a divisor of data.batch_size=16"),
        ("train.profile_steps", "7:3", "train.profile_steps='7:3'"),
    ],
)
def test_bad_values_name_field_and_allowed(path, value, needle):
  assert needle in _bad(path, value)


def test_unknown_key_is_named():
  c = config_lib.default_config()
  c.model.n_expert = 4
  with pytest.raises(ConfigError, match="unknown config key 'model.n_expert'"):
    config_lib.validate(c)


def test_json_round_trip_keeps_every_value():
  c = llada_8b.get_config()
  again = config_lib.from_json(config_lib.to_json(c))
  assert again.to_dict() == c.to_dict()


def test_from_json_rejects_unknown_keys():
  with pytest.raises(ConfigError, match="unknown config key 'model.foo'"):
    config_lib.from_json('{"model": {"foo": 1}}')


def _parameter_count(config) -> int:
  model = Transformer(ModelConfig.from_config(config))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_8b_has_exactly_the_official_parameter_count():
  assert _parameter_count(llada_8b.get_config()) == 8_015_581_184


def test_1b_has_the_papers_parameter_counts():
  config = llada_1b.get_config()
  total = _parameter_count(config)
  embedding_and_head = 2 * config.model.vocab_size * config.model.d_model
  assert round(total / 1e9, 2) == 1.49  # paper Table 5
  assert round((total - embedding_and_head) / 1e9, 2) == 0.97


def test_arm_objective_requires_the_causal_model():
  c = tiny.get_config()
  c.diffusion.objective = "arm"
  with pytest.raises(ConfigError, match="model.causal=False"):
    config_lib.validate(c)
  c.model.causal = True
  config_lib.validate(c)


# One source per enumeration: the config's tuple is the list of names; every table that
# implements the names is keyed by exactly that tuple, so a name cannot be accepted by `validate`
# and then be missing where it is used (or implemented but never selectable).
def test_attention_kernels_are_exactly_the_configs_names():
  from llada_jax.model import attention  # pylint: disable=import-outside-toplevel

  assert tuple(attention.KERNELS) == config_lib.ATTENTION_KERNELS
  assert config_lib.ATTENTION_IMPLEMENTATIONS == ("auto",) + config_lib.ATTENTION_KERNELS
  for platform in ("cpu", "gpu", "tpu"):
    for dtype in config_lib.DTYPES:
      assert attention.resolve("auto", dtype, platform, (128, 128)) in attention.KERNELS


def test_objective_losses_are_exactly_the_configs_objectives():
  from llada_jax.diffusion import objectives  # pylint: disable=import-outside-toplevel

  assert tuple(objectives.LOSSES) == tuple(config_lib.OBJECTIVES)


def test_remat_policies_are_exactly_the_configs_names():
  from llada_jax.model import transformer  # pylint: disable=import-outside-toplevel

  assert tuple(transformer.REMAT_POLICIES) == config_lib.REMAT_POLICIES


def test_random_streams_keep_their_numbers():
  """The stream numbers are folded into every key of a run: renumbering changes every result.
  The keys a run uses, against keys.py's rule with the numbers written out: parameters from
  fold_in(PRNGKey(seed), 0), step k of training (evaluation) from
  fold_in(fold_in(PRNGKey(seed), 1 (2)), k)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  from llada_jax.keys import Stream  # pylint: disable=import-outside-toplevel
  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=import-outside-toplevel
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=import-outside-toplevel
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel
  from llada_jax.training.state import create_train_state  # pylint: disable=import-outside-toplevel
  from llada_jax.training.step import step_rng  # pylint: disable=import-outside-toplevel

  assert {s.name: int(s) for s in Stream} == {
      "INIT": 0,
      "TRAIN": 1,
      "EVAL": 2,
      "PREFERENCE": 3,
      "ROLLOUT": 4,
      "MASK_NOISE": 5,
  }
  config = make_tiny_config()
  config.seed = 3
  seed = jax.random.PRNGKey(3)
  for stream, number in ((Stream.TRAIN, 1), (Stream.EVAL, 2)):
    np.testing.assert_array_equal(
        step_rng(config, jnp.int32(5), stream=stream),
        jax.random.fold_in(jax.random.fold_in(seed, number), 5),
    )
  lm = MaskedDiffusionLM(config)
  state, _ = create_train_state(
      config, lm, make_optimizer(config), make_mesh(config, jax.devices()[:1], check_batch=False)
  )
  model = Transformer(ModelConfig.from_config(config))
  want = model.init(jax.random.fold_in(seed, 0), jnp.zeros((1, 8), jnp.int32))["params"]
  jax.tree.map(  # jit and eager initialisers differ in the last bit; another key in every digit
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      jax.device_get(state.params),
      nn.meta.unbox(want),
  )
  pytest.importorskip("tensorflow")
  from llada_jax.data.features import Purpose  # pylint: disable=import-outside-toplevel

  assert [int(p) for p in Purpose] == [0, 1, 2, 3, 4]  # folded as stream * 16 + purpose
