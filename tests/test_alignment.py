"""The shifted logit alignment (Dream, Fast-dLLM v2, MaxText's `shifted`): token i read from the
logits at i - 1 in the loss, the scorers and the samplers of MDM and block models; each against
NumPy from the network's plain logits, and the property it exists for: a block model with B = 1
and the shifted alignment *is* the autoregressive model of the same weights (its loss at t = 1,
its likelihood and its greedy answers)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax.config import validate
from llada_jax.diffusion import alignment
from llada_jax.diffusion.likelihood import log_likelihood
from llada_jax.diffusion.objectives import unpacked_batch
from llada_jax.errors import ConfigError
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.model import ModelConfig, Transformer, logits
from llada_jax.sampling import generate


def _config(objective="mdm", block_size=8, alignment_name="shifted"):
  config = make_tiny_config()
  config.model.init_std = 0.3  # peaked predictions: distinct argmaxes
  config.diffusion.objective = objective
  config.diffusion.block_size = block_size
  config.diffusion.logit_alignment = alignment_name
  return validate(config)


@pytest.fixture(scope="module")
def params():
  config = _config()
  model = Transformer(ModelConfig.from_config(config))
  return nn.meta.unbox(model.init(jax.random.PRNGKey(2), jnp.zeros((1, 8), jnp.int32)))["params"]


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_resolve_and_the_one_line_refusals():
  config = make_tiny_config()
  assert alignment.resolve(config) == "same"  # auto without init_from
  config.train.init_from = "/some/llama"
  assert alignment.resolve(config) == "shifted"  # auto: an AR start
  config.diffusion.logit_alignment = "same"
  assert alignment.resolve(config) == "same"
  arm = make_tiny_config(causal=True)
  arm.diffusion.logit_alignment = "shifted"
  with pytest.raises(ConfigError, match="^diffusion.logit_alignment='shifted' is not allowed"):
    validate(arm)
  config.diffusion.logit_alignment = "left"
  with pytest.raises(ConfigError, match="^diffusion.logit_alignment='left' is not allowed: "):
    validate(config)


def test_shift_reads_the_predecessor_and_keeps_sequence_starts():
  values = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6)[..., None]
  # row 0: left padding of two, then four tokens; row 1: two packed documents (positions reset).
  positions = jnp.asarray([[0, 0, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2]])
  got = np.asarray(alignment.shift(values, positions))[..., 0]
  np.testing.assert_array_equal(got, [[0, 1, 2, 2, 3, 4], [6, 6, 7, 9, 9, 10]])
  first = jnp.asarray([[-1.0], [-2.0]])
  got = np.asarray(alignment.shift(values, positions + 1, first))[..., 0]
  np.testing.assert_array_equal(got, [[-1, 0, 1, 2, 3, 4], [-2, 6, 7, 8, 9, 10]])


def test_mdm_loss_reads_each_masked_token_from_its_predecessor(params):
  """The 1/p-weighted masked CE with every token read from the logits one position to its left
  (its own at a sequence start), on a batch with fixed masks, per row."""
  config = _config()
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 2, 250, jnp.int32)
  masked = jax.random.bernoulli(jax.random.PRNGKey(4), 0.5, tokens.shape).at[:, 0].set(True)
  p_mask = jnp.asarray([0.5, 0.8])
  batch = unpacked_batch(tokens)
  batch.update(
      inputs=jnp.where(masked, config.tokens.mask_id, tokens), masked=masked, p_mask=p_mask
  )
  per_row, _ = MaskedDiffusionLM(config).loss(
      params, batch, jax.random.PRNGKey(0), reduction="sequence"
  )
  raw = np.asarray(logits(config, params, batch["inputs"]))
  reader = np.concatenate([raw[:, :1], raw[:, :-1]], 1)  # position 0 keeps its own
  logp = np.take_along_axis(_np_log_softmax(reader), np.asarray(tokens)[..., None], -1)[..., 0]
  want = -(np.where(masked, logp, 0.0) / np.asarray(p_mask)[:, None]).sum(-1) / 32
  np.testing.assert_allclose(per_row, want, rtol=2e-5)
  same, _ = MaskedDiffusionLM(_config(alignment_name="same")).loss(
      params, batch, jax.random.PRNGKey(0), reduction="sequence"
  )
  assert np.abs(np.asarray(same) - want).max() > 0.1


def _causal_logp(params, config, tokens):
  """log p(x_i | x_<i) [rows, L - 1] of the same weights run as a causal network (NumPy
  log-softmax of its logits)."""
  causal = dataclasses.replace(ModelConfig.from_config(config), causal=True)
  out = jax.jit(Transformer(causal).apply)({"params": params}, tokens)
  logp = _np_log_softmax(out[:, :-1])
  return np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]


def test_block_size_one_shifted_at_t_one_is_the_autoregressive_loss(params):
  """B = 1, every token masked, p = 1, shifted: token i > 0 is read from the clean copy of token
  i - 1, which sees the clean tokens before it only: the causal network's next-token CE; token 0
  from its own (masked) position. So an AR model's weights start block training at their AR
  loss."""
  config = _config("block", block_size=1)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 2, 250, jnp.int32)
  batch = unpacked_batch(tokens)
  batch.update(
      inputs=jnp.full(tokens.shape, config.tokens.mask_id),
      masked=jnp.ones(tokens.shape, bool),
      p_mask=jnp.ones(tokens.shape),
  )
  per_row, _ = MaskedDiffusionLM(config).loss(
      params, batch, jax.random.PRNGKey(0), reduction="sequence"
  )
  first = np.asarray(logits(config, params, jnp.full((2, 1), config.tokens.mask_id)))[:, 0]
  first_logp = np.take_along_axis(_np_log_softmax(first), np.asarray(tokens)[:, :1], -1)[:, 0]
  want = -(first_logp + _causal_logp(params, config, tokens).sum(-1)) / 32
  np.testing.assert_allclose(per_row, want, rtol=2e-5)


def test_block_size_one_shifted_likelihood_is_the_causal_chain_rule(params):
  config = _config("block", block_size=1)
  prompt, answer = [5, 6, 7, 8], [40, 41, 42, 43, 44]
  got = log_likelihood(config, params, prompt, answer, mc_num=2, batch_size=2)
  want = _causal_logp(params, config, jnp.asarray([prompt + answer]))[0, len(prompt) - 1 :].sum()
  np.testing.assert_allclose(got.log_likelihood, want, rtol=2e-5)
  assert float(got.stderr) == 0.0  # B = 1: every sample is the same exact chain rule
  one = log_likelihood(config, params, prompt, answer, mc_num=1, batch_size=1)
  np.testing.assert_allclose(one.log_likelihood, want, rtol=2e-5)
  assert float(one.stderr) == 0.0


def test_mdm_one_token_likelihood_reads_the_prompts_last_logits(params):
  config = _config()
  prompt, answer = [5, 6, 7, 8], [40]
  got = log_likelihood(config, params, prompt, answer, mc_num=1, batch_size=1)
  raw = np.asarray(logits(config, params, jnp.asarray([prompt + [config.tokens.mask_id]])))
  np.testing.assert_allclose(got.log_likelihood, _np_log_softmax(raw[0, 3])[40], rtol=2e-5)


def _shifted_greedy_by_hand(config, params, prompt, gen_length):
  """One token a step, left to right (block_length 1): position p filled with the argmax of the
  full bidirectional pass's logits at p - 1."""
  x = list(prompt) + [config.tokens.mask_id] * gen_length
  for p in range(len(prompt), len(x)):
    raw = np.asarray(logits(config, params, jnp.asarray([x])))[0]
    x[p] = int(raw[p - 1].argmax())
  return x[len(prompt) :]


def test_mdm_sampler_fills_each_position_from_its_predecessor(params):
  config = _config()
  prompt = [5, 6, 7, 8]
  want = _shifted_greedy_by_hand(config, params, prompt, 8)
  kwargs = dict(gen_length=8, steps=8, block_length=1)
  for cache in ("none", "prefix", "dual"):
    refresh = 0 if cache == "none" else 1
    got = np.asarray(
        generate(config, params, np.asarray([prompt]), cache=cache, cache_refresh=refresh, **kwargs)
    )
    assert got[0, 4:].tolist() == want, cache


def test_block_size_one_shifted_greedy_answers_are_causal_argmax_decoding(params):
  """A block model with B = 1 and the shifted alignment samples as the AR model of its weights,
  with and without its exact cache."""
  config = _config("block", block_size=1)
  causal = Transformer(dataclasses.replace(ModelConfig.from_config(config), causal=True))
  prompt = [5, 6, 7, 8]
  x = list(prompt)
  apply = jax.jit(causal.apply)  # one program per length, not one per operation
  for _ in range(8):
    x.append(int(np.asarray(apply({"params": params}, jnp.asarray([x])))[0, -1].argmax()))
  for cache in ("none", "prefix"):
    got = np.asarray(
        generate(config, params, np.asarray([prompt]), gen_length=8, steps=8, cache=cache)
    )
    assert got[0, 4:].tolist() == x[4:], cache


def test_a_run_stores_the_concrete_alignment_and_a_resume_keeps_it(tmp_path):
  """ "auto" is resolved once per run: a causal checkpoint resumed as a diffusion model (the
  route from an imported Llama) trains shifted; a resumed run keeps its checkpoint's alignment,
  whatever "auto" would say of the new config alone."""
  from conftest import write_workdir  # pylint: disable=import-outside-toplevel
  from llada_jax.training.loop import _config_of_run  # pylint: disable=import-outside-toplevel

  arm = write_workdir(tmp_path / "arm", make_tiny_config(causal=True))
  mdm = make_tiny_config()
  assert mdm.diffusion.logit_alignment == "auto"
  assert _config_of_run(mdm, arm).diffusion.logit_alignment == "shifted"
  shifted = write_workdir(tmp_path / "shifted", _config())
  assert _config_of_run(mdm, shifted).diffusion.logit_alignment == "shifted"
  assert _config_of_run(mdm, tmp_path / "new").diffusion.logit_alignment == "same"
  explicit = make_tiny_config()
  explicit.diffusion.logit_alignment = "same"
  assert _config_of_run(explicit, shifted).diffusion.logit_alignment == "same"


def test_the_trainer_refuses_a_shifted_arm_before_resolving_it(tmp_path):
  from llada_jax.training.loop import train  # pylint: disable=import-outside-toplevel

  arm = make_tiny_config(causal=True)
  arm.diffusion.logit_alignment = "shifted"
  with pytest.raises(ConfigError, match="^diffusion.logit_alignment='shifted' is not allowed"):
    train(arm, tmp_path / "arm")
  assert not (tmp_path / "arm").exists()
