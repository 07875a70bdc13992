"""The Monte-Carlo likelihood bound against exact enumeration and the official stratification."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax.diffusion.likelihood import log_likelihood, stratified_lengths
from llada_jax.errors import ConfigError
from llada_jax.model import ModelConfig, Transformer, logits


@pytest.fixture(scope="module")
def model():
  config = make_tiny_config()
  params = Transformer(ModelConfig.from_config(config)).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)
  )
  return config, nn.meta.unbox(params)["params"]


def _official_lengths(k: int, answer_len: int, batch: int) -> np.ndarray:
  """NumPy transcription of the official stratification (torch.round is half-to-even too)."""
  x = np.round(np.linspace(float(k), k + (batch - 1) * (answer_len / batch), batch))
  return ((x.astype(np.int64) - 1) % answer_len) + 1


@pytest.mark.parametrize("answer_len,batch", [(1, 4), (5, 4), (7, 16), (32, 16), (3, 1)])
def test_stratified_lengths_match_official(answer_len, batch):
  for seed in range(5):
    key = jax.random.PRNGKey(seed)
    got = np.asarray(stratified_lengths(key, jnp.int32(answer_len), batch))
    k = int(jax.random.randint(key, (), 1, answer_len + 1))
    np.testing.assert_array_equal(got, _official_lengths(k, answer_len, batch))
    assert got.min() >= 1 and got.max() <= answer_len


def _exact_bound(config, params, prompt, answer) -> float:
  """-E_l E_S [sum_{i in S} CE_i * L / l] by enumerating every masked subset S (small L only)."""
  length, mask_id = len(answer), config.tokens.mask_id
  total = 0.0
  for l in range(1, length + 1):
    subsets = list(itertools.combinations(range(length), l))
    for subset in subsets:
      seq = list(prompt) + [mask_id if i in subset else t for i, t in enumerate(answer)]
      logp = np.asarray(jax.nn.log_softmax(logits(config, params, jnp.asarray([seq]))[0]))
      ce = -sum(logp[len(prompt) + i, answer[i]] for i in subset)
      total += ce * length / l / len(subsets) / length
  return -total


def test_estimate_is_unbiased_and_its_stderr_calibrated(model):
  config, params = model
  prompt, answer = [10, 20, 30], [40, 50, 60]
  exact = _exact_bound(config, params, prompt, answer)
  result = log_likelihood(
      config, params, prompt, answer, mc_num=512, batch_size=16, rng=jax.random.PRNGKey(1)
  )
  assert abs(float(result.log_likelihood) - exact) < 4 * float(result.stderr)
  assert float(result.stderr) < 0.05 * abs(exact)


def test_stderr_shrinks_like_one_over_sqrt_n_and_mean_is_stable(model):
  config, params = model
  prompt, answer = [5, 6, 7, 8], [9, 10, 11, 12, 13, 14]
  copies = 8  # independent estimates of the same pair: a stderr from 4 batch means is noisy alone
  small = log_likelihood(
      config,
      params,
      [prompt] * copies,
      [answer] * copies,
      mc_num=32,
      batch_size=8,
      rng=jax.random.PRNGKey(2),
  )
  large = log_likelihood(
      config,
      params,
      [prompt] * copies,
      [answer] * copies,
      mc_num=512,
      batch_size=8,
      rng=jax.random.PRNGKey(3),
  )
  ratio = float(np.mean(small.stderr)) / float(np.mean(large.stderr))
  assert 2.0 < ratio < 8.0  # sqrt(512 / 32) = 4
  gap = abs(float(np.mean(small.log_likelihood)) - float(np.mean(large.log_likelihood)))
  spread = math.hypot(float(np.mean(small.stderr)), float(np.mean(large.stderr)))
  assert gap < 4 * spread / math.sqrt(copies)
  assert len(set(small.log_likelihood.tolist())) == copies  # every copy drew its own samples


def test_single_token_answers_are_exact_and_independent_of_batching(model):
  config, params = model
  pairs = [([3, 4, 5], [6]), ([7], [8]), ([9, 10, 11, 12, 13], [14])]
  batched = log_likelihood(
      config, params, [p for p, _ in pairs], [a for _, a in pairs], mc_num=1, batch_size=1
  )
  for (prompt, answer), value in zip(pairs, batched.log_likelihood):
    seq = jnp.asarray([prompt + [config.tokens.mask_id]])
    expected = jax.nn.log_softmax(logits(config, params, seq)[0, -1])[answer[0]]
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_cfg_zero_equals_no_guidance_and_positive_cfg_changes_scores(model):
  config, params = model
  args = ([3, 4, 5], [6, 7])
  kwargs = dict(mc_num=16, batch_size=8, rng=jax.random.PRNGKey(4))
  plain = log_likelihood(config, params, *args, **kwargs)
  tiny = log_likelihood(config, params, *args, cfg_scale=1e-7, **kwargs)
  guided = log_likelihood(config, params, *args, cfg_scale=2.0, **kwargs)
  np.testing.assert_allclose(plain.log_likelihood, tiny.log_likelihood, rtol=1e-5)
  assert abs(float(guided.log_likelihood) - float(plain.log_likelihood)) > 1e-4


def test_guided_one_token_estimate_is_minus_the_ce_of_the_guided_logits(model):
  """One-token answers, mc_num=1: the one sample masks the answer, so the estimate is exactly
  log_softmax(u + (w + 1)(c - u))[answer], c the logits at the mask of prompt ++ [MASK] and u those
  with the prompt masked too, here from two plain forward passes combined in NumPy."""
  config, params = model
  mask_id, scale = config.tokens.mask_id, 2.0
  pairs = [([3, 4, 5], [6]), ([7], [8]), ([9, 10, 11, 12, 13], [14])]
  got = log_likelihood(
      config,
      params,
      [p for p, _ in pairs],
      [a for _, a in pairs],
      mc_num=1,
      batch_size=1,
      cfg_scale=scale,
  )
  for (prompt, answer), value in zip(pairs, got.log_likelihood):
    c, u = (
        np.asarray(logits(config, params, jnp.asarray([seq]))[0, -1], np.float64)
        for seq in (prompt + [mask_id], [mask_id] * (len(prompt) + 1))
    )
    guided = u + (scale + 1) * (c - u)
    top = guided.max()
    expected = guided[answer[0]] - top - np.log(np.sum(np.exp(guided - top)))
    np.testing.assert_allclose(value, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(mc_num=10, batch_size=4), "mc_num=10"),
        (dict(cfg_scale=-1.0), "cfg_scale=-1.0"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(model, kwargs, needle):
  config, params = model
  with pytest.raises(ValueError, match=needle):
    log_likelihood(config, params, [1, 2], [3], **kwargs)


def test_out_of_vocabulary_and_empty_answers_are_rejected(model):
  config, params = model
  with pytest.raises(ConfigError, match="token id 999"):
    log_likelihood(config, params, [1, 999], [3], mc_num=1, batch_size=1)
  with pytest.raises(ConfigError, match="answer is empty"):
    log_likelihood(config, params, [[1, 2]], [[]], mc_num=1, batch_size=1)


def test_a_pair_scores_the_same_alone_and_in_any_call(model):
  """Same seed and pair index: the same estimate alone, next to longer pairs, padded wider, and
  with the pairs split over 8 devices (the masks once depended on the call's padded width)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  from llada_jax.diffusion.likelihood import score_pairs  # pylint: disable=g-import-not-at-top
  from llada_jax.keys import item_keys  # pylint: disable=g-import-not-at-top

  config, params = model
  rng = jax.random.PRNGKey(7)
  rows = np.random.default_rng(0)
  prompts = [list(rows.integers(3, 250, n)) for n in (5, 17, 2, 9, 30, 4, 11, 6)]
  answers = [list(rows.integers(3, 250, n)) for n in (7, 21, 3, 12, 2, 8, 5, 9)]
  options = dict(mc_num=8, batch_size=4)
  alone = score_pairs(config, params, prompts[:1], answers[:1], item_keys(rng, [0]), **options)
  together = score_pairs(config, params, prompts, answers, item_keys(rng, 8), width=64, **options)
  order = [3, 0, 5, 1, 7, 2, 6, 4]
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("items",))
  sharded = score_pairs(
      config,
      params,
      [prompts[i] for i in order],
      [answers[i] for i in order],
      item_keys(rng, order),
      sharding=NamedSharding(mesh, PartitionSpec("items")),
      **options,
  )
  np.testing.assert_allclose(together.log_likelihood[0], alone.log_likelihood[0], rtol=1e-5)
  np.testing.assert_allclose(
      sharded.log_likelihood[order.index(0)], alone.log_likelihood[0], rtol=1e-5
  )
  np.testing.assert_allclose(sharded.log_likelihood, together.log_likelihood[order], rtol=1e-5)
  single = log_likelihood(config, params, prompts[0], answers[0], rng=rng, **options)
  np.testing.assert_allclose(single.log_likelihood, alone.log_likelihood[0], rtol=1e-5)
