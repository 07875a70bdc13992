"""The Mixture-of-Experts feed-forward of the LLaDA 2.x / LLaDA-MoE mask predictors.

Routed SwiGLU experts (the router of `llada_jax.model.routers` picks k per token) plus optional
shared experts that every token passes through. Routing is dropless: no capacity, no token ever
dropped, so a token's output is a function of that token alone and never of its batch.

Two implementations of the routed experts, chosen by `model.moe.implementation`:
  "ragged": the k copies of every token sorted by expert and run through three grouped matmuls
    (`jax.lax.ragged_dot`): FLOPs of the active experts only. The production path.
  "dense": every expert on every token, combined with the routing weights (E/k times the FLOPs);
    a transparent reference for tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llada_jax.model.layers import dense_init
from llada_jax.parallel import kernels
from llada_jax.model.routers import ROUTERS, RouterSettings, Routing

ExpertWeights = tuple[jax.Array, jax.Array, jax.Array]  # gate, up [E, d, f]; down [E, f, d]


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """The `model.moe` section of the config (llada_jax.config documents each field).

  num_experts == 0 is a dense model; otherwise layers first_k_dense_replace.. are MoE layers."""

  num_experts: int
  experts_per_token: int
  expert_hidden_size: int
  num_shared_experts: int
  first_k_dense_replace: int
  router: str
  n_group: int
  topk_group: int
  routed_scaling_factor: float
  norm_topk_prob: bool
  implementation: str
  exchange_capacity: float
  aux_loss_coef: float
  z_loss_coef: float
  bias_update_rate: float

  @property
  def router_settings(self) -> RouterSettings:
    return RouterSettings(
        self.experts_per_token,
        self.n_group,
        self.topk_group,
        self.routed_scaling_factor,
        self.norm_topk_prob,
    )


def _swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  return (nn.silu(x @ gate) * (x @ up)) @ down


def _grouped_swiglu(
    grouped: jax.Array, group_sizes: jax.Array, weights: ExpertWeights
) -> jax.Array:
  """SwiGLU outputs [n, d] of rows [n, d] sorted by expert, group_sizes[e] rows for expert e
  (three `jax.lax.ragged_dot`s); rows past sum(group_sizes) give 0."""
  gate, up, down = weights
  hidden = nn.silu(jax.lax.ragged_dot(grouped, gate, group_sizes)) * jax.lax.ragged_dot(
      grouped, up, group_sizes
  )
  return jax.lax.ragged_dot(hidden, down, group_sizes)


def _local_experts(rows: jax.Array, ids: jax.Array, weights: ExpertWeights) -> jax.Array:
  """This shard's expert outputs [n, d] of rows [n, d], row i through expert ids[i] of the
  E_local in `weights`; an id of E_local marks a padding row, whose output is 0."""
  local = weights[0].shape[0]
  order = jnp.argsort(ids, stable=True)
  group_sizes = jnp.bincount(ids, length=local + 1)[:local].astype(jnp.int32)
  out = _grouped_swiglu(rows[order], group_sizes, weights)
  return jnp.zeros_like(rows).at[order].set(out, unique_indices=True)


def ragged_experts(x: jax.Array, routing: Routing, weights: ExpertWeights) -> jax.Array:
  """Routed expert outputs [T, d] of tokens x [T, d] by grouped matmuls.

  The T*k (token, expert) pairs are sorted by expert (stable, so by token within an expert), each
  expert's rows go through its SwiGLU as one group of `jax.lax.ragged_dot`, and the results return
  to their tokens, weighted and summed over the k choices in choice order."""
  tokens, k = routing.experts.shape
  flat = routing.experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=weights[0].shape[0]).astype(jnp.int32)
  out = _grouped_swiglu(x[order // k], group_sizes, weights)
  out = jnp.zeros_like(out).at[order].set(out, unique_indices=True).reshape(tokens, k, -1)
  return jnp.sum(out * routing.weights[..., None].astype(out.dtype), axis=1)


def dense_experts(x: jax.Array, routing: Routing, weights: ExpertWeights) -> jax.Array:
  """The same as `ragged_experts`, computing every expert on every token (tests' reference)."""
  gate, up, down = weights
  every = jax.vmap(_swiglu, in_axes=(None, 0, 0, 0), out_axes=1)(x, gate, up, down)  # [T, E, d]
  chosen = jnp.take_along_axis(every, routing.experts[..., None], axis=1)  # [T, k, d]
  return jnp.sum(chosen * routing.weights[..., None].astype(chosen.dtype), axis=1)


@dataclasses.dataclass(frozen=True)
class _Exchange:
  """The static plan of one shard's token exchange: `capacity` rows per (source, destination)
  pair per round, over the mesh axes `axes` holding ep shards of the experts."""

  capacity: int
  axes: tuple[str, ...]
  ep: int

  def rounds(self, send: jax.Array) -> jax.Array:
    """Rounds every shard of the exchange runs: its busiest pair's rows over the capacity."""
    return jax.lax.pmax(jnp.max(-(-send // self.capacity)), self.axes)

  def slots(self, send: jax.Array, r: jax.Array) -> jax.Array:
    """[ep, capacity] positions in the destination-sorted rows of round r, n (past the end) for an
    empty slot; send [ep] counts the rows for each destination."""
    n_rows = jnp.sum(send)
    position = r * self.capacity + jnp.arange(self.capacity)
    start = jnp.cumsum(send) - send
    return jnp.where(position < send[:, None], start[:, None] + position, n_rows)

  def swap(self, a: jax.Array) -> jax.Array:
    """[ep, capacity, ...] by destination -> the same by source (an all-to-all)."""
    return jax.lax.all_to_all(a, self.axes, 0, 0, tiled=True)


def _take(a: jax.Array, slots: jax.Array, empty: Any) -> jax.Array:
  """a's rows at `slots` [ep, capacity]; an empty slot (past the end) reads `empty`."""
  return a.at[slots].get(mode="fill", fill_value=empty)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _exchanged_experts(
    plan: _Exchange, rows: jax.Array, ids: jax.Array, send: jax.Array, weights: ExpertWeights
) -> jax.Array:
  """Expert outputs [n, d] of this shard's rows [n, d], sorted by destination shard (send [ep]
  rows each), row i for expert ids[i] of its destination's E_local, computed where the experts
  live. Rounds of one all-to-all there and one back move at most plan.capacity rows per pair,
  as many rounds as the busiest pair of the exchange needs: dropless, and the buffers are
  ep * capacity rows whatever the load. Differentiated by `_exchange_vjp`, which reruns the
  rounds (a while loop has no reverse-mode derivative)."""
  return _exchange_forward(plan, rows, ids, send, weights)[0]


def _exchange_forward(
    plan: _Exchange, rows: jax.Array, ids: jax.Array, send: jax.Array, weights: ExpertWeights
) -> tuple[jax.Array, Any]:
  """(`_exchanged_experts`'s output, the residuals its VJP reads: its inputs)."""
  local = weights[0].shape[0]

  def one_round(carry):
    r, out = carry
    slots = plan.slots(send, r)
    received = plan.swap(_take(rows, slots, 0)).reshape(-1, rows.shape[-1])
    y = _local_experts(received, plan.swap(_take(ids, slots, local)).reshape(-1), weights)
    back = plan.swap(y.reshape(plan.ep, plan.capacity, -1))
    return r + 1, out.at[slots].set(back, mode="drop")

  rounds = plan.rounds(send)
  _, out = jax.lax.while_loop(
      lambda carry: carry[0] < rounds, one_round, (jnp.int32(0), jnp.zeros_like(rows))
  )
  return out, (rows, ids, send, weights)


def _exchange_vjp(plan: _Exchange, residuals: Any, cotangent: jax.Array) -> tuple[Any, ...]:
  """Cotangents of (rows, ids, send, weights) from the output's: each round sends its rows and
  their output cotangents to the experts' shard, which pulls them back through its experts and
  returns the rows' cotangents; the weights' accumulate over the rounds in float32."""
  rows, ids, send, weights = residuals
  local = weights[0].shape[0]

  def one_round(carry):
    r, d_rows, d_weights = carry
    slots = plan.slots(send, r)
    received, received_ct = (
        plan.swap(_take(a, slots, 0)).reshape(-1, rows.shape[-1]) for a in (rows, cotangent)
    )
    received_ids = plan.swap(_take(ids, slots, local)).reshape(-1)
    _, pullback = jax.vjp(lambda x, w: _local_experts(x, received_ids, w), received, weights)
    d_received, d_w = pullback(received_ct)
    back = plan.swap(d_received.reshape(plan.ep, plan.capacity, -1))
    d_weights = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), d_weights, d_w)
    return r + 1, d_rows.at[slots].set(back, mode="drop"), d_weights

  rounds = plan.rounds(send)
  zeros = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), weights)
  _, d_rows, d_weights = jax.lax.while_loop(
      lambda carry: carry[0] < rounds, one_round, (jnp.int32(0), jnp.zeros_like(rows), zeros)
  )
  d_weights = jax.tree.map(lambda g, w: g.astype(w.dtype), d_weights, weights)
  return d_rows, None, None, d_weights


_exchanged_experts.defvjp(_exchange_forward, _exchange_vjp)


def _exchange(
    x: jax.Array,
    routing: Routing,
    weights: ExpertWeights,
    axes: tuple[str, ...],
    capacity: float,
) -> jax.Array:
  """`ragged_experts` with the experts split over the mesh axes `axes` (expert parallelism), run
  per shard: x [t, d] and routing are this shard's tokens, weights its E / ep experts.

  The t*k (token, expert) pairs, sorted by expert and so by the shard holding it, go there in
  rounds of at most ceil(capacity * t * k / ep) rows per shard pair (`model.moe.exchange_capacity`:
  1 is a perfectly balanced load's share), run through that shard's experts as grouped matmuls,
  and come back, as many rounds as the busiest pair needs (`_exchanged_experts`). No token is ever
  dropped, and memory and bytes per round do not grow with ep."""
  tokens, k = routing.experts.shape
  local = weights[0].shape[0]
  ep = jax.lax.psum(1, axes)
  plan = _Exchange(max(1, math.ceil(capacity * tokens * k / ep)), axes, ep)
  flat = routing.experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  chosen = flat[order]
  send = jnp.bincount(chosen // local, length=ep)
  out = _exchanged_experts(plan, x[order // k], chosen % local, send, weights)
  back = jnp.zeros_like(out).at[order].set(out, unique_indices=True).reshape(tokens, k, -1)
  return jnp.sum(back * routing.weights[..., None].astype(back.dtype), axis=1)


def routed_experts(
    x: jax.Array,
    routing: Routing,
    weights: ExpertWeights,
    implementation: str,
    exchange_capacity: float,
) -> jax.Array:
  """The routed experts' output [B, L, d] of x [B, L, d] (routing over its B*L tokens, row-major).

  On a device mesh (`jax.set_mesh`, as the trainer, sampler and scorer run) the work is done
  shard by shard (`shard_map`): each device sorts and runs only its own tokens, so no activation
  is gathered across the batch; with the logical axis "exp" on mesh axes of size ep > 1 the
  experts are split over them and exchanged by all-to-all (`_exchange`); a split hidden width
  ("mlp", tensor parallelism) is summed over its axes. Off a mesh, `IMPLEMENTATIONS`.
  exchange_capacity: the exchange's rows per shard pair per round over a balanced share
  (`model.moe.exchange_capacity`; `_exchange`); it changes memory and rounds, never the result.
  """
  mesh = kernels.trace_mesh()
  batch, length, d = x.shape
  if mesh is None or mesh.size == 1:
    flat = IMPLEMENTATIONS[implementation](x.reshape(batch * length, d), routing, weights)
    return flat.reshape(batch, length, d)
  gate = weights[0]
  expert_axes = _split_axes(kernels.logical_spec(gate.shape, ("exp", None, "mlp"), mesh))

  def local(xs, experts, probs_weights, gate, up, down):
    t = xs.shape[0] * xs.shape[1]
    local_routing = Routing(experts.reshape(t, -1), probs_weights.reshape(t, -1), None)
    tokens = xs.reshape(t, d)
    if expert_axes[0]:
      y = _exchange(tokens, local_routing, (gate, up, down), expert_axes[0], exchange_capacity)
    else:
      y = IMPLEMENTATIONS[implementation](tokens, local_routing, (gate, up, down))
    if expert_axes[2]:
      y = jax.lax.psum(y, expert_axes[2])
    return y.reshape(xs.shape)

  activation = ("activation_batch", "activation_length", None)
  k = routing.experts.shape[-1]
  return kernels.shard_map_logical(
      local,
      (
          x,
          routing.experts.reshape(batch, length, k),
          routing.weights.reshape(batch, length, k),
          *weights,
      ),
      (
          activation,
          activation,
          activation,
          ("exp", None, "mlp"),
          ("exp", None, "mlp"),
          ("exp", "mlp", None),
      ),
      activation,
      x.shape,
  )


def _split_axes(spec: Any) -> tuple[tuple[str, ...], ...]:
  """Per dimension of a PartitionSpec, the tuple of mesh axes it is split over (() if none)."""
  return (
      tuple(() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec) + ((),) * 3
  )


# model.moe.implementation -> the routed-expert computation (llada_jax.config.MOE_IMPLEMENTATIONS).
IMPLEMENTATIONS: dict[str, Callable[[jax.Array, Routing, ExpertWeights], jax.Array]] = {
    "ragged": ragged_experts,
    "dense": dense_experts,
}


def router_statistics(
    logits: jax.Array, routing: Routing, valid: jax.Array, num_experts: int
) -> dict[str, jax.Array]:
  """Per-layer router facts over the valid tokens (valid: float32 [T], 1 for a real token).

  load [E]: the fraction of the valid tokens' T*k choices that went to each expert (sums to 1);
  aux_loss: the load-balancing loss E * sum_e f_e * P_e with f_e = load_e and P_e the mean router
  probability (Switch Transformer, arXiv 2101.03961 eq. 4; 1 when perfectly balanced);
  z_loss: the mean squared logsumexp of the router logits (ST-MoE, arXiv 2202.08906 eq. 5);
  entropy: the mean entropy of the router's per-token distribution `probs`, in nats.
  """
  count = jnp.maximum(jnp.sum(valid), 1.0)
  chosen = jnp.sum(jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32), axis=1)
  load = jnp.sum(chosen * valid[:, None], axis=0) / (count * routing.experts.shape[1])
  mean_probs = jnp.sum(routing.probs * valid[:, None], axis=0) / count
  z = jnp.square(jax.nn.logsumexp(logits, axis=-1))
  entropy = -jnp.sum(routing.probs * jnp.log(jnp.maximum(routing.probs, 1e-30)), axis=-1)
  return {
      "load": load,
      "aux_loss": num_experts * jnp.sum(load * mean_probs),
      "z_loss": jnp.sum(z * valid) / count,
      "entropy": jnp.sum(entropy * valid) / count,
  }


class MoEFeedForward(nn.Module):
  """x [B, L, d] -> (y [B, L, d], router statistics of `router_statistics`).

  Parameters: `gate` [embed, exp] (router, applied in float32), `expert_bias` [exp] (the
  selection bias of LLaDA 2.x's loss-free balancing, updated by the train step outside the
  gradient), `wi_gate`, `wi_up` [exp, embed, mlp], `wo` [exp, mlp, embed], and with shared
  experts `shared_gate`, `shared_up` [embed, mlp], `shared_down` [mlp, embed] (one SwiGLU of
  width expert_hidden_size * num_shared_experts).

  valid: optional bool [B, L]; only valid tokens count in the statistics (every token is routed).
  """

  moe: MoEConfig
  d_model: int
  init_std: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(
      self, x: jax.Array, valid: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    m, d = self.moe, self.d_model
    batch, length, _ = x.shape
    tokens = x.reshape(batch * length, d).astype(self.dtype)

    def param(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
      return self.param(name, dense_init(self.init_std, axes), shape, self.param_dtype)

    router = param("gate", (d, m.num_experts), ("embed", "exp"))
    bias = self.param(
        "expert_bias",
        nn.with_logical_partitioning(nn.initializers.zeros, ("exp",)),
        (m.num_experts,),
        jnp.float32,
    )
    logits = jnp.dot(tokens.astype(jnp.float32), router.astype(jnp.float32))
    routing = ROUTERS[m.router](logits, bias, m.router_settings)
    # The choices, for whoever asks (apply(..., mutable="intermediates")): parity tests.
    self.sow("intermediates", "experts", routing.experts.reshape(batch, length, -1))

    f = m.expert_hidden_size
    experts = tuple(
        param(name, shape, axes).astype(self.dtype)
        for name, shape, axes in (
            ("wi_gate", (m.num_experts, d, f), ("exp", "embed", "mlp")),
            ("wi_up", (m.num_experts, d, f), ("exp", "embed", "mlp")),
            ("wo", (m.num_experts, f, d), ("exp", "mlp", "embed")),
        )
    )
    y = routed_experts(
        tokens.reshape(batch, length, d), routing, experts, m.implementation, m.exchange_capacity
    ).reshape(batch * length, d)
    if m.num_shared_experts:
      width = f * m.num_shared_experts
      y = y + _swiglu(
          tokens,
          param("shared_gate", (d, width), ("embed", "mlp")).astype(self.dtype),
          param("shared_up", (d, width), ("embed", "mlp")).astype(self.dtype),
          param("shared_down", (width, d), ("mlp", "embed")).astype(self.dtype),
      )
    valid_tokens = (
        jnp.ones((batch * length,), jnp.float32)
        if valid is None
        else valid.reshape(-1).astype(jnp.float32)
    )
    stats = router_statistics(logits, routing, valid_tokens, m.num_experts)
    return y.reshape(batch, length, d).astype(x.dtype), stats


def balance_expert_bias(params: Any, load: jax.Array, rate: float) -> Any:
  """params with every MoE layer's `expert_bias` moved by loss-free balancing (DeepSeek-V3,
  arXiv 2412.19437 Sec. 2.1.2; LLaDA 2.x): bias_e += rate * sign(mean load - load_e), so an
  overloaded expert is chosen less and an idle one more. load: float32 [MoE layers, experts], the
  step's `router/load` metric (`llada_jax.diffusion.objectives.with_router_losses`), in layer
  order; scanned MoE layers hold their biases stacked [MoE layers, experts], unscanned ones one
  per `blocks_i` in increasing i. Not a gradient step: the train step applies it after the
  optimizer's update."""
  delta = rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
  if "moe_blocks" in params:
    layer = params["moe_blocks"]["moe"]
    return {
        **params,
        "moe_blocks": {
            **params["moe_blocks"],
            "moe": {**layer, "expert_bias": layer["expert_bias"] + delta.astype(jnp.float32)},
        },
    }
  names = sorted(
      (name for name in params if name.startswith("blocks_") and "moe" in params[name]),
      key=lambda name: int(name.split("_")[1]),
  )
  out = dict(params)
  for row, name in enumerate(names):
    layer = params[name]["moe"]
    out[name] = {**params[name], "moe": {**layer, "expert_bias": layer["expert_bias"] + delta[row]}}
  return out
