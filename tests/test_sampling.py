"""The compiled reverse process: schedule, selection and end-to-end invariants."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax.model import ModelConfig, Transformer, logits
from llada_jax.sampling import generate
from llada_jax.sampling.cache import window, window_logits
from llada_jax.sampling.schedule import num_transfer_tokens, top_k_mask


def _official_num_transfer_tokens(mask_num: np.ndarray, steps: int) -> np.ndarray:
  """NumPy transcription of LLaDA's get_num_transfer_tokens."""
  base = mask_num // steps
  remainder = mask_num % steps
  out = np.zeros((mask_num.shape[0], steps), np.int64) + base[:, None]
  for i in range(mask_num.shape[0]):
    out[i, : remainder[i]] += 1
  return out


@pytest.mark.parametrize("steps", [1, 3, 4, 7, 32])
def test_num_transfer_tokens_matches_official(steps):
  counts = np.array([0, 1, 5, 32, 33, 100])
  got = np.asarray(num_transfer_tokens(jnp.asarray(counts), steps))
  np.testing.assert_array_equal(got, _official_num_transfer_tokens(counts, steps))
  np.testing.assert_array_equal(got.sum(axis=1), counts)


def test_top_k_mask_selects_highest_and_breaks_ties_by_position():
  conf = jnp.array([[0.1, 0.9, -jnp.inf, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3, -jnp.inf]])
  got = np.asarray(top_k_mask(conf, jnp.array([2, 3])))
  np.testing.assert_array_equal(got, [[0, 1, 0, 1, 0], [1, 1, 1, 0, 0]])


@pytest.fixture(scope="module")
def model_and_params():
  config = make_tiny_config()
  model = Transformer(ModelConfig.from_config(config))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  return config, params["params"]


def _prompt():
  return jax.random.randint(jax.random.PRNGKey(3), (2, 5), 3, 259)


def test_generate_keeps_prompt_and_leaves_no_mask(model_and_params):
  config, params = model_and_params
  out = np.asarray(generate(config, params, _prompt(), steps=8, gen_length=16, block_length=8))
  assert out.shape == (2, 21)
  np.testing.assert_array_equal(out[:, :5], np.asarray(_prompt()))
  assert not (out == config.tokens.mask_id).any()


def test_generate_is_deterministic_for_a_seed(model_and_params):
  config, params = model_and_params
  kwargs = dict(steps=8, gen_length=16, block_length=8, temperature=1.0)
  a = generate(config, params, _prompt(), rng=jax.random.PRNGKey(7), **kwargs)
  b = generate(config, params, _prompt(), rng=jax.random.PRNGKey(7), **kwargs)
  c = generate(config, params, _prompt(), rng=jax.random.PRNGKey(8), **kwargs)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_one_step_per_token_greedy_commits_the_most_confident_first(model_and_params):
  """With steps == gen_length one token is committed per step: the argmax of the first step's
  most confident masked position must survive to the end."""
  config, params = model_and_params
  model = Transformer(ModelConfig.from_config(config))
  prompt = _prompt()
  x = jnp.concatenate([prompt, jnp.full((2, 4), config.tokens.mask_id)], axis=1)
  probs = jax.nn.softmax(jax.jit(model.apply)({"params": params}, x), axis=-1)[:, 5:]
  conf = probs.max(-1)
  first = np.asarray(jnp.argmax(conf, axis=-1))
  token = np.asarray(jnp.argmax(probs, axis=-1))[np.arange(2), first]
  out = np.asarray(generate(config, params, prompt, steps=4, gen_length=4, block_length=4))
  np.testing.assert_array_equal(out[np.arange(2), 5 + first], token)


def test_left_padding_is_invisible_through_the_attention_mask(model_and_params):
  """Whatever the padding ids are, masked padding cannot change the answer."""
  config, params = model_and_params
  prompt = _prompt()[:1]
  mask = jnp.arange(8)[None] >= 3
  kwargs = dict(steps=8, gen_length=16, block_length=8)
  outs = [
      np.asarray(
          generate(
              config,
              params,
              jnp.concatenate([jnp.full((1, 3), pad, jnp.int32), prompt], axis=1),
              mask,
              **kwargs,
          )
      )
      for pad in (0, 77)
  ]
  np.testing.assert_array_equal(outs[0][:, 8:], outs[1][:, 8:])
  assert not (outs[0] == config.tokens.mask_id).any()


def test_threshold_one_is_exact_one_token_per_step_decoding(model_and_params):
  config, params = model_and_params
  kwargs = dict(steps=16, gen_length=16, block_length=8)
  exact = generate(config, params, _prompt(), **kwargs)
  parallel = generate(config, params, _prompt(), parallel_threshold=1.0, **kwargs)
  np.testing.assert_array_equal(parallel, exact)


def test_low_threshold_fills_each_block_in_one_pass(model_and_params):
  """τ near 0 commits every proposal of a block at once: the answer is the argmax of one forward
  pass per block (the second block seeing the first one filled)."""
  from llada_jax.model import logits  # pylint: disable=g-import-not-at-top

  config, params = model_and_params
  out = np.asarray(
      generate(
          config,
          params,
          _prompt(),
          steps=16,
          gen_length=16,
          block_length=8,
          parallel_threshold=1e-9,
      )
  )
  mask_id = config.tokens.mask_id
  x = np.concatenate([np.asarray(_prompt()), np.full((2, 16), mask_id, np.int32)], 1)
  for block_end in (13, 21):
    proposals = np.asarray(jnp.argmax(logits(config, params, jnp.asarray(x)), -1))
    x[:, block_end - 8 : block_end] = proposals[:, block_end - 8 : block_end]
  np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(parallel_threshold=1.5), "parallel_threshold=1.5 is not allowed"),
        (dict(parallel_threshold=0.9, remasking="random"), "expected low_confidence"),
        (dict(parallel_threshold=0.9, return_trajectory=True), "return_trajectory is not allowed"),
    ],
)
def test_bad_threshold_options_are_one_line_errors(model_and_params, kwargs, needle):
  config, params = model_and_params
  with pytest.raises(ValueError, match=needle):
    generate(config, params, _prompt(), steps=8, gen_length=16, block_length=8, **kwargs)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(steps=16),
        dict(steps=8, temperature=1.0, cfg_scale=0.5),
        dict(steps=8, remasking="random", temperature=0.5),
        dict(steps=16, parallel_threshold=1.0),
    ],
)
def test_cache_refreshed_every_step_is_exact_decoding(model_and_params, cache, kwargs):
  config, params = model_and_params
  kwargs = dict(gen_length=16, block_length=8, **kwargs)
  exact = np.asarray(generate(config, params, _prompt(), **kwargs))
  cached = np.asarray(generate(config, params, _prompt(), cache=cache, cache_refresh=1, **kwargs))
  np.testing.assert_array_equal(cached, exact)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_with_infilling_and_padding_is_exact_when_refreshed(model_and_params, cache):
  """Mask tokens inside a left-padded prompt are filled in the first block's window."""
  config, params = model_and_params
  prompt = np.array(_prompt())
  prompt[:, 2] = config.tokens.mask_id
  mask = np.ones_like(prompt, bool)
  mask[1, :2] = False
  kwargs = dict(steps=8, gen_length=8, block_length=4)
  exact = np.asarray(generate(config, params, prompt, mask, **kwargs))
  cached = np.asarray(
      generate(config, params, prompt, mask, cache=cache, cache_refresh=1, **kwargs)
  )
  np.testing.assert_array_equal(cached, exact)
  assert not (exact[:, 2:] == config.tokens.mask_id).any()


def test_stale_cache_fills_every_mask_and_keeps_the_prompt(model_and_params):
  config, params = model_and_params
  for cache in ("prefix", "dual"):
    out = np.asarray(
        generate(
            config,
            params,
            _prompt(),
            steps=8,
            gen_length=16,
            block_length=8,
            cache=cache,
            parallel_threshold=0.5,
        )
    )
    np.testing.assert_array_equal(out[:, :5], np.asarray(_prompt()))
    assert not (out == config.tokens.mask_id).any()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(cache="kv"), "cache='kv' is not allowed"),
        (dict(cache="dual", cache_refresh=-1), "cache_refresh=-1 is not allowed"),
    ],
)
def test_bad_cache_options_are_one_line_errors(model_and_params, kwargs, needle):
  config, params = model_and_params
  with pytest.raises(ValueError, match=needle):
    generate(config, params, _prompt(), steps=8, gen_length=16, block_length=8, **kwargs)


@pytest.mark.parametrize(
    "options",
    [
        dict(remasking="random", temperature=1.0),
        dict(remasking="low_confidence", temperature=0.7, cfg_scale=0.5),
        dict(parallel_threshold=0.3, temperature=1.0),
        dict(cache="prefix", temperature=1.0),
        dict(cache="dual", parallel_threshold=0.3, temperature=1.0),
        dict(remasking="random", temperature=1.0, infill=True),
    ],
)
def test_an_answer_is_the_same_alone_and_in_any_batch(model_and_params, options):
  """Item keys fold_in(seed, item): the answer of a prompt does not depend on its neighbours,
  the batch's padded width or the batch size, with noise, CFG, thresholds, caches, infilling.
  (The noise was once drawn over the whole batch, and threshold steps counted for the batch.)"""
  from llada_jax.keys import item_keys  # pylint: disable=g-import-not-at-top

  config, params = model_and_params
  options = dict(options)
  infill = options.pop("infill", False)
  mask_id = config.tokens.mask_id
  prompts = [[7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27, 28], [30, 31, 32, 33, 34, 35]]
  if infill:
    prompts[0][2] = mask_id
  width = 12
  batch = np.full((3, width), config.tokens.pad_id, np.int32)
  for row, p in enumerate(prompts):
    batch[row, width - len(p) :] = p
  keys = item_keys(jax.random.PRNGKey(11), [4, 9, 2])
  kwargs = dict(steps=8, gen_length=16, block_length=8, **options)
  together = np.asarray(
      generate(config, params, batch, batch != config.tokens.pad_id, rng=keys, **kwargs)
  )[:, width:]
  alone = np.asarray(generate(config, params, np.asarray([prompts[0]]), rng=keys[:1], **kwargs))
  np.testing.assert_array_equal(alone[0, len(prompts[0]) :], together[0])
  if infill:
    assert alone[0, 2] != mask_id


@functools.lru_cache(maxsize=4)
def _jitted_window_logits(model_cfg):
  """cache.window_logits of the model, jitted with start and end static (host loops call it)."""
  model = Transformer(model_cfg)
  return jax.jit(
      lambda params, tokens, mask, uncond, scale, start, end, cache: window_logits(
          model, params, tokens, mask, uncond, scale, start, end, cache
      ),
      static_argnums=(5, 6),
  )


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_window_against_the_cache_of_the_same_tokens_is_the_full_pass(model_and_params, mode):
  """A non-refresh step's logits: the window computed against the cache a full pass of the same
  tokens left (padding, CFG, a half-filled answer) equals that window of two plain forward passes
  combined by hand, u + (w + 1)(c - u); with a zero cache it does not."""
  config, params = model_and_params
  mask_id, scale = config.tokens.mask_id, 0.5
  x = np.concatenate([np.asarray(_prompt()), np.full((2, 16), mask_id, np.int32)], 1)
  x[:, [6, 9, 15, 18]] = [[40, 41, 42, 43], [50, 51, 52, 53]]
  mask = np.ones_like(x, bool)
  mask[1, :2] = False
  uncond = np.where(np.arange(21) < 5, mask_id, x)
  start, end = window(mode, 5, 13, 21)
  c, u = (np.asarray(logits(config, params, t, mask), np.float64) for t in (x, uncond))
  want = (u + (scale + 1) * (c - u))[:, start:end]
  run = _jitted_window_logits(ModelConfig.from_config(config))
  full, cache = run(params, x, mask, uncond, scale, start, end, None)
  cached, _ = run(params, x, mask, uncond, scale, start, end, cache)
  zeros, _ = run(params, x, mask, uncond, scale, start, end, jax.tree.map(jnp.zeros_like, cache))
  np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cached, want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(zeros) - want).max() > 1e-2


def _stale_cache_decoding(config, params, prompt, mode, steps, gen_length, block_length, zero):
  """Greedy low-confidence decoding with a `mode` cache refreshed at block starts only, step by
  step on the host (NumPy schedule and selection): each block's first step is a full pass whose
  keys and values the block's other steps read, or zeros instead with zero=True."""
  run = _jitted_window_logits(ModelConfig.from_config(config))
  mask_id = config.tokens.mask_id
  rows, prompt_len = prompt.shape
  total, blocks = prompt_len + gen_length, gen_length // block_length
  x = np.concatenate([prompt, np.full((rows, gen_length), mask_id, np.int32)], 1)
  mask = np.ones_like(x, bool)
  for block in range(blocks):
    block_start = prompt_len + block * block_length
    block_end = block_start + block_length
    start, end = window(mode, block_start, block_end, total)
    counts = _official_num_transfer_tokens(
        (x[:, block_start:block_end] == mask_id).sum(1), steps // blocks
    )
    for i in range(steps // blocks):
      out, fresh = run(params, x, mask, None, 0.0, start, end, None if i == 0 else cache)
      if i == 0:
        cache = jax.tree.map(jnp.zeros_like, fresh) if zero else fresh
      probs = np.asarray(jax.nn.softmax(out, axis=-1))
      proposal = probs.argmax(-1)
      confidence = np.take_along_axis(probs, proposal[..., None], -1)[..., 0]
      candidate = (x[:, start:end] == mask_id) & (np.arange(start, end) < block_end)
      confidence = np.where(candidate, confidence, -np.inf)
      for row in range(rows):
        chosen = np.argsort(-confidence[row], kind="stable")[: counts[row, i]]
        x[row, start + chosen] = proposal[row, chosen]
  return x


def test_stale_cache_decoding_reads_the_keys_of_the_block_start(model_and_params):
  """cache_refresh=0: inside a block, steps read the keys and values of the block's first step.
  The sampler's tokens equal a host loop doing exactly that, and differ from the same loop with a
  zero cache (a sampler whose cached steps read zeros passes every refresh-every-step test). The
  dual cache only: prefix mode shares this code path, and its window is checked above."""
  config, params = model_and_params
  prompt = np.asarray(_prompt())
  kwargs = dict(steps=8, gen_length=16, block_length=8)
  got = np.asarray(generate(config, params, prompt, cache="dual", **kwargs))
  want = _stale_cache_decoding(config, params, prompt, "dual", zero=False, **kwargs)
  zeros = _stale_cache_decoding(config, params, prompt, "dual", zero=True, **kwargs)
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(want, zeros)


def test_remasking_and_cache_tables_cover_exactly_the_configs_names():
  """config.REMASKING and config.CACHE_MODES are the one source of the names: each table has a
  rule or logits function for every name, and none for a name the config does not accept."""
  # pylint: disable=g-import-not-at-top
  from llada_jax import config as config_lib
  from llada_jax.sampling.cache import STEP_LOGITS
  from llada_jax.sampling.remasking import DRAWS_UNIFORM, REMASKING_RULES

  assert tuple(REMASKING_RULES) == config_lib.REMASKING
  assert set(DRAWS_UNIFORM) <= set(config_lib.REMASKING)
  assert tuple(STEP_LOGITS) == config_lib.CACHE_MODES


def test_sampler_options_are_config_sampling_with_one_validation():
  """SamplerOptions' fields are exactly config.sampling's keys, with its defaults; every field has
  a check; a bad value fails with one line naming it, before any model is needed."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  from llada_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from llada_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling import options as options_lib  # pylint: disable=g-import-not-at-top

  defaults = config_lib.default_config()
  options = options_lib.SamplerOptions.from_config(defaults)
  assert options == options_lib.SamplerOptions()
  assert dataclasses.asdict(options) == defaults.sampling.to_dict()
  rules = config_lib.SAMPLING_RULES
  assert set(rules) == set(defaults.sampling.keys())
  assert options.replace(steps=None, gen_length=16, block_length=8).gen_length == 16
  with pytest.raises(ConfigError, match="unknown sampler option 'num_beams'"):
    options.replace(num_beams=4)
  with pytest.raises(
      ConfigError,
      match=r"^sampling.cache='kv' is not allowed: expected one of " "none, prefix, dual$",
  ):
    options.replace(cache="kv").validate(prefix="sampling.")
  causal = make_tiny_config()
  causal.model.causal = True
  with pytest.raises(ConfigError, match="cache='dual' is not allowed for a causal"):
    options.replace(gen_length=16, steps=16, cache="dual").validate(causal)


def test_greedy_decoding_ignores_top_k_and_top_p(model_and_params):
  """Truncation shapes what is sampled; at temperature 0 the argmax is kept and the remasking
  confidences are the full softmax's, so the answer is the plain greedy one (as transformers'
  do_sample=False ignores top_p)."""
  config, params = model_and_params
  kwargs = dict(steps=8, gen_length=16, block_length=8)
  greedy = np.asarray(generate(config, params, _prompt(), **kwargs))
  for truncation in (dict(top_k=3), dict(top_p=0.5)):
    np.testing.assert_array_equal(
        generate(config, params, _prompt(), **kwargs, **truncation), greedy
    )


def test_llada_rows_count_their_forward_passes(model_and_params):
  """return_steps: `steps` on the fixed schedule, one pass a block when every proposal clears the
  threshold, and between them with a real threshold, the same tokens as without counting."""
  config, params = model_and_params
  kwargs = dict(steps=8, gen_length=16, block_length=8)
  out, steps = generate(config, params, _prompt(), return_steps=True, **kwargs)
  np.testing.assert_array_equal(out, generate(config, params, _prompt(), **kwargs))
  np.testing.assert_array_equal(steps, [8, 8])
  _, fast = generate(
      config, params, _prompt(), return_steps=True, parallel_threshold=1e-9, **kwargs
  )
  np.testing.assert_array_equal(fast, [2, 2])  # two blocks, each at once
  _, mid = generate(config, params, _prompt(), return_steps=True, parallel_threshold=0.01, **kwargs)
  assert (2 <= np.asarray(mid)).all() and (np.asarray(mid) <= 16).all()
