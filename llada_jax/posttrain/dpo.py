"""ELBO-based DPO with VRPO's variance reduction (LLaDA 1.5, Zhu et al. 2025, arXiv 2505.19223;
LLaDA 2.0 post-trains with the same loss).

DPO (Rafailov et al. 2023) with each log-likelihood replaced by the bound B(y | x) of the model's
objective (`llada_jax.diffusion.likelihood.bound_estimator`: LLaDA's estimator, the block NELBO,
or an ARM's exact chain rule):

  loss = -log sigmoid(beta * [(B_theta(y_w) - B_ref(y_w)) - (B_theta(y_l) - B_ref(y_l))]).

VRPO's three reductions, each an argument here: a budget of n samples per bound (`mc_num`); all
of it on timesteps, n_t = n with one mask each (the estimator's stratified counts;
`one_timestep=True` gives the naive n_t = 1); and antithetic sampling, the policy and the
reference scoring an answer with the same timesteps and masks (`antithetic=True`: one key per
answer for both). With policy = reference every margin is then exactly 0.

Keys: at step s, answer a (0 chosen, 1 rejected) of the pair with index i in the data is scored
with fold_in(fold_in(fold_in(fold_in(seed key, PREFERENCE), s), i), a) (and, without antithetic
sharing, the reference with that key folded with 1 again): a pair's loss depends on (seed, step,
its index) and not on the batch it is in.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llada_jax.diffusion.likelihood import Bound, bound_estimator, pack_rows
from llada_jax.diffusion.objectives import with_router_losses
from llada_jax.keys import Stream, item_keys
from llada_jax.posttrain.preference import PreferencePair

Estimator = Callable[..., Bound]  # likelihood.bound_estimator's


class PreferenceBatch(NamedTuple):
  """Pairs packed for the bound: axis 0 the pairs (the batch axis, split over data-parallel
  devices), axis 1 (chosen, rejected); rows are prompt ++ answer from index 0, right-padded.
  tokens int32 [N, 2, T]; valid, is_answer bool [N, 2, T]; keys [N, 2] PRNG keys (raw uint32
  [N, 2, 2])."""

  tokens: jax.Array
  valid: jax.Array
  is_answer: jax.Array
  keys: jax.Array


def pack_preferences(
    pairs: Sequence[PreferencePair],
    indices: Sequence[int],
    seed: int,
    step: int = 0,
    width: int | None = None,
) -> PreferenceBatch:
  """The batch of `pairs` at `step` (fresh timesteps and masks each step), pair k being item
  indices[k] of its data (its keys' index); width pads every row to that many tokens (one
  compiled program for any pairs)."""
  if len(pairs) != len(indices):
    raise ValueError(f"{len(pairs)} pairs but {len(indices)} indices")
  width = max([width or 0] + [len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs])
  arrays = [
      pack_rows([p.prompt for p in pairs], [getattr(p, a) for p in pairs], width)
      for a in ("chosen", "rejected")
  ]
  tokens, valid, is_answer = (np.stack(x, axis=1) for x in zip(*arrays))
  root = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), Stream.PREFERENCE), step)
  pair_keys = item_keys(root, indices)
  keys = np.asarray(jax.vmap(lambda k: item_keys(k, 2))(pair_keys))
  return PreferenceBatch(tokens, valid, is_answer, keys)


class PreferenceTerms(NamedTuple):
  """Per pair [N] float32: the policy's and the reference's bounds of the chosen and rejected
  answers (nats), and the DPO margin (B_theta(y_w) - B_ref(y_w)) - (B_theta(y_l) - B_ref(y_l));
  router: the MoE router statistics of the policy's passes (`Bound.router`; {} for a dense
  model), which the training loss adds (`dpo_objective`)."""

  policy_chosen: jax.Array
  policy_rejected: jax.Array
  reference_chosen: jax.Array
  reference_rejected: jax.Array
  margin: jax.Array
  router: dict[str, jax.Array]


def preference_terms(
    estimator: Estimator,
    params: Any,
    reference: Any,
    batch: PreferenceBatch,
    antithetic: bool = True,
) -> PreferenceTerms:
  """The bounds of both answers of every pair under the policy `params` and the frozen
  `reference` (no gradient flows into it), and their DPO margins. Traceable."""
  n, two, width = batch.tokens.shape

  def bounds(p, keys):
    bound = estimator(
        p,
        batch.tokens.reshape(n * two, width),
        batch.valid.reshape(n * two, width),
        batch.is_answer.reshape(n * two, width),
        keys.reshape((n * two,) + keys.shape[2:]),
        jnp.float32(0.0),
    )
    return bound.estimate.reshape(n, two).T, bound.router  # [(chosen, rejected), N]

  ref_keys = batch.keys
  if not antithetic:
    ref_keys = jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, 1)))(batch.keys)
  policy, router = bounds(params, batch.keys)
  ref, _ = bounds(jax.lax.stop_gradient(reference), ref_keys)
  margin = (policy[0] - ref[0]) - (policy[1] - ref[1])
  return PreferenceTerms(policy[0], policy[1], ref[0], ref[1], margin, router)


def dpo_loss(
    estimator: Estimator,
    params: Any,
    reference: Any,
    batch: PreferenceBatch,
    beta: float,
    antithetic: bool = True,
    reduction: str = "mean",
) -> tuple[jax.Array, PreferenceTerms]:
  """(the DPO loss -log sigmoid(beta * margin): a scalar for reduction "mean" or "sum", [N] for
  "none"; the pairs' `PreferenceTerms`). Traceable and differentiable in params.

  Raises:
    ValueError: beta <= 0 or an unknown reduction.
  """
  if beta <= 0:
    raise ValueError(f"beta={beta} is not allowed: expected a positive number")
  if reduction not in ("mean", "sum", "none"):
    raise ValueError(f"reduction={reduction!r} is not allowed: expected mean, sum or none")
  terms = preference_terms(estimator, params, reference, batch, antithetic)
  losses = -jax.nn.log_sigmoid(beta * terms.margin)
  if reduction == "mean":
    return losses.mean(), terms
  if reduction == "sum":
    return losses.sum(), terms
  return losses, terms


Metrics = dict[str, jax.Array]


def preference_metrics(terms: Any, beta: float) -> Metrics:
  """Means over the pairs of the DPO margin, the accuracy (margin > 0), the implicit rewards
  beta (B_theta - B_ref) of both answers and the policy's bound gap B_theta(y_w) - B_theta(y_l)."""
  return {
      "dpo/margin": terms.margin.mean(),
      "dpo/accuracy": (terms.margin > 0).mean(),
      "dpo/reward_chosen": beta * (terms.policy_chosen - terms.reference_chosen).mean(),
      "dpo/reward_rejected": beta * (terms.policy_rejected - terms.reference_rejected).mean(),
      "dpo/bound_gap": (terms.policy_chosen - terms.policy_rejected).mean(),
  }


def dpo_objective(
    config: ml_collections.ConfigDict,
) -> Callable[..., tuple[jax.Array, Metrics]]:
  """The train step's loss of posttrain.method="dpo": loss(params, batch, rng, block_size,
  frozen) -> (DPO loss of the `PreferenceBatch` against the reference `frozen`, its
  `preference_metrics`), the bound of config's objective with posttrain.mc_num samples (VRPO's
  options from posttrain); a MoE policy's router terms join as in pre-training
  (`with_router_losses`: the aux and z losses, and router/load for the expert-bias update).
  rng and block_size are unused: the batch's keys are the noise."""
  p = config.posttrain
  estimator = bound_estimator(config, p.mc_num, p.mc_num, one_timestep=p.one_timestep)

  def loss(params, batch, rng, block_size, frozen):
    del rng, block_size
    value, terms = dpo_loss(estimator, params, frozen, batch, p.beta, p.antithetic)
    return with_router_losses(
        config, value, preference_metrics(terms, p.beta), terms.router, "mean"
    )

  return loss


def abstract_preference_batch(
    config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding
) -> PreferenceBatch:
  """The batch a DPO step takes, as ShapeDtypeStructs: data.batch_size pairs of rows
  data.sequence_length tokens wide (ahead-of-time compilation, `llada_jax.aot`)."""
  shape = (config.data.batch_size, 2, config.data.sequence_length)

  def spec(dims, dtype):
    return jax.ShapeDtypeStruct(dims, dtype, sharding=sharding)

  return PreferenceBatch(
      spec(shape, jnp.int32),
      spec(shape, jnp.bool_),
      spec(shape, jnp.bool_),
      spec(shape[:2] + (2,), jnp.uint32),
  )
