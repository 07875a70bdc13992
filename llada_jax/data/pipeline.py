"""From a config to an iterator of global `jax.Array` batches.

Each host reads its own shard of the task (seqio ShardInfo by process index) and its part of the
global batch becomes one array under the batch sharding. The stream is a seeded shuffle repeated
forever; resuming at step s skips the first s batches, so a resumed run sees the same data.
"""

from __future__ import annotations

import os
from typing import Iterator

import jax
import ml_collections
import numpy as np

from llada_jax.errors import ConfigError


def task_name(config: ml_collections.ConfigDict) -> str:
  return f"{config.data.task}_{config.data.vocabulary}"


def _dataset(config: ml_collections.ConfigDict, split: str, shuffle: bool, repeat: bool):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from llada_jax.data.tasks import register_corpus_task  # pylint: disable=g-import-not-at-top
  from llada_jax.data.vocab import get_vocabulary  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  task = register_corpus_task(task_name(config), config.data.task, get_vocabulary(config))
  per_host = config.data.batch_size // jax.process_count()
  if per_host * jax.process_count() != config.data.batch_size:
    raise ConfigError(f"data.batch_size={config.data.batch_size} is not allowed: expected a "
                      f"multiple of the {jax.process_count()} processes")
  ds = task.get_dataset(
      sequence_length={"targets": config.data.sequence_length}, split=split, shuffle=shuffle,
      shuffle_buffer_size=config.data.shuffle_buffer, seed=config.seed,
      shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()),
      num_epochs=None if repeat else 1)
  return ds.map(lambda ex: ex["targets"]).batch(per_host, drop_remainder=True)


def train_batches(config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding,
                  start_step: int = 0) -> Iterator[jax.Array]:
  """Endless global token batches [batch_size, sequence_length] for steps start_step, ..."""
  ds = _dataset(config, "train", shuffle=True, repeat=True).skip(start_step).prefetch(2)
  for local in ds.as_numpy_iterator():
    yield jax.make_array_from_process_local_data(sharding, np.asarray(local, np.int32))


def eval_batches(config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding,
                 num_batches: int) -> list[jax.Array]:
  """The first `num_batches` validation batches (fixed, so evaluations are comparable)."""
  ds = _dataset(config, "validation", shuffle=False, repeat=False).take(num_batches)
  batches = [jax.make_array_from_process_local_data(sharding, np.asarray(b, np.int32))
             for b in ds.as_numpy_iterator()]
  if not batches:
    raise ConfigError(f"data.batch_size={config.data.batch_size} is not allowed: the validation "
                      f"split of {config.data.task!r} holds less than one batch")
  return batches
