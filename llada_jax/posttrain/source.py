"""What llada-train trains on with posttrain.method="dpo": preference batches, the DPO loss with
the frozen reference, and the held-out preference metrics.

Order: the pairs of posttrain.preferences are visited in a fresh permutation each epoch, drawn
from (seed, epoch); step s takes positions s * B ... s * B + B - 1 (B = data.batch_size pairs) of
that endless sequence, so a run resumed at step s sees exactly the batches it would have seen,
and each process packs only its own rows of the batch (`pipeline.process_rows`).
"""

from __future__ import annotations

import functools
from typing import Any, Iterator


import jax
import ml_collections
import numpy as np

from llada_jax.data.pipeline import global_batch, process_rows
from llada_jax.diffusion.likelihood import bound_estimator
from llada_jax.errors import ConfigError
from llada_jax.posttrain.dpo import PreferenceBatch, dpo_loss, pack_preferences, preference_terms
from llada_jax.posttrain.preference import PreferencePair, read_preferences
from llada_jax.posttrain.reference import reference_params

Metrics = dict[str, jax.Array]


def epoch_order(seed: int, epoch: int, num_pairs: int) -> np.ndarray:
  """The permutation of the pair indices visited in `epoch`: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(num_pairs)


def step_indices(seed: int, step: int, batch_size: int, num_pairs: int) -> np.ndarray:
  """The pair indices of the batch of `step` [batch_size] (`epoch_order`)."""
  positions = step * batch_size + np.arange(batch_size)
  epochs = positions // num_pairs
  return np.asarray(
      [epoch_order(seed, int(e), num_pairs)[p % num_pairs] for e, p in zip(epochs, positions)]
  )


class PreferenceSource:
  """Preference pairs for training (posttrain.preferences) and held-out evaluation
  (posttrain.preferences_eval, optional), read and checked when built.

  Raises:
    ConfigError: a preference file or line that is not allowed (`read_preferences`), or fewer
      training pairs than data.batch_size.
  """

  frozen = None  # the reference's parameters, once `place` has read them

  def __init__(self, config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding):
    p = config.posttrain
    self.config, self.sharding = config, sharding
    self.pairs = read_preferences(p.preferences, config)
    self.held_out = read_preferences(p.preferences_eval, config) if p.preferences_eval else []
    batch = config.data.batch_size
    if len(self.pairs) < batch:
      raise ConfigError(
          f"posttrain.preferences={p.preferences} holds {len(self.pairs)} pairs: expected at "
          f"least data.batch_size={batch}"
      )
    everything = self.pairs + self.held_out
    self.width = max(len(x.prompt) + max(len(x.chosen), len(x.rejected)) for x in everything)
    self.estimator = bound_estimator(config, p.mc_num, p.mc_num, one_timestep=p.one_timestep)

  def _batch(self, pairs: list[PreferencePair], indices: np.ndarray, step: int) -> PreferenceBatch:
    """The global batch of the pairs at `indices` of `pairs`, this process packing its rows."""
    rows = process_rows(self.sharding, len(indices))
    local = pack_preferences(
        [pairs[i] for i in indices[rows.start : rows.stop]],
        indices[rows.start : rows.stop],
        self.config.seed,
        step,
        self.width,
    )
    return PreferenceBatch(**global_batch(self.sharding, local._asdict(), len(indices)))

  def train_batches(self, start_step: int) -> Iterator[PreferenceBatch]:
    """Batches of steps start_step, start_step + 1, ... (see the module docstring)."""
    step = start_step
    while True:
      indices = step_indices(self.config.seed, step, self.config.data.batch_size, len(self.pairs))
      yield self._batch(self.pairs, indices, step)
      step += 1

  def place(self, param_shardings: Any) -> None:
    """Reads the reference's parameters, placed as the policy's."""
    self.frozen = reference_params(self.config, param_shardings)

  def loss(
      self, params: Any, batch: PreferenceBatch, rng: jax.Array, block_size: int, frozen: Any
  ) -> tuple[jax.Array, Metrics]:
    """(the DPO loss of the batch against the reference `frozen`, its `preference_metrics`);
    the noise is the batch's keys, not rng, and the bound uses the model's block size."""
    del rng, block_size
    p = self.config.posttrain
    loss, terms = dpo_loss(self.estimator, params, frozen, batch, p.beta, p.antithetic)
    return loss, preference_metrics(terms, p.beta)

  @functools.cached_property
  def _held_out_batches(self) -> list[PreferenceBatch]:
    """The held-out pairs in batches of data.batch_size (the last one filled up by repeating
    pairs, which `evaluate` leaves out), at step 0's keys: the same masks at every evaluation."""
    batch, n = self.config.data.batch_size, len(self.held_out)
    return [
        self._batch(self.held_out, np.arange(start, start + batch) % n, 0)
        for start in range(0, n, batch)
    ]

  @functools.cached_property
  def _terms(self):
    p = self.config.posttrain
    return jax.jit(
        lambda params, ref, batch: preference_terms(
            self.estimator, params, ref, batch, p.antithetic
        )
    )

  def evaluate(self, params: Any) -> dict[str, float]:
    """Held-out means over every pair of posttrain.preferences_eval: the DPO loss and
    `preference_metrics` ({} without held-out pairs)."""
    if not self.held_out:
      return {}
    terms = [jax.device_get(self._terms(params, self.frozen, b)) for b in self._held_out_batches]
    joined = jax.tree.map(lambda *t: np.concatenate(t)[: len(self.held_out)], *terms)
    beta = self.config.posttrain.beta
    scalars = {k: float(v) for k, v in preference_metrics(joined, beta).items()}
    scalars["dpo/loss"] = float(np.mean(np.logaddexp(0.0, -beta * joined.margin)))
    return scalars


def preference_metrics(terms: Any, beta: float) -> Metrics:
  """Means over the pairs of the DPO margin, the accuracy (margin > 0) and the implicit rewards."""
  return {
      "dpo/margin": terms.margin.mean(),
      "dpo/accuracy": (terms.margin > 0).mean(),
      "dpo/reward_chosen": beta * (terms.policy_chosen - terms.reference_chosen).mean(),
      "dpo/reward_rejected": beta * (terms.policy_rejected - terms.reference_rejected).mean(),
      "dpo/bound_gap": (terms.policy_chosen - terms.policy_rejected).mean(),
  }
