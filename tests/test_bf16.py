"""model.dtype=bfloat16: the training loss and gradients, the chunked loss, the sampler's logits,
the likelihood and an HF import in bfloat16 stay within bfloat16 rounding of float32.

The parameters stay float32 (model.param_dtype); bfloat16 is the compute dtype of every matmul
input and output, with norms, rotary embeddings, attention scores, softmax and cross-entropy in
float32. bfloat16 keeps 8 significant bits: one rounding is off by at most U = 2**-8 relative.
The tolerances below are stated in U with a margin of 3 to 10 over the errors measured on this
model (2 layers, float32 weights of std 0.088), so float32 summation order never matters. With the
check that every matmul runs in bfloat16 they catch a model.dtype that is not in effect and a
cross-entropy in bfloat16; one more rounding per layer (an RMSNorm variance or the attention
scores in bfloat16) stays within them on a model this small (tests/MUTATIONS.md).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import make_tiny_config
from hf_fixtures import hf_tensors, write_folder
from llada_jax.diffusion.likelihood import log_likelihood
from llada_jax.diffusion.masking import noise_batch
from llada_jax.diffusion.objectives import unpacked_batch
from llada_jax.interop.hf_checkpoint import load_hf
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.model import ModelConfig, Transformer, logits

U = 2.0**-8  # bfloat16's unit roundoff


def _config(dtype, **train):
  config = make_tiny_config(dtype=dtype)
  config.train.update(train)
  return config


@pytest.fixture(scope="module")
def params():
  """float32 parameters of the tiny model, shared by the float32 and bfloat16 runs."""
  model = Transformer(ModelConfig.from_config(_config("float32")))
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]


@pytest.fixture(scope="module")
def losses(params):
  """(loss, flat gradient) of one noised batch (the noise fixed in the batch) for float32,
  bfloat16 and bfloat16 with the output layer's loss in chunks of 8 positions (train.loss_chunk)."""
  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 32), 3, 259)
  batch = noise_batch(
      jax.random.PRNGKey(2), unpacked_batch(tokens), mask_id=259, eps=1e-3, random_length_prob=0.0
  )
  results = {}
  for name, config in (
      ("float32", _config("float32")),
      ("bfloat16", _config("bfloat16")),
      ("chunked", _config("bfloat16", loss_chunk=8)),
  ):
    model = MaskedDiffusionLM(config)
    loss, grads = jax.jit(
        jax.value_and_grad(
            lambda p, m=model: m.loss(p, batch, jax.random.PRNGKey(0), random_length_prob=0.0)[0]
        )
    )(params)
    results[name] = float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  return results


def _relative(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_bf16_runs_every_matmul_in_bfloat16():
  """Without this, a model.dtype that no layer reads would pass every closeness check below: of
  the 10 matmuls of the forward (q, k, v, scores, scores x v, attn_out, ff_proj, up_proj, ff_out
  per layer, the head), all but the attention scores (float32 by design) give bfloat16."""
  config = _config("bfloat16")
  model = Transformer(ModelConfig.from_config(config))
  abstract = jax.eval_shape(
      lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))[
          "params"
      ]
  )
  text = str(
      jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(
          abstract, jax.ShapeDtypeStruct((2, 16), jnp.int32)
      )
  )
  outputs = re.findall(r"(\w+)\[[\d,]*\] = dot_general", text)
  assert sorted(outputs) == ["bf16"] * 9 + ["f32"], outputs


def test_bf16_training_loss_and_gradients_are_near_float32(losses):
  """Loss within 0.5 U relative (measured 0.04 U: the mean over ~130 masked tokens averages
  the per-logit roundings out); gradients within 12 U in relative L2 norm (measured 2.9 U: a few
  roundings per matmul, forward and backward through 2 layers) and pointing the same way."""
  loss, grads = losses["bfloat16"]
  loss32, grads32 = losses["float32"]
  assert loss != loss32  # bfloat16 is in effect
  assert loss == pytest.approx(loss32, rel=0.5 * U)
  assert _relative(grads, grads32) < 12 * U
  assert grads @ grads32 / np.linalg.norm(grads) / np.linalg.norm(grads32) > 0.999


def test_bf16_chunked_loss_is_the_full_bf16_loss_and_near_float32(losses):
  """The chunked output layer does in chunks what the full one does (bfloat16 logits, float32
  cross-entropy): the same loss to float32 summation order (1e-5; measured 1e-7) and gradients
  within 1.3 U (measured 0.16 U: the recomputed chunks round their backward pass apart), so
  within the float32 tolerances above too."""
  loss, grads = losses["chunked"]
  full_loss, full_grads = losses["bfloat16"]
  loss32, grads32 = losses["float32"]
  assert loss == pytest.approx(full_loss, rel=1e-5)
  assert _relative(grads, full_grads) < 1.3 * U
  assert loss == pytest.approx(loss32, rel=0.5 * U)
  assert _relative(grads, grads32) < 12 * U


def test_bf16_sampler_logits_are_near_float32(params):
  """The sampler's forward pass (model.logits, the apply_model every sampler step runs) on a
  prompt followed by masks: every logit within 8 U of the largest float32 logit (measured 2.8 U:
  the head's output is rounded once more to bfloat16 after the blocks' roundings)."""
  prompt = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 3, 259)
  x = jnp.concatenate([prompt, jnp.full((2, 16), 259, jnp.int32)], 1)
  got = np.asarray(logits(_config("bfloat16"), params, x))
  want = np.asarray(logits(_config("float32"), params, x))
  assert got.dtype == np.float32 and not np.array_equal(got, want)
  assert np.abs(got - want).max() < 8 * U * np.abs(want).max()


def test_bf16_likelihood_is_near_float32(params):
  """The Monte-Carlo bound with the same masks (same seed) within 2.5 U relative (measured 0.26 U
  on sums of 3 to 5 cross-entropies of about 5.5 nats)."""
  pairs = dict(prompt=[[3, 4, 5, 6], [7, 8, 9]], answer=[[10, 11, 12], [13, 14, 15, 16, 17]])
  kwargs = dict(mc_num=8, batch_size=8, rng=jax.random.PRNGKey(3))
  got = log_likelihood(_config("bfloat16"), params, **pairs, **kwargs).log_likelihood
  want = log_likelihood(_config("float32"), params, **pairs, **kwargs).log_likelihood
  assert not np.array_equal(got, want)
  np.testing.assert_allclose(got, want, rtol=2.5 * U)


def test_hf_import_in_bf16_is_the_float32_import_rounded_to_nearest(tmp_path):
  """from-hf --dtype=bfloat16 of float32 tensors gives each float32 value rounded to the nearest
  bfloat16 (ties to even, as ml_dtypes casts): bitwise that, so at most U relative off (a
  truncating conversion is off by up to 2 U and fails)."""
  config = make_tiny_config()
  folder = write_folder(tmp_path / "hf", config, hf_tensors(config))
  _, bf16 = load_hf(folder, base=config, dtype="bfloat16")
  _, f32 = load_hf(folder, base=config, dtype="float32")
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(f32)]
  assert len(names) == 12
  for name, low, high in zip(names, jax.tree.leaves(bf16), jax.tree.leaves(f32)):
    assert low.dtype == ml_dtypes.bfloat16 and high.dtype == np.float32, name
    np.testing.assert_array_equal(low, high.astype(ml_dtypes.bfloat16), err_msg=name)
    error = np.abs(low.astype(np.float32) - high)
    assert np.all(error <= U * np.abs(high)), (name, float(np.max(error / np.abs(high))))
