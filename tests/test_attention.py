"""Every attention implementation against the XLA reference, wherever it can run."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax.model import ModelConfig, Transformer, logits
from llada_jax.model.attention import attention, resolve


def _inputs(dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (2, 10, 4, 16), dtype)
  k, v = (jax.random.normal(key, (2, 10, 2, 16), dtype) for key in keys[1:])  # GQA: 2 kv heads
  key_mask = jnp.asarray([[False] * 3 + [True] * 7, [True] * 8 + [False] * 2])  # left, right pad
  segments = jnp.asarray([[1] * 4 + [2] * 6, [1] * 10])
  return q, k, v, key_mask, segments


CASES = [
    dict(causal=False),
    dict(causal=True),
    dict(causal=False, mask=True),
    dict(causal=False, segments=True),
    dict(causal=True, mask=True, segments=True),
    dict(causal=False, mask="right"),
    dict(causal=True, mask="right"),
]


def _run(implementation, case, dtype=jnp.float32):
  q, k, v, key_mask, segments = _inputs(dtype)
  if case.get("mask") == "right":  # every row padded at its end: key lengths, cuDNN's fast path
    key_mask = jnp.arange(10)[None] < jnp.asarray([[7], [10]])
  fn = jax.jit(
      lambda q, k, v: attention(
          q,
          k,
          v,
          causal=case["causal"],
          key_mask=key_mask if case.get("mask") else None,
          segment_ids=segments if case.get("segments") else None,
          implementation=implementation,
      )
  )
  return np.asarray(fn(q, k, v), np.float32)


@pytest.mark.parametrize("case", CASES)
def test_jax_nn_equals_xla(case):
  np.testing.assert_allclose(_run("jax_nn", case), _run("xla", case), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("case", CASES)
def test_cudnn_equals_xla_within_bf16_tolerance(case):
  np.testing.assert_allclose(
      _run("cudnn", case, jnp.bfloat16), _run("xla", case, jnp.bfloat16), rtol=2e-2, atol=2e-2
  )


def test_auto_picks_cudnn_for_16_bit_gpu_compute_only():
  assert resolve("auto", "bfloat16", "gpu") == "cudnn"
  assert resolve("auto", "float32", "gpu") == "xla"
  assert resolve("auto", "bfloat16", "cpu", (128, 128)) == "xla"
  assert resolve("jax_nn", "float32", "gpu") == "jax_nn"


def test_auto_picks_splash_on_tpu_for_lengths_it_supports():
  assert resolve("auto", "bfloat16", "tpu", (256, 512)) == "splash"
  assert resolve("auto", "float32", "tpu", (128, 128)) == "splash"
  assert resolve("auto", "bfloat16", "tpu", (100, 128)) == "xla"
  assert resolve("auto", "bfloat16", "tpu") == "xla"


def _long_inputs():
  """Splash needs lengths that are multiples of 128."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (2, 128, 4, 16))
  k, v = (jax.random.normal(key, (2, 128, 2, 16)) for key in keys[1:])
  key_mask = jnp.arange(128)[None] >= jnp.asarray([[5], [0]])
  key_mask = key_mask & (jnp.arange(128)[None] < jnp.asarray([[128], [119]]))  # left, right pad
  segments = jnp.asarray([[1] * 60 + [2] * 68, [1] * 128])
  return q, k, v, key_mask, segments


@pytest.mark.parametrize(
    "implementation,case",
    [
        ("splash", CASES[0]),
        ("splash", CASES[2]),
        ("splash", CASES[4]),
        ("jax_nn", CASES[2]),
        ("jax_nn", CASES[4]),
    ],
)
def test_outputs_and_gradients_equal_xla(implementation, case):
  """Outputs and gradients of a loss on the real (unpadded) queries; splash interpreted off TPU."""
  q, k, v, key_mask, segments = _long_inputs()
  kwargs = dict(
      causal=case["causal"],
      key_mask=key_mask if case.get("mask") else None,
      segment_ids=segments if case.get("segments") else None,
  )
  real = key_mask[:, :, None, None] if case.get("mask") else 1.0

  def loss(implementation, q, k, v):
    out = attention(q, k, v, implementation=implementation, **kwargs)
    return jnp.sum(jnp.sin(out) * real), out * real

  results = {}
  for name in ("xla", implementation):
    (_, out), grads = jax.value_and_grad(functools.partial(loss, name), (0, 1, 2), has_aux=True)(
        q, k, v
    )
    results[name] = (out, *grads)
  for got, want in zip(results[implementation], results["xla"]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_model_logits_agree_across_implementations():
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 3, 259)
  mask = jnp.arange(12)[None, :] >= jnp.asarray([[0], [4]])  # the second row left-padded
  outs = []
  for implementation in ("xla", "jax_nn"):  # "auto" is "xla" off GPUs (resolve, tested above)
    config = make_tiny_config(attention=implementation)
    params = nn.meta.unbox(
        jax.jit(Transformer(ModelConfig.from_config(config)).init)(jax.random.PRNGKey(0), tokens)
    )["params"]
    outs.append(np.asarray(logits(config, params, tokens, mask)))
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_model_with_splash_attention_equals_xla():
  """The whole mask predictor at a splash-sized length, a left-padded row included."""
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 128), 3, 259)
  mask = jnp.arange(128)[None, :] >= jnp.asarray([[0], [7]])
  outs = []
  for implementation in ("xla", "splash"):
    config = make_tiny_config(attention=implementation, max_sequence_length=128)
    params = nn.meta.unbox(
        jax.jit(Transformer(ModelConfig.from_config(config)).init)(jax.random.PRNGKey(0), tokens)
    )["params"]
    outs.append(np.asarray(logits(config, params, tokens, mask)) * np.asarray(mask)[..., None])
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_splash_on_an_8_device_mesh_equals_xla_with_gradients():
  """Splash per shard (batch over data x fsdp, heads over tensor) against XLA attention on the
  same sharded inputs, a left- and a right-padded row and packed segments included."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.sharding import axis_rules, mesh_context  # pylint: disable=g-import-not-at-top

  config = make_tiny_config()
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  mesh, rules = make_mesh(config), axis_rules(config)
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  q = jax.random.normal(keys[0], (4, 128, 4, 16))
  k, v = (jax.random.normal(key, (4, 128, 2, 16)) for key in keys[1:])
  key_mask = (jnp.arange(128)[None] >= jnp.asarray([[5], [0], [0], [9]])) & (
      jnp.arange(128)[None] < jnp.asarray([[128], [119], [128], [100]])
  )
  segments = jnp.where(jnp.arange(128)[None] < jnp.asarray([[60], [128], [30], [128]]), 1, 2)
  place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))
  q = place(q, (("data", "fsdp"), None, "tensor"))
  k, v = (place(t, (("data", "fsdp"), None, "tensor")) for t in (k, v))
  key_mask, segments = (place(t, (("data", "fsdp"),)) for t in (key_mask, segments))
  real = key_mask[:, :, None, None]

  def loss(implementation, q, k, v):
    out = attention(
        q,
        k,
        v,
        causal=False,
        key_mask=key_mask,
        segment_ids=segments,
        implementation=implementation,
    )
    return jnp.sum(jnp.sin(out) * real), out * real

  results = {}
  with mesh_context(mesh, rules):
    for name in ("xla", "splash"):
      grad_fn = jax.jit(jax.value_and_grad(functools.partial(loss, name), (0, 1, 2), has_aux=True))
      (_, out), grads = grad_fn(q, k, v)
      results[name] = (out, *grads)
  assert results["splash"][0].sharding.spec[0] == ("data", "fsdp")
  for got, want in zip(results["splash"], results["xla"]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
