"""Mixture-of-Experts routers: which experts each token goes to, and with what weights.

One entry of `ROUTERS` per routing rule in circulation; a new rule is one function here. Every
router maps float32 router logits [T, E] (and the selection bias [E]) to a `Routing`, row by row:
no token's choice reads another token (dropless, batch-invariant routing).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RouterSettings:
  """The static settings a router reads (`llada_jax.model.moe.MoEConfig` carries them).

  experts_per_token: k of the top-k; n_group, topk_group: group-limited selection (the experts
  split into n_group equal groups of consecutive ids, only the topk_group best groups eligible;
  1, 1: no limit); routed_scaling_factor: multiplies the routed weights; norm_topk_prob: divide
  the k selected weights by their sum before the scaling.
  """

  experts_per_token: int
  n_group: int
  topk_group: int
  routed_scaling_factor: float
  norm_topk_prob: bool


class Routing(NamedTuple):
  """experts: int32 [T, k] chosen expert ids; weights: float32 [T, k] their weights in the sum;
  probs: float32 [T, E] the router's scores normalised to sum to 1 per token (the P of the
  load-balancing loss and the router entropy)."""

  experts: jax.Array
  weights: jax.Array
  probs: jax.Array


def sigmoid_grouped(logits: jax.Array, bias: jax.Array, s: RouterSettings) -> Routing:
  """DeepSeek-V3's router (arXiv 2412.19437 Sec. 2.1.2; LLaDA 2.x `llada2_moe`).

  scores = sigmoid(logits); the *selection* ranks scores + bias (the load-balancing bias, never
  trained by the gradient), first by group: a group's score is the sum of its two best biased
  scores, the topk_group best groups stay eligible (the others' experts are excluded), then the
  top k eligible experts. The *weights* are the chosen unbiased scores, divided by their sum when
  norm_topk_prob, times routed_scaling_factor.
  """
  scores = jax.nn.sigmoid(logits)
  choice = scores + jax.lax.stop_gradient(bias).astype(jnp.float32)
  if s.n_group > 1:
    tokens, experts = choice.shape
    grouped = choice.reshape(tokens, s.n_group, experts // s.n_group)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    _, kept = jax.lax.top_k(group_scores, s.topk_group)
    eligible = jnp.any(jax.nn.one_hot(kept, s.n_group, dtype=bool), axis=1)
    choice = jnp.where(jnp.repeat(eligible, experts // s.n_group, axis=1), choice, -jnp.inf)
  _, chosen = jax.lax.top_k(choice, s.experts_per_token)
  weights = jnp.take_along_axis(scores, chosen, axis=-1)
  if s.norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  return Routing(chosen.astype(jnp.int32), weights * s.routed_scaling_factor, probs)


def softmax(logits: jax.Array, bias: jax.Array, s: RouterSettings) -> Routing:
  """The softmax top-k router of Switch/Mixtral/OLMoE and LLaDA-MoE-7B-A1B (`modeling_lladamoe.py`'s
  `LLaDAMoESparseMoeBlock`): probabilities = softmax(logits); the expert bias (zero unless set or
  trained) is added to them, the k largest biased probabilities are chosen and are the weights
  (LLaDA-MoE's rule: the bias is part of the weight), divided by their sum only when
  norm_topk_prob (LLaDA-MoE never does), times routed_scaling_factor."""
  probs = jax.nn.softmax(logits, axis=-1)
  weights, chosen = jax.lax.top_k(
      probs + jax.lax.stop_gradient(bias).astype(jnp.float32), s.experts_per_token
  )
  if s.norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(chosen.astype(jnp.int32), weights * s.routed_scaling_factor, probs)


# model.moe.router -> the router (llada_jax.config.ROUTERS lists the names).
ROUTERS: dict[str, Callable[[jax.Array, jax.Array, RouterSettings], Routing]] = {
    "sigmoid_grouped": sigmoid_grouped,
    "softmax": softmax,
}
