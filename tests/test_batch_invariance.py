"""A row's answer is the same alone and in any batch: every sampler mode, with mixed batches of
infilling and plain rows, different prompt lengths and rows that end early. The random draws are
functions of (seed, item, position); nothing a row computes may read a fact of the whole batch
(a batch-wide "some prompt holds masks" once moved every row's cached window)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax.keys import item_keys
from llada_jax.model import ModelConfig, Transformer
from llada_jax.sampling import generate


@pytest.fixture(scope="module")
def model_and_params():
  config = make_tiny_config()
  model = Transformer(ModelConfig.from_config(config))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  return config, params["params"]


def _mixed_prompts(mask_id: int) -> list[list[int]]:
  """An infilling row, plain rows of three lengths and a second infilling row."""
  return [
      [7, 8, mask_id, 10, 11],
      [20, 21, 22, 23, 24, 25, 26, 27, 28],
      [30, 31, 32],
      [40, mask_id, mask_id, 43, 44, 45],
      [50, 51, 52, 53, 54, 55, 56],
  ]


def _alone_and_together(config, params, prompts, width=12, **kwargs):
  """(answers of each prompt generated alone, answers of the same prompts in one batch). Alone
  is a batch of that one row at the same padded width (one compiled program for every row;
  padding itself is invisible: tests/test_sampling.py)."""
  batch = np.full((len(prompts), width), config.tokens.pad_id, np.int32)
  mask = np.zeros(batch.shape, bool)
  for row, p in enumerate(prompts):
    batch[row, width - len(p) :] = p
    mask[row, width - len(p) :] = True
  keys = item_keys(jax.random.PRNGKey(5), [3, 14, 15, 92, 65][: len(prompts)])
  together = np.asarray(generate(config, params, batch, mask, rng=keys, **kwargs))[:, width:]
  alone = [
      np.asarray(
          generate(config, params, batch[i : i + 1], mask[i : i + 1], rng=keys[i : i + 1], **kwargs)
      )[0, width:]
      for i in range(len(prompts))
  ]
  return np.stack(alone), together


@pytest.mark.parametrize(
    "options",
    [
        dict(cache="prefix"),
        dict(cache="dual"),
        dict(cache="prefix", temperature=1.0, remasking="random"),
        dict(cache="prefix", parallel_threshold=0.5),
        dict(cache="dual", early_stop=True, temperature=1.0, cfg_scale=0.5),
    ],
)  # without a cache, and dual with a threshold: test_sampling.py's alone == batched
def test_every_row_of_a_mixed_batch_is_answered_as_alone(model_and_params, options):
  config, params = model_and_params
  prompts = _mixed_prompts(config.tokens.mask_id)
  alone, together = _alone_and_together(
      config, params, prompts, steps=8, gen_length=16, block_length=8, **options
  )
  differ = [row for row in range(len(prompts)) if not np.array_equal(alone[row], together[row])]
  assert not differ, f"rows {differ} differ between alone and batched with {options}"


def test_rows_that_end_early_do_not_change_their_neighbours(model_and_params):
  """early_stop with an EOS-leaning head (a bias on the EOS column): rows whose answers end in an
  early block (the rest EOS, later blocks skipped for them) and a row that runs to gen_length
  are each answered as alone."""
  config, params = model_and_params
  eos = config.tokens.eos_id
  params = jax.tree.map(lambda a: a, params)
  head = np.asarray(params["ff_out"]["kernel"]).copy()
  head[:, eos] += 0.3 * np.abs(head).max()
  params["ff_out"]["kernel"] = jnp.asarray(head)
  prompts = [[eos, eos, eos, eos], [20, 21, 22, 23, 24, 25], [7, config.tokens.mask_id, 9]]
  alone, together = _alone_and_together(
      config,
      params,
      prompts,
      steps=8,
      gen_length=16,
      block_length=4,
      early_stop=True,
      cache="prefix",
      temperature=1.0,
  )
  np.testing.assert_array_equal(together, alone)
  first_eos = [np.flatnonzero(row == eos)[:1].tolist() for row in alone]
  assert any(f and f[0] < 12 for f in first_eos) and any(not f for f in first_eos), first_eos
