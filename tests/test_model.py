"""The mask predictor: shapes, GQA, bidirectional vs causal, padding, layer scan, and the numerics
of RMSNorm and RoPE against NumPy references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax.model import ModelConfig, Transformer, logits
from llada_jax.model.layers import RMSNorm, apply_rope


def _init(config, tokens, seed=0):
  model = Transformer(ModelConfig.from_config(config))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), tokens))["params"]
  return model, params


def _tokens(batch=2, length=12, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, 259)


def test_logits_shape_and_dtype():
  config = make_tiny_config()
  model, params = _init(config, _tokens())
  logits = jax.jit(model.apply)({"params": params}, _tokens())
  assert logits.shape == (2, 12, config.model.vocab_size)
  assert logits.dtype == jnp.float32


def test_parameter_shapes_carry_gqa_and_names():
  config = make_tiny_config(n_heads=4, n_kv_heads=2)
  model = Transformer(ModelConfig.from_config(config))
  boxed = model.init(jax.random.PRNGKey(0), _tokens())["params"]
  blocks = boxed["blocks"]
  assert blocks["q_proj"]["kernel"].value.shape == (2, 64, 4, 16)
  assert blocks["k_proj"]["kernel"].value.shape == (2, 64, 2, 16)
  assert blocks["k_proj"]["kernel"].names == ("layers", "embed", "kv_heads", "kv")
  assert boxed["ff_out"]["kernel"].names == ("embed", "vocab")
  assert boxed["wte"]["embedding"].names == ("vocab", "embed")


def test_gqa_equals_mha_with_repeated_kv_heads():
  """A GQA model is the MHA model whose kv head j is copied to query heads j*G..j*G+G-1."""
  tokens = _tokens()
  gqa_config = make_tiny_config(n_heads=4, n_kv_heads=2)
  gqa, params = _init(gqa_config, tokens)
  mha, _ = _init(make_tiny_config(n_heads=4, n_kv_heads=4), tokens)
  mha_params = jax.tree.map(lambda x: x, params)
  for name in ("k_proj", "v_proj"):
    kernel = params["blocks"][name]["kernel"]
    mha_params["blocks"][name] = {"kernel": jnp.repeat(kernel, 2, axis=2)}
  np.testing.assert_allclose(
      jax.jit(gqa.apply)({"params": params}, tokens),
      jax.jit(mha.apply)({"params": mha_params}, tokens),
      rtol=1e-5,
      atol=1e-5,
  )


def test_bidirectional_sees_the_future_causal_does_not():
  tokens = _tokens(batch=1)
  changed = tokens.at[0, -1].set((tokens[0, -1] + 1) % 259)
  for causal in (False, True):
    model, params = _init(make_tiny_config(causal=causal), tokens)
    before = jax.jit(model.apply)({"params": params}, tokens)[0, :-1]
    after = jax.jit(model.apply)({"params": params}, changed)[0, :-1]
    assert np.allclose(before, after, atol=1e-6) == causal


def test_masked_keys_do_not_influence_outputs():
  tokens = _tokens(batch=1)
  model, params = _init(make_tiny_config(), tokens)
  keep = jnp.arange(12)[None] < 8
  out = jax.jit(model.apply)({"params": params}, tokens, keep)[:, :8]
  truncated = jax.jit(model.apply)({"params": params}, tokens[:, :8])
  np.testing.assert_allclose(out, truncated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_packed_segments_compute_what_each_document_computes_alone(scan_layers):
  """Two documents packed into one row (segment ids, positions restarting) plus padding give each
  document the logits it has on its own."""
  config = make_tiny_config(scan_layers=scan_layers)
  first, second = _tokens(1, 7, seed=2), _tokens(1, 4, seed=3)
  model, params = _init(config, first)
  packed = jnp.concatenate([first, second, jnp.zeros((1, 1), jnp.int32)], axis=1)
  segments = jnp.array([[1] * 7 + [2] * 4 + [0]])
  positions = jnp.array([list(range(7)) + list(range(4)) + [0]])
  logits = jax.jit(model.apply)({"params": params}, packed, segments > 0, positions, segments)
  alone = [jax.jit(model.apply)({"params": params}, doc) for doc in (first, second)]
  np.testing.assert_allclose(logits[:, :7], alone[0], atol=1e-5)
  np.testing.assert_allclose(logits[:, 7:11], alone[1], atol=1e-5)


def test_scanned_and_unrolled_layers_agree():
  tokens = _tokens()
  scanned, params = _init(make_tiny_config(scan_layers=True), tokens)
  unrolled, _ = _init(make_tiny_config(scan_layers=False), tokens)
  unrolled_params = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(2):
    unrolled_params[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
  np.testing.assert_allclose(
      jax.jit(scanned.apply)({"params": params}, tokens),
      jax.jit(unrolled.apply)({"params": unrolled_params}, tokens),
      rtol=1e-5,
      atol=1e-5,
  )


@pytest.mark.parametrize("remat", ["minimal", "save_dots", "full"])
def test_remat_keeps_values_and_gradients(remat):
  tokens = _tokens()
  base, params = _init(make_tiny_config(), tokens)
  other, _ = _init(make_tiny_config(remat=remat), tokens)

  def loss(model, p):
    return jnp.mean(model.apply({"params": p}, tokens) ** 2)

  g1 = jax.jit(jax.grad(lambda p: loss(base, p)))(params)
  g2 = jax.jit(jax.grad(lambda p: loss(other, p)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_rmsnorm_matches_numpy():
  x = np.random.RandomState(0).randn(3, 8).astype(np.float32)
  norm = RMSNorm(1e-5, jnp.float32, jnp.float32)
  variables = norm.init(jax.random.PRNGKey(0), x)
  weight = np.linspace(0.5, 1.5, 8).astype(np.float32)
  variables = {"params": {"weight": weight}}
  expected = weight * x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(norm.apply(variables, x), expected, rtol=1e-6)


def test_rope_matches_rotate_half_reference():
  rng = np.random.RandomState(0)
  x = rng.randn(1, 5, 2, 8).astype(np.float32)
  positions = np.arange(5)[None]
  theta = 10000.0
  inv_freq = 1.0 / theta ** (np.arange(0, 8, 2) / 8)
  angles = np.concatenate([positions[0, :, None] * inv_freq] * 2, axis=-1)[None, :, None, :]
  rotated = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
  expected = x * np.cos(angles) + rotated * np.sin(angles)
  np.testing.assert_allclose(
      apply_rope(jnp.asarray(x), jnp.asarray(positions), theta), expected, rtol=1e-5, atol=1e-6
  )
  # Positions past the sequence (a window of a cached sequence) read further down the table.
  far = positions + 100
  angles = np.concatenate([far[0, :, None] * inv_freq] * 2, axis=-1)[None, :, None, :]
  np.testing.assert_allclose(
      apply_rope(jnp.asarray(x), jnp.asarray(far), theta, 128),
      x * np.cos(angles) + rotated * np.sin(angles),
      rtol=1e-5,
      atol=1e-5,
  )
  # Position 0 is the identity, and the rotation preserves norms: every head vector's, at every
  # position, near and far.
  near = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), theta))
  np.testing.assert_allclose(near[:, 0], x[:, 0], rtol=1e-6)
  for out in (near, np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(far), theta, 128))):
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_window_against_its_own_cache_equals_the_full_pass(scan_layers):
  """A window computed against keys and values of the same sequence (prefix/dual caches) gives the
  full pass's logits; the cache is the keys and values of every layer."""
  from llada_jax.sampling.cache import window_logits  # pylint: disable=g-import-not-at-top

  config = make_tiny_config()
  config.model.scan_layers = scan_layers
  model = Transformer(ModelConfig.from_config(config))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 3, 200)
  mask = jnp.ones((2, 24), bool).at[0, :3].set(False)
  full = logits(config, params["params"], tokens, mask)
  scale = jnp.float32(0.0)
  first, cache = window_logits(model, params["params"], tokens, mask, None, scale, 10, 18, None)
  again, _ = window_logits(model, params["params"], tokens, mask, None, scale, 10, 18, cache)
  np.testing.assert_allclose(first, full[:, 10:18], atol=1e-5)
  np.testing.assert_allclose(again, full[:, 10:18], atol=1e-5)
  assert cache[0].shape == (
      config.model.n_layers,
      2,
      24,
      config.model.n_kv_heads,
      config.model.d_model // config.model.n_heads,
  )


def test_the_package_builds_the_network_in_one_place():
  """Every caller (trainer, scorers, samplers, importers) gets its module from
  `llada_jax.model.network`: a Transformer built elsewhere could run another configuration of the
  same parameters."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top

  import llada_jax  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(llada_jax.__file__).parent
  builders = sorted(
      str(path.relative_to(root))
      for path in root.rglob("*.py")
      if re.search(r"(?<!class )\bTransformer\(", path.read_text())
  )
  assert builders == ["model/forward.py"]


def test_callers_sample_and_score_through_the_model_object():
  """Evaluation, lm-eval, chat, llada-sample's text path and the GRPO rollouts reach the reverse
  process and the likelihood bound through `MaskedDiffusionLM` (its generate and score), not by
  calling the sampler's or the scorer's function themselves: only lm.py calls them by name (and
  the scorer's one-pair convenience, inside its own module)."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top

  import llada_jax  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(llada_jax.__file__).parent
  callers = sorted(
      f"{path.relative_to(root)}: {name}"
      for path in root.rglob("*.py")
      for line in path.read_text().splitlines()
      if not line.lstrip().startswith("def ")
      for name in re.findall(r"(?<![\w.])(generate|score_pairs)\(", line)
  )
  assert callers == ["diffusion/likelihood.py: score_pairs", "lm.py: generate"]
