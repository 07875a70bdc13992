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


def ragged_experts(x: jax.Array, routing: Routing, weights: ExpertWeights) -> jax.Array:
  """Routed expert outputs [T, d] of tokens x [T, d] by grouped matmuls.

  The T*k (token, expert) pairs are sorted by expert (stable, so by token within an expert), each
  expert's rows go through its SwiGLU as one group of `jax.lax.ragged_dot`, and the results return
  to their tokens, weighted and summed over the k choices in choice order."""
  gate, up, down = weights
  tokens, k = routing.experts.shape
  flat = routing.experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
  rows = x[order // k]
  hidden = nn.silu(jax.lax.ragged_dot(rows, gate, group_sizes)) * jax.lax.ragged_dot(
      rows, up, group_sizes
  )
  out = jax.lax.ragged_dot(hidden, down, group_sizes)
  out = jnp.zeros_like(out).at[order].set(out, unique_indices=True).reshape(tokens, k, -1)
  return jnp.sum(out * routing.weights[..., None].astype(out.dtype), axis=1)


def dense_experts(x: jax.Array, routing: Routing, weights: ExpertWeights) -> jax.Array:
  """The same as `ragged_experts`, computing every expert on every token (tests' reference)."""
  gate, up, down = weights
  every = jax.vmap(_swiglu, in_axes=(None, 0, 0, 0), out_axes=1)(x, gate, up, down)  # [T, E, d]
  chosen = jnp.take_along_axis(every, routing.experts[..., None], axis=1)  # [T, k, d]
  return jnp.sum(chosen * routing.weights[..., None].astype(chosen.dtype), axis=1)


def _exchange(
    x: jax.Array, routing: Routing, weights: ExpertWeights, axes: tuple[str, ...]
) -> jax.Array:
  """`ragged_experts` with the experts split over the mesh axes `axes` (expert parallelism), run
  per shard: x [t, d] and routing are this shard's tokens, weights its E / ep experts.

  Each (token, expert) pair goes to the shard holding its expert by an all-to-all, the received
  rows run through that shard's experts as grouped matmuls, and the results come back by a second
  all-to-all. The exchange buffers hold t*k rows per destination, every row a shard could send
  there, so no token is ever dropped (the price: ep times the rows of a ragged exchange).
  """
  gate, up, down = weights
  tokens, k = routing.experts.shape
  local = gate.shape[0]
  ep = jax.lax.psum(1, axes)
  flat = routing.experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  chosen = flat[order]
  destination = chosen // local
  send = jnp.bincount(destination, length=ep)
  slot = jnp.arange(tokens * k) - (jnp.cumsum(send) - send)[destination]
  rows = jnp.zeros((ep, tokens * k, x.shape[-1]), x.dtype).at[destination, slot].set(x[order // k])
  ids = jnp.full((ep, tokens * k), local, jnp.int32).at[destination, slot].set(chosen % local)
  rows, ids = (jax.lax.all_to_all(a, axes, 0, 0, tiled=True) for a in (rows, ids))
  rows, ids = rows.reshape(-1, x.shape[-1]), ids.reshape(-1)  # padding rows carry id `local`
  received = jnp.argsort(ids, stable=True)
  group_sizes = jnp.bincount(ids, length=local + 1)[:local].astype(jnp.int32)
  grouped = rows[received]
  hidden = nn.silu(jax.lax.ragged_dot(grouped, gate, group_sizes)) * jax.lax.ragged_dot(
      grouped, up, group_sizes
  )
  out = jnp.zeros_like(rows).at[received].set(jax.lax.ragged_dot(hidden, down, group_sizes))
  out = jax.lax.all_to_all(out.reshape(ep, tokens * k, -1), axes, 0, 0, tiled=True)
  back = jnp.zeros((tokens * k, x.shape[-1]), out.dtype).at[order].set(out[destination, slot])
  back = back.reshape(tokens, k, -1)
  return jnp.sum(back * routing.weights[..., None].astype(back.dtype), axis=1)


def routed_experts(
    x: jax.Array, routing: Routing, weights: ExpertWeights, implementation: str
) -> jax.Array:
  """The routed experts' output [B, L, d] of x [B, L, d] (routing over its B*L tokens, row-major).

  On a device mesh (`jax.set_mesh`, as the trainer, sampler and scorer run) the work is done
  shard by shard (`shard_map`): each device sorts and runs only its own tokens, so no activation
  is gathered across the batch; with the logical axis "exp" on mesh axes of size ep > 1 the
  experts are split over them and exchanged by all-to-all (`_exchange`); a split hidden width
  ("mlp", tensor parallelism) is summed over its axes. Off a mesh, `IMPLEMENTATIONS`.
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
      y = _exchange(tokens, local_routing, (gate, up, down), expert_axes[0])
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
        tokens.reshape(batch, length, d), routing, experts, m.implementation
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
