"""Block diffusion (BD3-LM): its attention pattern, loss, sampler and likelihood.

The references are independent of `llada_jax.model.masks`: the pattern against BD3-LM's rule
written out per query/key pair, B = 1 against the autoregressive chain rule computed with the
plain causal network one token at a time, B = L against the LLaDA loss on the same batch.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.config import block_size_at, block_size_schedule, block_sizes, validate
from llada_jax.diffusion.likelihood import score_pairs
from llada_jax.diffusion.objectives import unpacked_batch
from llada_jax.errors import ConfigError
from llada_jax.keys import item_keys
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.model import ModelConfig, Transformer
from llada_jax.model.attention import attention
from llada_jax.model.masks import BlockCausal
from tests.conftest import make_tiny_config


def block_config(block_size=8, **sampling):
  c = make_tiny_config()
  c.diffusion.update(dict(objective="block", block_size=block_size))
  gen_length = max(16, block_size)
  c.sampling.update(
      dict(dict(block_length=block_size, gen_length=gen_length, steps=gen_length), **sampling)
  )
  return validate(c)


@pytest.fixture(scope="module")
def params():
  config = make_tiny_config()
  model = Transformer(ModelConfig.from_config(config))
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]


def _bd3lm_rule(q, k, length, size, two_stream):
  """BD3-LM's attention (arXiv 2503.09573, Sec. 3.2) for one query/key pair, case by case."""
  q_clean, k_clean = (q >= length, k >= length) if two_stream else (True, True)
  q_block = (q % length) // size
  k_block = (k % length) // size
  if not two_stream:
    return k_block <= q_block
  if not q_clean and not k_clean:  # noisy to noisy: the same block only (block diagonal)
    return q_block == k_block
  if not q_clean and k_clean:  # noisy to clean: earlier blocks only (offset block-causal)
    return k_block < q_block
  if q_clean and k_clean:  # clean to clean: block-causal
    return k_block <= q_block
  return False  # clean to noisy: never


@pytest.mark.parametrize(
    "length, size, two_stream",
    [(12, 4, True), (12, 3, True), (10, 4, False), (9, 1, False), (8, 8, True)],
)
def test_pattern_is_bd3lm_rule(length, size, two_stream):
  n = 2 * length if two_stream else length
  want = np.array(
      [[_bd3lm_rule(q, k, length, size, two_stream) for k in range(n)] for q in range(n)]
  )
  np.testing.assert_array_equal(BlockCausal(size, two_stream).dense(n, n), want)


def test_block_size_one_is_causal_and_a_whole_sequence_is_bidirectional():
  np.testing.assert_array_equal(BlockCausal(1).dense(7, 7), np.tril(np.ones((7, 7), bool)))
  assert BlockCausal(16).dense(16, 16).all()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("implementation", ["jax_nn", "splash"])
def test_kernels_apply_the_pattern_as_xla_does(implementation, packed):
  """A two-stream pattern with padding keys, through jax_nn (the cuDNN code path) and splash
  (interpreted off TPU), against the XLA kernel that materialises the mask; packed: with the
  segment ids of two documents (document-level attention) combined with the pattern."""
  length = 128 if implementation == "splash" else 24
  size = 16 if implementation == "splash" else 4
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (2, 2 * length, 4, 16))
  k, v = (jax.random.normal(key, (2, 2 * length, 2, 16)) for key in keys[1:])
  key_mask = jnp.ones((2, 2 * length), bool).at[1, length - 5 : length].set(False)
  segments = None
  if packed:  # a second document from the third block on, in both streams
    one = jnp.where(jnp.arange(length) < 2 * size, 1, 2)
    segments = jnp.broadcast_to(jnp.concatenate([one, one]), (2, 2 * length))
  pattern = BlockCausal(size, two_stream=True)
  options = dict(causal=False, key_mask=key_mask, pattern=pattern, segment_ids=segments)
  want = attention(q, k, v, **options)
  got = attention(q, k, v, **options, implementation=implementation)
  real = np.asarray(key_mask)  # outputs at padding positions are unspecified (no key reads them)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)
  others = [dict(options, pattern=None)] + [dict(options, segment_ids=None)] * packed
  for other in others:
    assert not np.allclose(attention(q, k, v, **other), want, atol=1e-3)


def _tokens(config, rows=3, seed=1):
  return jax.random.randint(
      jax.random.PRNGKey(seed), (rows, config.data.sequence_length), 2, 250, jnp.int32
  )


def test_block_size_of_the_whole_sequence_is_the_llada_loss_on_the_same_batch(params):
  config = block_config(block_size=32)
  mdm = make_tiny_config()
  batch = unpacked_batch(_tokens(config))
  rng = jax.random.PRNGKey(7)
  block, _ = MaskedDiffusionLM(config).loss(params, batch, rng, random_length_prob=0.0)
  llada, _ = MaskedDiffusionLM(mdm).loss(params, batch, rng, random_length_prob=0.0)
  np.testing.assert_allclose(block, llada, rtol=2e-6)


def _chain_rule_logp(config, params, tokens):
  """log p(x_i | x_<i) [rows, L]: the plain causal network (no block pattern) read at position i
  of the row with x_i replaced by the mask token (a causal network's output at i depends on
  positions <= i only), every i in one batch."""
  causal = Transformer(dataclasses.replace(ModelConfig.from_config(config), causal=True))
  rows, length = tokens.shape
  eye = jnp.eye(length, dtype=bool)
  inputs = jnp.where(eye[None], config.tokens.mask_id, tokens[:, None, :])  # [rows, i, L]
  logits = jax.jit(causal.apply)({"params": params}, inputs.reshape(rows * length, length))
  logits = logits.reshape(rows, length, length, -1)[:, jnp.arange(length), jnp.arange(length)]
  return np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0])


def test_block_size_one_with_every_token_masked_is_the_autoregressive_chain_rule(params):
  """B = 1, t = 1 (every token masked, p = 1): the NELBO is the exact AR negative log-likelihood,
  per row and for the batch."""
  config = block_config(block_size=1)
  tokens = _tokens(config, rows=2)
  batch = unpacked_batch(tokens)
  batch.update(
      inputs=jnp.full(tokens.shape, config.tokens.mask_id),
      masked=jnp.ones(tokens.shape, bool),
      p_mask=jnp.ones(tokens.shape),
  )
  lm = MaskedDiffusionLM(config)
  per_row, _ = lm.loss(params, batch, jax.random.PRNGKey(0), reduction="sequence")
  want = -_chain_rule_logp(config, params, tokens).mean(-1)
  np.testing.assert_allclose(per_row, want, rtol=2e-5)
  np.testing.assert_allclose(lm.loss(params, batch, jax.random.PRNGKey(0))[0], want.mean(), 2e-5)


def _fixed_noise(config, tokens, p_block):
  """A noised batch with fixed masks: p_block [rows, blocks] is each block's own p (one per block
  of diffusion.block_size), and every block masks a fixed, non-empty set of its tokens."""
  rows, length = tokens.shape
  position = np.arange(length)[None, :] + 3 * np.arange(rows)[:, None]
  masked = (position * 5) % 7 < 3  # 3 of every 7 positions: 3 or 4 per block of 8
  inputs = np.where(masked, config.tokens.mask_id, np.asarray(tokens))
  size = length // p_block.shape[1]
  batch = unpacked_batch(tokens)
  batch.update(
      inputs=jnp.asarray(inputs, jnp.int32),
      masked=jnp.asarray(masked),
      p_mask=jnp.asarray(np.repeat(p_block, size, axis=1), jnp.float32),
  )
  return batch


def _block_nelbo_by_hand(config, params, batch, block_size):
  """BD3-LM's NELBO per row (nats per token) without the two-stream pass: block b is read from the
  plain network on the clean row with block b noised, under the one-stream block-causal pattern
  (a clean block sees the clean blocks up to itself, block b those before it and itself, and no
  block sees a later one); its masked tokens' cross-entropies are divided by its own p and the
  row's sum by the row's length. Every (row, block) is one row of one forward pass."""
  model = Transformer(
      dataclasses.replace(ModelConfig.from_config(config), pattern=BlockCausal(block_size))
  )
  tokens, inputs = np.asarray(batch["targets"]), np.asarray(batch["inputs"])
  masked, p_mask = np.asarray(batch["masked"]), np.asarray(batch["p_mask"], np.float64)
  rows, length = tokens.shape
  blocks = np.arange(length) // block_size
  noised = np.arange(length // block_size)[:, None] == blocks[None, :]  # [block, position]
  windows = np.where(noised[None], inputs[:, None], tokens[:, None])  # [row, block, L]
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray(windows.reshape(-1, length)))
  logp = np.asarray(jax.nn.log_softmax(logits)).reshape(rows, -1, length, logits.shape[-1])
  logp = logp[:, blocks, np.arange(length)]  # [row, L, V]: each position from its block's pass
  ce = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0].astype(np.float64)
  for start in range(0, length, block_size):  # one p per block
    assert np.all(p_mask[:, start : start + block_size] == p_mask[:, start, None])
  return np.where(masked, ce / p_mask, 0.0).sum(-1) / length


def test_each_block_is_weighted_by_its_own_masking_rate(params):
  """Fixed masks and four different p per row (B = 8, L = 32): the loss is the NELBO by hand,
  each block's masked cross-entropies divided by that block's p (BD3-LM Eq. 8). B = L and p = 1
  cannot tell one p per block from one p per row."""
  config = block_config(block_size=8)
  tokens = _tokens(config, rows=2)
  p_block = np.array([[0.2, 0.45, 0.7, 0.95], [0.9, 0.3, 0.6, 0.15]])
  batch = _fixed_noise(config, tokens, p_block)
  want = _block_nelbo_by_hand(config, params, batch, 8)
  lm = MaskedDiffusionLM(config)
  per_row, _ = lm.loss(params, batch, jax.random.PRNGKey(0), reduction="sequence")
  np.testing.assert_allclose(per_row, want, rtol=2e-5)
  np.testing.assert_allclose(lm.loss(params, batch, jax.random.PRNGKey(0))[0], want.mean(), 2e-5)


def test_one_time_per_block_from_the_clipped_schedule():
  from llada_jax.diffusion.masking import forward_process  # pylint: disable=import-outside-toplevel

  tokens = jnp.zeros((64, 32), jnp.int32)
  noised = forward_process(
      jax.random.PRNGKey(0), tokens, mask_id=9, eps=1e-3, block_size=8, t_range=(0.3, 0.8)
  )
  p = np.asarray(noised.p_mask)
  assert p.shape == (64, 32)
  np.testing.assert_array_equal(p.reshape(64, 4, 8), np.repeat(p[:, ::8, None], 8, axis=2))
  assert p.min() >= 0.3 * 0.999 + 1e-3 - 1e-6 and p.max() <= 0.8 * 0.999 + 1e-3 + 1e-6
  assert len(np.unique(p[:, ::8])) > 200  # every block its own draw
  rate = np.asarray(noised.masked).mean()
  assert abs(rate - p.mean()) < 0.02


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(block_size=5), "diffusion.block_size=5"),
        (dict(block_size_schedule="0:4,10"), "diffusion.block_size_schedule"),
        (dict(block_size_schedule="3:4,10:8"), "increasing steps from 0"),
        (dict(block_size_schedule="0:4,10:16"), "ending at diffusion.block_size=8"),
        (dict(t_min=0.5, t_max=0.5), "0 <= t_min < t_max <= 1"),
    ],
)
def test_bad_block_settings_are_one_line_errors(overrides, needle):
  c = block_config()
  c.diffusion.update(overrides)
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
    validate(c)


@pytest.mark.parametrize(
    "overrides", [dict(t_min=0.2), dict(block_size_schedule="0:4,10:16")], ids=["clip", "schedule"]
)
def test_block_only_settings_are_refused_for_llada(overrides):
  c = make_tiny_config()
  c.diffusion.update(overrides)
  with pytest.raises(ConfigError, match="unless diffusion.objective"):
    validate(c)


def test_block_size_schedule():
  c = block_config()
  c.diffusion.block_size_schedule = "0:1,100:4,200:32,300:8"
  assert [block_size_at(c, s) for s in (0, 99, 100, 250, 10**6)] == [1, 1, 4, 32, 8]
  assert block_sizes(c) == (1, 4, 32, 8)
  c.diffusion.block_size_schedule = "0:1, 10:4,20:L,30:4 ,40:8"  # warm-up, MDM phase, decay
  assert block_size_schedule(c) == ((0, 1), (10, 4), (20, 32), (30, 4), (40, 8))
  validate(c)
  for bad in ("0:1,10:M", "0:1,10", "0:1,,10:4", "0:L:4", "5:4,10:8"):
    c.diffusion.block_size_schedule = bad
    with pytest.raises(ConfigError, match="SIZE a number or L"):
      block_size_schedule(c)


def _prompts():
  prompt = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (3, 7), 3, 250))
  mask = np.ones(prompt.shape, bool)
  mask[1, :3] = False
  return prompt, mask


SAMPLER_CASES = [
    dict(),
    dict(temperature=1.0),
    dict(cfg_scale=1.5),
    dict(parallel_threshold=0.2),
    dict(remasking="random", temperature=1.0),
]


@pytest.mark.parametrize("options", SAMPLER_CASES)
def test_exact_cache_gives_the_uncached_tokens(params, options):
  config = block_config(steps=8, gen_length=16)
  prompt, mask = _prompts()
  lm = MaskedDiffusionLM(config)
  uncached = np.asarray(lm.generate(params, prompt, mask, **options))
  cached = np.asarray(lm.generate(params, prompt, mask, cache="prefix", **options))
  np.testing.assert_array_equal(cached, uncached)
  assert (uncached[:, 7:] != config.tokens.mask_id).all()


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_a_block_answer_is_the_same_alone_and_in_a_batch(params, cache):
  config = block_config(steps=8, gen_length=16, temperature=1.0)
  prompt, mask = _prompts()
  rng = item_keys(jax.random.PRNGKey(5), 3)
  lm = MaskedDiffusionLM(config)
  together = np.asarray(lm.generate(params, prompt, mask, rng=rng, cache=cache))
  alone = np.asarray(lm.generate(params, prompt[1:2, 3:], rng=rng[1:2], cache=cache))
  np.testing.assert_array_equal(together[1, 3:], alone[0])


def test_earlier_blocks_do_not_see_later_ones(params):
  """Generating more blocks leaves the first ones unchanged (nothing attends forward)."""
  prompt, mask = _prompts()
  short = MaskedDiffusionLM(block_config(steps=8, gen_length=16))
  long = MaskedDiffusionLM(block_config(steps=16, gen_length=32))
  first = np.asarray(short.generate(params, prompt, mask))
  more = np.asarray(long.generate(params, prompt, mask))
  np.testing.assert_array_equal(more[:, :23], first)


def test_generation_stops_after_the_block_that_commits_eos(params):
  """With the first answer token of row 0 as EOS, row 0 stops after its first block, [0, 8): its
  7-token prompt and that one answer token (blocks are aligned at the prompt's start), and the
  rest is EOS; the other rows and row 0's first block are what they are without the stop."""
  config = block_config(steps=16, gen_length=32)
  prompt, mask = _prompts()
  free = np.asarray(MaskedDiffusionLM(config).generate(params, prompt, mask))
  config.tokens.eos_id = int(free[0, 7])
  assert (free[0, 8:] != config.tokens.eos_id).any()
  stopped = np.asarray(MaskedDiffusionLM(config).generate(params, prompt, mask))
  np.testing.assert_array_equal(stopped[0, :8], free[0, :8])
  assert (stopped[0, 8:] == config.tokens.eos_id).all()
  others = ~np.isin(free[1:, 7:], config.tokens.eos_id).any(axis=1)
  np.testing.assert_array_equal(stopped[1:][others], free[1:][others])


def test_llada_early_stop_is_opt_in(params):
  config = make_tiny_config()
  config.sampling.update(dict(steps=16, gen_length=32, block_length=8))
  prompt, mask = _prompts()
  lm = MaskedDiffusionLM(config)
  free = np.asarray(lm.generate(params, prompt, mask))
  config.tokens.eos_id = int(free[0, 7])
  lm = MaskedDiffusionLM(config)
  assert not (np.asarray(lm.generate(params, prompt, mask))[0, 15:] == config.tokens.eos_id).all()
  stopped = np.asarray(lm.generate(params, prompt, mask, early_stop=True))
  np.testing.assert_array_equal(stopped[0, :15], free[0, :15])
  assert (stopped[0, 15:] == config.tokens.eos_id).all()


@pytest.mark.parametrize(
    "options, needle",
    [
        (dict(block_length=4), "block_length=4 is not allowed for a block diffusion model"),
        (dict(gen_length=12, steps=12), "gen_length=12 is not allowed for a block diffusion"),
        (dict(cache="dual"), "cache='dual'"),
        (dict(cache="prefix", cache_refresh=2), "cache_refresh=2"),
    ],
)
def test_sampler_options_a_block_model_cannot_use(params, options, needle):
  lm = MaskedDiffusionLM(block_config(steps=8, gen_length=16))
  with pytest.raises(ConfigError, match=needle):
    lm.generate(params, _prompts()[0], **options)


def test_block_one_likelihood_is_exact_and_block_likelihood_is_alone_as_batched(params):
  config = block_config(block_size=1)
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [4] * 20]
  answers = [[20, 21, 22, 23, 24, 25], [30, 31], [40, 41, 42]]
  keys = item_keys(jax.random.PRNGKey(0), 3)
  got = score_pairs(config, params, prompts, answers, keys, mc_num=4, batch_size=2)
  for row, (p, a) in enumerate(zip(prompts, answers)):
    want = _chain_rule_logp(config, params, jnp.asarray([p + a]))[0, len(p) :].sum()
    np.testing.assert_allclose(got.log_likelihood[row], want, rtol=2e-5)
  np.testing.assert_array_equal(got.stderr, 0.0)

  config = block_config(block_size=4)

  def score(pairs, width=None):  # guided: both passes of the scorer
    return score_pairs(
        config,
        params,
        [prompts[i] for i in pairs],
        [answers[i] for i in pairs],
        keys[np.asarray(pairs)],
        mc_num=8,
        batch_size=4,
        cfg_scale=1.0,
        width=width,
    ).log_likelihood

  together = score([0, 1, 2])
  alone = [score([i], width=38)[0] for i in range(3)]
  np.testing.assert_allclose(together, alone, rtol=1e-5)
  np.testing.assert_allclose(score([2, 0, 1], width=64), np.roll(alone, 1), rtol=1e-5)


def test_block_likelihood_is_unbiased_for_the_nelbo(params):
  """The mean of many estimates of one pair approaches the mean of the bound computed by the
  loss with every block's t drawn: both estimate the same NELBO (B = 4, answer of 8 tokens)."""
  config = block_config(block_size=4)
  config.data.sequence_length = 8
  answer = [20, 21, 22, 23, 24, 25, 26, 27]
  estimate = score_pairs(
      config, params, [[]], [answer], item_keys(jax.random.PRNGKey(1), 1), mc_num=512, batch_size=64
  )
  tokens = jnp.asarray([answer] * 1024)
  lm = MaskedDiffusionLM(config)
  bound, _ = lm.loss(
      params, unpacked_batch(tokens), jax.random.PRNGKey(2), reduction="sequence", exact=True
  )
  want = -float(np.mean(bound)) * len(answer)
  spread = float(np.std(bound)) * len(answer) / np.sqrt(1024)
  assert abs(estimate.log_likelihood[0] - want) < 4 * (estimate.stderr[0] + spread)


def _block_nelbo_by_enumeration(config, params, prompt, answer, size):
  """-NELBO of answer given prompt with blocks of `size` aligned at the prompt's first token, by
  enumeration (BD3-LM Eq. 8 in LLaDA's form): for block b with n_b answer tokens, the mean over
  l in 1..n_b of n_b / l times the mean over the l-subsets S of its answer tokens of the CE of S,
  each read from the plain bidirectional network (no block pattern) on the sequence cut at the
  block's end with S masked: what block b sees."""
  import itertools  # pylint: disable=import-outside-toplevel

  model = Transformer(ModelConfig.from_config(config))
  tokens = list(prompt) + list(answer)
  total = 0.0
  for start in range(0, len(tokens), size):
    end = min(start + size, len(tokens))
    mine = [i for i in range(start, end) if i >= len(prompt)]
    if not mine:
      continue
    n = len(mine)
    subsets = [s for l in range(1, n + 1) for s in itertools.combinations(mine, l)]
    rows = np.asarray([tokens[:end]] * len(subsets))
    for row, subset in enumerate(subsets):
      rows[row, list(subset)] = config.tokens.mask_id
    logp = jax.nn.log_softmax(jax.jit(model.apply)({"params": params}, jnp.asarray(rows)), axis=-1)
    for row, subset in enumerate(subsets):
      ce = -sum(float(logp[row, i, tokens[i]]) for i in subset)
      l = len(subset)
      total += ce * (n / l) / n / math.comb(n, l)
  return -total


def test_block_likelihood_aligns_blocks_at_the_prompts_start_as_training_does(params):
  """A 3-token prompt, B = 4: the prompt's block also holds the answer's first token. The
  scorer's estimate agrees with the NELBO by enumeration under that alignment, on a network whose
  predictions depend strongly on their context (weights x 4)."""
  config = block_config(block_size=4)
  sharp = jax.tree.map(lambda w: w * 4.0, params)
  prompt, answer = [5, 6, 7], [20, 21, 22, 23, 24, 25, 26]
  want = _block_nelbo_by_enumeration(config, sharp, prompt, answer, 4)
  got = score_pairs(
      config,
      sharp,
      [prompt],
      [answer],
      item_keys(jax.random.PRNGKey(1), 1),
      mc_num=256,
      batch_size=64,
  )
  assert abs(got.log_likelihood[0] - want) < 4 * got.stderr[0], (got, want)


def test_arm_likelihood_is_the_exact_chain_rule(params):
  config = make_tiny_config(causal=True)
  prompts, answers = [[5, 6, 7], [9]], [[20, 21, 22], [30, 31, 32, 33]]
  got = score_pairs(
      config, params, prompts, answers, item_keys(jax.random.PRNGKey(0), 2), mc_num=4, batch_size=2
  )
  causal = Transformer(ModelConfig.from_config(config))
  for row, (p, a) in enumerate(zip(prompts, answers)):
    tokens = jnp.asarray([p + a])
    # A causal model never predicts the mask token: it is left out of the softmax.
    raw = (
        jax.jit(causal.apply)({"params": params}, tokens)[0]
        .at[:, config.tokens.mask_id]
        .set(-jnp.inf)
    )
    logp = jax.nn.log_softmax(raw)
    want = sum(float(logp[i - 1, tokens[0, i]]) for i in range(len(p), len(p) + len(a)))
    np.testing.assert_allclose(got.log_likelihood[row], want, rtol=1e-5)
  from llada_jax.diffusion.likelihood import check_pairs  # pylint: disable=import-outside-toplevel

  with pytest.raises(ConfigError, match="cfg_scale=1.0 is not allowed for an autoregressive"):
    check_pairs(config, prompts, answers, 4, 2, 1.0)
  with pytest.raises(ConfigError, match="empty prompt"):
    check_pairs(config, [[]], [[3]], 4, 2, 0.0)


def test_the_train_step_uses_the_block_size_of_its_schedule():
  """Steps 0-1 train with B = 1, steps from 2 on with B = 8: the step's loss is the NELBO by hand
  at that size, on the step's parameters and one batch with fixed masks and one p per block of 8
  (so one per block of 1 too)."""
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=import-outside-toplevel
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel
  from llada_jax.training.state import create_train_state  # pylint: disable=import-outside-toplevel
  from llada_jax.training.step import make_train_step  # pylint: disable=import-outside-toplevel

  config = block_config()
  config.diffusion.block_size_schedule = "0:1,2:8"
  config.data.batch_size = 2
  validate(config)
  lm, tx = MaskedDiffusionLM(config), make_optimizer(config)
  mesh = make_mesh(config, jax.devices()[:1], check_batch=False)
  state, shardings = create_train_state(config, lm, tx, mesh)
  step = make_train_step(config, lm, tx, mesh, shardings)
  batch = _fixed_noise(config, _tokens(config, rows=2), np.array([[0.2, 0.45, 0.7, 0.95]] * 2))
  for at, size in ((0, 1), (3, 8)):
    params = jax.device_get(state.params)
    want = {b: float(_block_nelbo_by_hand(config, params, batch, b).mean()) for b in (1, 8)}
    state, metrics = step(state, batch, at)
    assert float(metrics["loss"]) == pytest.approx(want[size], rel=1e-5)
    assert want[1] != pytest.approx(want[8], rel=1e-3)


def test_a_new_objective_is_one_entry_in_each_table(params, monkeypatch):
  """An objective registered under a new name with block diffusion's traits and loss trains,
  samples, scores and counts FLOPs exactly as "block" does: no module decides by the name."""
  from llada_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from llada_jax.diffusion import objectives  # pylint: disable=import-outside-toplevel
  from llada_jax.training.flops import model_flops_per_token  # pylint: disable=import-outside-toplevel

  monkeypatch.setitem(config_lib.OBJECTIVES, "blocks2", config_lib.OBJECTIVES["block"])
  monkeypatch.setitem(objectives.LOSSES, "blocks2", objectives.LOSSES["block"])
  block = block_config(block_size=4, steps=8, gen_length=16)
  twin = validate(ml_collections.ConfigDict(block.to_dict()))
  twin.diffusion.objective = "blocks2"
  twin = validate(twin)
  batch, rng = unpacked_batch(_tokens(block)), jax.random.PRNGKey(7)
  prompt, mask = _prompts()
  prompts, answers = [[5, 6, 7], [9, 10, 11, 12, 13]], [[20, 21, 22, 23, 24, 25], [30, 31]]
  keys = item_keys(jax.random.PRNGKey(0), 2)
  got = []
  for config in (block, twin):
    lm = MaskedDiffusionLM(config)
    got.append(
        (
            lm.loss(params, batch, rng, random_length_prob=0.0)[0],
            np.asarray(lm.generate(params, prompt, mask)),
            score_pairs(config, params, prompts, answers, keys, mc_num=4, batch_size=2),
            model_flops_per_token(config),
        )
    )
  (loss, tokens, scores, flops), (loss2, tokens2, scores2, flops2) = got
  np.testing.assert_array_equal(loss2, loss)
  np.testing.assert_array_equal(tokens2, tokens)
  np.testing.assert_array_equal(scores2.log_likelihood, scores.log_likelihood)
  assert flops2 == flops


def test_packed_documents_at_block_boundaries_train_as_each_document_alone(params):
  """Document-level attention under packing: two documents packed at multiples of the block size
  (segment ids, positions restarting, the gaps padding) get, through the two-stream pass, the
  cross-entropy each has alone in its own padded row, with the same masks."""
  config = block_config(block_size=4)
  lm = MaskedDiffusionLM(config)
  length, mask_id = config.data.sequence_length, config.tokens.mask_id
  docs = [np.arange(10) + 20, np.arange(7) + 60]
  starts = [0, 12]  # 10 tokens, a gap of 2 to the next multiple of 4, 7 tokens, padding
  rng = np.random.RandomState(0)

  def row(placed):
    targets, segments, positions = (np.zeros(length, np.int32) for _ in range(3))
    for number, (start, doc) in enumerate(placed, 1):
      targets[start : start + len(doc)] = doc
      segments[start : start + len(doc)] = number
      positions[start : start + len(doc)] = np.arange(len(doc))
    return targets, segments, positions

  masked = rng.rand(length) < 0.5
  rows = [row(list(zip(starts, docs)))] + [row([(0, doc)]) for doc in docs]
  masks = [masked] + [np.roll(masked, -start) for start in starts]  # the same tokens masked
  # The second document right after the first (index 10, inside the first's third block): its
  # blocks are no longer its own, which the comparison must see.
  rows.append(row([(0, docs[0]), (10, docs[1])]))
  masks.append(np.concatenate([masked[:10], masked[12:], masked[:2]]))
  batch = {
      "targets": jnp.asarray([r[0] for r in rows]),
      "segment_ids": jnp.asarray([r[1] for r in rows]),
      "positions": jnp.asarray([r[2] for r in rows]),
  }
  batch["valid"] = batch["segment_ids"] > 0
  batch["masked"] = jnp.asarray(masks) & batch["valid"]
  inputs = jnp.where(batch["masked"], mask_id, batch["targets"])
  ce = np.asarray(lm.cross_entropy(params, inputs, batch, block_size=4)[0].ce)
  for number, (start, doc) in enumerate(zip(starts, docs), 1):
    np.testing.assert_allclose(ce[0, start : start + len(doc)], ce[number, : len(doc)], atol=2e-5)
  assert not np.allclose(ce[3, 10:17], ce[2, :7], atol=1e-3)


def test_packing_aligns_documents_for_the_block_sizes_it_trains_with():
  """A block model under data.packing="pack" packs each document at a multiple of the least
  common multiple of its block sizes below the sequence length; the gaps are padding."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from llada_jax.data import preprocessors, registry  # pylint: disable=g-import-not-at-top

  config = block_config(block_size=8)
  config.data.packing = "pack"
  config.diffusion.block_size_schedule = "0:2,10:4,20:L,30:8"
  assert registry.layout_of(validate(config)) == "pack8"
  config.diffusion.update(block_size=1, block_size_schedule="")
  assert registry.layout_of(validate(config)) == "pack"
  assert registry.layout_of(make_tiny_config()) == "chunk"

  docs = [list(range(1, 11)), list(range(21, 28)), list(range(41, 44)), list(range(61, 81))]
  dataset = tf.data.Dataset.from_generator(
      lambda: ({"targets": np.asarray(d, np.int32)} for d in docs),
      output_signature={"targets": tf.TensorSpec([None], tf.int32)},
  )
  rows = list(preprocessors.layout("pack8")(dataset, 32).as_numpy_iterator())
  found = []
  for r in rows:
    for segment in range(1, r["segment_ids"].max() + 1):
      where = np.flatnonzero(r["segment_ids"] == segment)
      assert where[0] % 8 == 0 and (np.diff(where) == 1).all()
      np.testing.assert_array_equal(r["positions"][where], np.arange(len(where)))
      found.append(list(r["targets"][where]))
    assert (r["targets"][r["segment_ids"] == 0] == 0).all()
  assert sorted(found) == sorted(docs)


def test_each_row_counts_its_own_forward_passes(params):
  """return_steps: one pass a token without a threshold (steps = block size), one pass a block
  when every proposal clears it, and a row counts the same alone as in a batch whose other rows
  take longer."""
  config = block_config(block_size=4, steps=16, gen_length=16)
  lm = MaskedDiffusionLM(config)
  prompt = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (3, 8), 3, 250))  # two blocks
  mask = np.ones(prompt.shape, bool)
  rng = item_keys(jax.random.PRNGKey(5), 3)
  tokens, steps = lm.generate(params, prompt, mask, rng=rng, return_steps=True)
  np.testing.assert_array_equal(tokens, lm.generate(params, prompt, mask, rng=rng))
  ends = np.isin(np.asarray(tokens)[:, 8:], [config.tokens.eos_id, config.tokens.eot_id])
  # A row stops after the block of its first end token (early stop): its blocks of 4 so far.
  first_end = np.where(ends.any(-1), ends.argmax(-1) // 4 + 1, 4)
  np.testing.assert_array_equal(steps, 4 * first_end)  # a token a step
  _, fast = lm.generate(params, prompt, mask, rng=rng, return_steps=True, parallel_threshold=1e-9)
  np.testing.assert_array_equal(fast, first_end)  # every masked token of a block at once
  _, mid = lm.generate(params, prompt, mask, rng=rng, return_steps=True, parallel_threshold=0.02)
  for row in range(3):
    _, alone = lm.generate(
        params,
        prompt[row : row + 1],
        mask[row : row + 1],
        rng=rng[row : row + 1],
        return_steps=True,
        parallel_threshold=0.02,
    )
    assert int(alone[0]) == int(mid[row])
  with pytest.raises(ConfigError, match="return_steps is not allowed"):
    MaskedDiffusionLM(validate(make_tiny_config(causal=True))).generate(
        params, prompt, mask, return_steps=True
    )
