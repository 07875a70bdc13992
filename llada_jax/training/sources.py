"""What a run trains on and how it is evaluated: the trainer (`training.loop`) takes one source.

A source gives the batches of steps start, start + 1, ... (resuming exactly), the loss of a batch
`loss(params, batch, rng, block_size, frozen) -> (loss, metrics)`, the frozen parameters every
step reads besides the policy (`frozen`: a post-training reference, or None; read by
`place(param_shardings)` once the policy's placement is known) and the held-out scalars of an
evaluation. `make_source` picks it from posttrain.method: "" the data.task
pipeline with the objective's bound (pre-training, SFT), "dpo" preference pairs with ELBO-DPO,
"grpo" answers the policy samples, rewarded, with diffu-GRPO (`llada_jax.posttrain.source`).
A batch that depends on the policy (RL rollouts) is completed by `prepare(item, params)` with the
parameters of the step it trains.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from llada_jax.data.corpora import bits_per_byte
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.training.step import make_eval_step


class Source(Protocol):
  """The interface the trainer reads (see the module docstring)."""

  frozen: Any

  def train_batches(self, start_step: int) -> Iterator[Any]:
    ...

  def prepare(self, item: Any, params: Any) -> Any:
    ...

  def loss(self, params: Any, batch: Any, rng: jax.Array, block_size: int, frozen: Any) -> Any:
    ...

  def place(self, param_shardings: Any) -> None:
    ...

  def evaluate(self, params: Any) -> dict[str, float]:
    ...


class CorpusSource:
  """data.task through the seqio pipeline, the objective's loss (`MaskedDiffusionLM.loss`) and
  the held-out bound (nats/token; bits/byte for byte vocabularies) on train.eval_batches fixed
  batches. Building it reads the task: a bad task or vocabulary fails here, before parameters
  are allocated."""

  frozen = None

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      model: MaskedDiffusionLM,
      mesh: Mesh,
      data_sharding: jax.sharding.Sharding,
  ):
    from llada_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    self._pipeline, self._config, self._model = pipeline, config, model
    self._mesh, self._sharding = mesh, data_sharding
    self._validation = pipeline.eval_batches(config, data_sharding, config.train.eval_batches)
    self._eval_step = None

  def train_batches(self, start_step: int) -> Iterator[Any]:
    return self._pipeline.train_batches(self._config, self._sharding, start_step=start_step)

  def prepare(self, item: Any, params: Any) -> Any:
    """The batch itself (it does not depend on the policy)."""
    del params
    return item

  def loss(
      self, params: Any, batch: Any, rng: jax.Array, block_size: int, frozen: Any
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del frozen
    return self._model.loss(params, batch, rng, block_size=block_size or None)

  def place(self, param_shardings: Any) -> None:
    """What needs the parameters' placement: the jitted eval step."""
    self._eval_step = make_eval_step(self._config, self._model, self._mesh, param_shardings)

  def evaluate(self, params: Any) -> dict[str, float]:
    loss = float(np.mean([self._eval_step(params, b, i) for i, b in enumerate(self._validation)]))
    scalars = {"loss_bound": loss}
    if self._config.data.vocabulary == "byte":
      scalars["bits_per_byte"] = bits_per_byte(loss)
    return scalars


def make_source(
    config: ml_collections.ConfigDict,
    model: MaskedDiffusionLM,
    mesh: Mesh,
    data_sharding: jax.sharding.Sharding,
    workdir: Any = None,
) -> Any:
  """The source of posttrain.method (see the module docstring); workdir: the run's, where a
  source may keep what an exact resume needs (GRPO's rollouts with posttrain.inner_updates > 1)."""
  if config.posttrain.method == "dpo":
    from llada_jax.posttrain.source import PreferenceSource  # pylint: disable=g-import-not-at-top

    return PreferenceSource(config, data_sharding)
  if config.posttrain.method == "grpo":
    from llada_jax.posttrain.source import RolloutSource  # pylint: disable=g-import-not-at-top

    return RolloutSource(config, data_sharding, workdir)
  return CorpusSource(config, model, mesh, data_sharding)
