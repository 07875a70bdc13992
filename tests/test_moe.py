"""The Mixture-of-Experts mask predictor: routers by hand, grouped matmuls against every expert,
dropless routing alone == batched, router losses and loss-free balancing, training on CPU."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax import config as config_lib
from llada_jax.diffusion.objectives import unpacked_batch
from llada_jax.errors import ConfigError
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.model import ModelConfig, Transformer, moe, routers
from llada_jax.parallel.mesh import make_mesh
from llada_jax.parallel.sharding import axis_rules, batch_sharding
from llada_jax.training.optimizer import make_optimizer
from llada_jax.training.state import create_train_state
from llada_jax.training.step import make_train_step

E, K = 8, 2


def moe_config(**moe_overrides):
  """A tiny llada2_moe-shaped model: a dense first layer, then MoE layers with a shared expert,
  group-limited sigmoid routing, QK-norm and partial rotary."""
  c = make_tiny_config(d_model=32, n_layers=3, mlp_hidden_size=48, qk_norm=True, rotary_dim=4)
  c.model.moe.update(
      dict(
          num_experts=E,
          experts_per_token=K,
          expert_hidden_size=16,
          num_shared_experts=1,
          first_k_dense_replace=1,
          n_group=4,
          topk_group=2,
          routed_scaling_factor=2.5,
      )
  )
  c.model.moe.update(moe_overrides)
  return config_lib.validate(c)


@pytest.fixture(scope="module")
def model_and_params():
  config = moe_config()
  model = Transformer(ModelConfig.from_config(config))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  params = nn.meta.unbox(params)["params"]
  # A non-zero selection bias, so that it and the group limit both change choices.
  bias = jax.random.normal(jax.random.PRNGKey(7), params["moe_blocks"]["moe"]["expert_bias"].shape)
  params["moe_blocks"]["moe"]["expert_bias"] = 0.3 * bias
  return config, model, params


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _numpy_sigmoid_grouped(logits, bias, n_group, topk_group, k, scale):
  """DeepSeek-V3's routing written out token by token with Python sorting."""
  experts, weights = [], []
  for row in np.asarray(logits, np.float64):
    s = _sigmoid(row)
    choice = s + bias
    groups = choice.reshape(n_group, -1)
    group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
    kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
    per = len(row) // n_group
    eligible = [e for e in range(len(row)) if e // per in kept]
    chosen = sorted(eligible, key=lambda e: -choice[e])[:k]
    w = s[chosen] / s[chosen].sum() * scale
    experts.append(chosen)
    weights.append(w)
  return np.array(experts), np.array(weights)


def test_sigmoid_grouped_router_is_deepseek_v3_routing_by_hand():
  logits = jax.random.normal(jax.random.PRNGKey(0), (64, E)) * 2
  bias = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (E,))) * 0.5
  settings = routers.RouterSettings(K, 4, 2, 2.5, True)
  got = routers.sigmoid_grouped(logits, jnp.asarray(bias), settings)
  experts, weights = _numpy_sigmoid_grouped(logits, bias, 4, 2, K, 2.5)
  np.testing.assert_array_equal(np.sort(got.experts, 1), np.sort(experts, 1))
  order = np.argsort(got.experts, 1), np.argsort(experts, 1)
  np.testing.assert_allclose(
      np.take_along_axis(np.asarray(got.weights), order[0], 1),
      np.take_along_axis(weights, order[1], 1),
      rtol=1e-5,
  )
  # The group limit and the bias each change some choices (the test can see both).
  ungrouped, _ = _numpy_sigmoid_grouped(logits, bias, 1, 1, K, 2.5)
  unbiased, _ = _numpy_sigmoid_grouped(logits, 0 * bias, 4, 2, K, 2.5)
  assert (np.sort(ungrouped, 1) != np.sort(experts, 1)).any(axis=1).sum() >= 3
  assert (np.sort(unbiased, 1) != np.sort(experts, 1)).any(axis=1).sum() >= 3


def test_softmax_router_keeps_the_probabilities_unnormalised():
  logits = jax.random.normal(jax.random.PRNGKey(2), (16, E))
  got = routers.softmax(logits, jnp.zeros(E), routers.RouterSettings(K, 1, 1, 1.0, False))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.argsort(-p, 1)[:, :K]
  np.testing.assert_array_equal(got.experts, top)
  np.testing.assert_allclose(got.weights, np.take_along_axis(p, top, 1), rtol=1e-5)


def test_grouped_matmuls_equal_every_expert_in_value_and_gradient(model_and_params):
  config, model, params = model_and_params
  dense = Transformer(
      dataclasses.replace(model.cfg, moe=dataclasses.replace(model.cfg.moe, implementation="dense"))
  )
  tokens = jax.random.randint(jax.random.PRNGKey(3), (3, 12), 0, 200)

  def loss(m, p):
    return jnp.sum(jnp.sin(m.apply({"params": p}, tokens)))

  np.testing.assert_allclose(
      jax.jit(model.apply)({"params": params}, tokens),
      jax.jit(dense.apply)({"params": params}, tokens),
      atol=2e-5,
  )
  g_ragged, g_dense = (
      jax.jit(jax.grad(functools.partial(loss, m)))(params) for m in (model, dense)
  )
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), g_ragged, g_dense
  )
  assert float(jnp.abs(g_ragged["moe_blocks"]["moe"]["wi_gate"]).max()) > 0
  np.testing.assert_array_equal(g_ragged["moe_blocks"]["moe"]["expert_bias"], 0)  # no gradient


def test_moe_output_of_a_row_alone_equals_it_in_a_mixed_padded_batch(model_and_params):
  """Dropless routing: no capacity, so a row never depends on its batch (left padding included)."""
  _, model, params = model_and_params
  from llada_jax.model.forward import apply_model  # pylint: disable=g-import-not-at-top

  rows = [
      jax.random.randint(jax.random.PRNGKey(10 + i), (n,), 0, 200).tolist()
      for i, n in enumerate((12, 5, 1))
  ]
  forward = jax.jit(functools.partial(apply_model, model))
  width = 12
  tokens = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    tokens[i, width - len(r) :], mask[i, width - len(r) :] = r, True
  batched = forward(params, jnp.asarray(tokens), jnp.asarray(mask))
  for i, r in enumerate(rows):
    alone = forward(params, jnp.asarray([r]), jnp.ones((1, len(r)), bool))
    # Float32 matmuls of another batch shape may round differently (1e-7); a dropped or
    # re-routed token would change its output by O(1).
    np.testing.assert_allclose(batched[i, width - len(r) :], alone[0], atol=1e-5)


def test_scanned_and_unscanned_layers_compute_the_same_network(model_and_params):
  config, model, params = model_and_params
  unscanned = Transformer(dataclasses.replace(model.cfg, scan_layers=False))
  layers = {"blocks_0": jax.tree.map(lambda a: a[0], params["blocks"])}
  for i in range(2):
    layers[f"blocks_{i + 1}"] = jax.tree.map(lambda a, i=i: a[i], params["moe_blocks"])
  flat = {k: v for k, v in params.items() if not k.endswith("blocks")} | layers
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 10), 0, 200)
  a, aux_a = jax.jit(functools.partial(model.apply, return_aux=True))({"params": params}, tokens)
  b, aux_b = jax.jit(functools.partial(unscanned.apply, return_aux=True))({"params": flat}, tokens)
  np.testing.assert_allclose(a, b, atol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), aux_a, aux_b)
  assert aux_a["load"].shape == (2, E)


def test_router_statistics_by_hand():
  experts = jnp.asarray([[0, 1], [0, 2], [3, 0]])
  probs = jnp.full((3, 4), 0.25)
  logits = jnp.log(probs) + jnp.asarray([[0.0], [1.0], [2.0]])
  routing = routers.Routing(experts, jnp.ones((3, 2)), probs)
  valid = jnp.asarray([1.0, 1.0, 0.0])  # the third token is padding
  stats = moe.router_statistics(logits, routing, valid, 4)
  np.testing.assert_allclose(stats["load"], [0.5, 0.25, 0.25, 0.0])
  np.testing.assert_allclose(stats["aux_loss"], 4 * (0.5 + 0.25 + 0.25) * 0.25)  # = 1: uniform P
  np.testing.assert_allclose(stats["z_loss"], (0.0**2 + 1.0**2) / 2, atol=1e-6)
  np.testing.assert_allclose(stats["entropy"], np.log(4), rtol=1e-6)


def test_loss_free_balancing_moves_the_bias_against_the_load():
  params = {"moe_blocks": {"moe": {"expert_bias": jnp.zeros((2, 4)), "gate": jnp.ones((2, 3, 4))}}}
  load = jnp.asarray([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.5, 0.0]])
  out = moe.balance_expert_bias(params, load, 0.01)
  np.testing.assert_allclose(
      out["moe_blocks"]["moe"]["expert_bias"], [[-0.01, -0.01, 0.01, 0.01], [0, 0, -0.01, 0.01]]
  )
  assert out["moe_blocks"]["moe"]["gate"] is params["moe_blocks"]["moe"]["gate"]
  unscanned = {
      "blocks_0": {"ff_proj": 1},
      "blocks_2": {"moe": {"expert_bias": jnp.zeros(4)}},
      "blocks_10": {"moe": {"expert_bias": jnp.zeros(4)}},
  }
  out = moe.balance_expert_bias(unscanned, load, 0.01)
  np.testing.assert_allclose(out["blocks_10"]["moe"]["expert_bias"], [0, 0, -0.01, 0.01])


def test_a_tiny_moe_trains_balances_and_logs_its_router():
  config = moe_config(aux_loss_coef=0.01, z_loss_coef=1e-3, bias_update_rate=1e-3)
  config.model.update(d_model=64, init_std=0.125)  # 1/sqrt(d_model)
  config.diffusion.random_length_prob = 0.0
  mesh = make_mesh(config, jax.devices()[:1])
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  state, shardings = create_train_state(config, model, tx, mesh)
  step = make_train_step(config, model, tx, mesh, shardings)
  rows, cols = np.indices((config.data.batch_size, config.data.sequence_length))
  batch = jax.device_put(
      unpacked_batch(jnp.asarray((rows + cols) % 11 + 3)), batch_sharding(mesh, axis_rules(config))
  )
  losses = []
  for _ in range(80):
    bias_before = np.asarray(state.params["moe_blocks"]["moe"]["expert_bias"])
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  # The dense twin of this model falls from 5.05 to 3.44 in 80 steps; this one 5.34 -> 3.42.
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  load = np.asarray(metrics["router/load"])
  assert load.shape == (2, E)
  np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-5)
  # The last step moved each bias by exactly rate * sign(mean load - load): nothing else touches it.
  np.testing.assert_allclose(
      np.asarray(state.params["moe_blocks"]["moe"]["expert_bias"]) - bias_before,
      1e-3 * np.sign(load.mean(-1, keepdims=True) - load),
      atol=1e-7,
  )
  for name in ("router/aux_loss", "router/z_loss", "router/entropy", "router/load_ratio"):
    assert np.isfinite(float(metrics[name])), name


@pytest.mark.parametrize("remat", ["none", "full"])
def test_block_sft_trains_a_moe_in_bf16_and_balances_its_experts(remat):
  """Block diffusion SFT (prompt clean, blocks of 8) of the MoE model with bf16 compute, with and
  without remat: the loss is finite and falls over 20 steps, and the expert bias moves by the
  balancing rule at every step of this objective too."""
  config = moe_config(bias_update_rate=1e-3)
  config.model.update(dtype="bfloat16", remat=remat)
  config.diffusion.update(objective="block", block_size=8)
  config = config_lib.validate(config)
  mesh = make_mesh(config, jax.devices()[:1])
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  state, shardings = create_train_state(config, model, tx, mesh)
  step = make_train_step(config, model, tx, mesh, shardings)
  rows, cols = np.indices((config.data.batch_size, config.data.sequence_length))
  batch = unpacked_batch(
      jnp.asarray((rows + cols) % 11 + 3),
      prompt_length=jnp.asarray(3 + rows[:, 0] % 5, jnp.int32),
  )
  batch = jax.device_put(batch, batch_sharding(mesh, axis_rules(config)))
  losses = []
  for _ in range(20):
    bias_before = np.asarray(state.params["moe_blocks"]["moe"]["expert_bias"])
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
  load = np.asarray(metrics["router/load"])
  np.testing.assert_allclose(
      np.asarray(state.params["moe_blocks"]["moe"]["expert_bias"]) - bias_before,
      1e-3 * np.sign(load.mean(-1, keepdims=True) - load),
      atol=1e-7,
  )


def _steps(config, devices, tokens, steps=2):
  mesh = make_mesh(config, devices)
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  state, shardings = create_train_state(config, model, tx, mesh)
  step = make_train_step(config, model, tx, mesh, shardings)
  batch = jax.device_put(unpacked_batch(tokens), batch_sharding(mesh, axis_rules(config)))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses, shardings, metrics


def test_expert_parallel_steps_equal_one_device():
  """Loss, router metrics and updated parameters (so the gradients) of two steps on an 8-device
  fsdp x expert x tensor mesh — the experts split over `expert` (tokens exchanged by all-to-all),
  their weights gathered over fsdp, their hidden width split over tensor — equal one device's."""
  config = moe_config(aux_loss_coef=0.01, bias_update_rate=1e-3)
  config.model.update(d_model=64, n_heads=4)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (8, config.data.sequence_length), 3, 40)
  one, one_losses, _, one_metrics = _steps(config, jax.devices()[:1], tokens)
  config.mesh.update(dict(data=1, fsdp=2, expert=2, tensor=2))
  many, many_losses, shardings, many_metrics = _steps(config, jax.devices()[:8], tokens)
  wi = shardings.params["moe_blocks"]["moe"]["wi_gate"].spec
  assert wi[1] == "expert", wi  # [layers, exp, embed, mlp]: the experts are split
  np.testing.assert_allclose(one_losses, many_losses, rtol=1e-5)
  np.testing.assert_allclose(one_metrics["router/load"], many_metrics["router/load"], atol=1e-6)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      jax.device_get(one.params),
      jax.device_get(many.params),
  )


@pytest.mark.parametrize("skewed", [False, True], ids=["balanced", "every-token-to-one-shard"])
@pytest.mark.parametrize("capacity", [0.25, 2.0])
def test_the_expert_exchange_is_dropless_under_any_load(skewed, capacity):
  """The exchange over 4 expert shards gives every expert's output and the gradients of the
  tokens and expert weights of one device computing every expert (`dense_experts`), whatever
  the load: with every token routed to the first shard and a quarter of a balanced share per
  round, each pair needs 16 rounds."""
  tokens, d, f, ep = 64, 16, 8, 4
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  x = jax.random.normal(keys[0], (tokens, d))
  weights = tuple(
      0.3 * jax.random.normal(key, shape)
      for key, shape in zip(keys[1:4], [(E, d, f), (E, d, f), (E, f, d)])
  )
  logits = jax.random.normal(keys[4], (tokens, E)) + (10.0 * (jnp.arange(E) < 2) if skewed else 0)
  experts = jnp.argsort(-logits, axis=1)[:, :K].astype(jnp.int32)
  routing = routers.Routing(experts, jax.nn.softmax(jnp.take_along_axis(logits, experts, 1)), None)
  mesh = jax.make_mesh((ep,), ("expert",), devices=jax.devices()[:ep])
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))

  def exchanged(x, weights, experts, routing_weights):
    def local(x, experts, routing_weights, *weights):
      shard_routing = routers.Routing(experts, routing_weights, None)
      return moe._exchange(x, shard_routing, weights, ("expert",), capacity)

    spec = split.spec
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec, check_vma=False)(
        x, experts, routing_weights, *weights
    )

  def every_expert(x, weights, experts, routing_weights):
    return moe.dense_experts(x, routers.Routing(experts, routing_weights, None), weights)

  def value_and_grads(fn, args):
    loss = lambda x, w, *rest: jnp.sum(jnp.sin(fn(x, w, *rest)))
    return jax.jit(fn)(*args), jax.jit(jax.grad(loss, (0, 1)))(*args)

  args = (x, weights, routing.experts, routing.weights)
  want = value_and_grads(every_expert, args)
  got = value_and_grads(exchanged, jax.device_put(args, split))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), want, got)


def _post_training_loss(method, config, params, reference):
  """(loss, metrics) of one post-training batch of `method` on the tiny vocabulary."""
  # pylint: disable=import-outside-toplevel
  from llada_jax.posttrain.dpo import dpo_objective, pack_preferences
  from llada_jax.posttrain.grpo import Rollouts, grpo_objective
  from llada_jax.posttrain.preference import PreferencePair

  if method == "dpo":
    pairs = [
        PreferencePair((5, 6, 7), (8, 9, 10), (11, 12)),
        PreferencePair((20,), (21, 22), (23,)),
    ]
    batch = pack_preferences(pairs, [0, 1], seed=0)
    return dpo_objective(config)(params, batch, None, 0, reference)
  width, answer = 4, config.sampling.gen_length
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, width + answer), 3, 40)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(6), i))(jnp.arange(2))
  is_answer = jnp.arange(width + answer)[None, :].repeat(2, 0) >= width
  rollouts = Rollouts(
      tokens, jnp.ones(tokens.shape, bool), is_answer, jnp.array([1.0, -1.0]), keys, jnp.zeros(2)
  )
  return grpo_objective(config, width)(params, rollouts, None, 0, reference)


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_post_training_keeps_a_moe_policys_router_terms(method):
  """DPO's and GRPO's training losses of a MoE policy gain its router terms as pre-training's
  do: with aux and z coefficients the loss is the loss without plus coefficient x each term, and
  router/load [MoE layers, experts] (what the train step's expert-bias update reads) sums to 1 per
  layer."""
  base = moe_config()
  params = nn.meta.unbox(MaskedDiffusionLM(base).init(jax.random.PRNGKey(0)))
  reference = nn.meta.unbox(MaskedDiffusionLM(base).init(jax.random.PRNGKey(1)))
  plain, _ = _post_training_loss(method, base, params, reference)
  weighted = moe_config(aux_loss_coef=0.5, z_loss_coef=0.25)
  loss, metrics = _post_training_loss(method, weighted, params, reference)
  load = np.asarray(metrics["router/load"])
  assert load.shape == (weighted.model.n_layers - 1, E), load.shape
  np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-5)
  want = plain + 0.5 * metrics["router/aux_loss"] + 0.25 * metrics["router/z_loss"]
  assert float(metrics["router/aux_loss"]) > 0 and float(metrics["router/z_loss"]) > 0
  np.testing.assert_allclose(loss, want, rtol=1e-6)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("experts_per_token", 9, "at most model.moe.num_experts=8"),
        ("n_group", 3, "a divisor of model.moe.num_experts=8"),
        ("topk_group", 5, "at most n_group=4"),
        ("router", "top1", "sigmoid_grouped"),
        ("first_k_dense_replace", 4, "[0, model.n_layers=3]"),
        ("implementation", "gmm", "ragged"),
    ],
)
def test_bad_moe_settings_are_named(field, value, message):
  config = moe_config()
  config.model.moe[field] = value
  with pytest.raises(ConfigError, match=f"model.moe.{field}.*{message[:12]}".replace("[", r"\[")):
    config_lib.validate(config)


def test_an_old_stored_config_loads_as_a_dense_model():
  stored = json.loads(config_lib.to_json(make_tiny_config()))
  for key in ("moe", "qk_norm", "rotary_dim"):
    del stored["model"][key]
  config = config_lib.from_json(json.dumps(stored))
  assert config.model.moe.num_experts == 0 and not config.model.qk_norm
  assert ModelConfig.from_config(config).dense_layers == config.model.n_layers


def test_the_held_out_bound_leaves_out_router_losses_and_training_terms():
  """The trainer's validation loss is the bound: a softmax-routed MoE with aux and z losses and
  CAP on gives the eval step exactly the bound of the same model with all three off (whose
  training losses differ)."""
  from llada_jax.training.step import make_eval_step  # pylint: disable=import-outside-toplevel

  plain = moe_config(router="softmax", n_group=1, topk_group=1, routed_scaling_factor=1.0)
  loaded = config_lib.from_json(config_lib.to_json(plain))
  loaded.model.moe.update(dict(aux_loss_coef=0.5, z_loss_coef=0.5))
  loaded.diffusion.cap_weight = 1.0
  loaded = config_lib.validate(loaded)
  mesh = make_mesh(plain, jax.devices()[:1], check_batch=False)
  batch = unpacked_batch(jax.random.randint(jax.random.PRNGKey(1), (8, 32), 0, 250))
  held_out, training = [], []
  for config in (plain, loaded):
    lm, tx = MaskedDiffusionLM(config), make_optimizer(config)
    state, shardings = create_train_state(config, lm, tx, mesh)
    held_out.append(
        float(make_eval_step(config, lm, mesh, shardings.params)(state.params, batch, 0))
    )
    training.append(float(lm.loss(state.params, batch, jax.random.PRNGKey(2))[0]))
  assert held_out[1] == held_out[0]
  assert training[1] > training[0] + 1e-3
