"""From a config to an iterator of global feature batches (dicts of `jax.Array`).

Layout. The global batch of B rows is cut into S = data.num_shards shards of B / S consecutive
rows; shard s always reads seqio shard (s, S) of the task. Each process reads the shards of the rows
its devices hold (processes holding the same rows, e.g. across a model-parallel axis, read the same
shards) and `jax.make_array_from_process_local_data` assembles the global array. So for a fixed S
the global batch of every step is the same whatever the number of processes.

Resume. The data state is the step number: every shard's stream is a deterministic function of
(seed, S, shard), so step k's batch is the k-th batch of that stream and a restart starts each
shard at example k * B / S. Tasks with random access (`streams.stream_for`) read only the window
holding that example; others (seqio tasks registered elsewhere, unindexed shards) skip the consumed
examples of a seeded shuffle of the repeated stream, reading them. Changing the number of
processes keeps the stream exact when S is kept; changing S starts new streams (same epochs
position, different order), which the loop logs.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from llada_jax.config import pipeline_masks
from llada_jax.data import streams
from llada_jax.errors import ConfigError
from llada_jax.keys import Stream

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class HostLayout:
  """Which shards this process reads, and where their rows sit in the global batch."""

  num_shards: int
  rows_per_shard: int
  shards: tuple[int, ...]


def process_rows(sharding: jax.sharding.Sharding, batch_size: int) -> range:
  """The rows of a [batch_size, ...] global array that this process's devices hold."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(*index[0].indices(batch_size)))
  ordered = sorted(rows)
  if ordered != list(range(ordered[0], ordered[-1] + 1)):
    raise ConfigError(
        f"the batch sharding {sharding} gives this process rows {ordered}, which "
        "are not contiguous; order the mesh so each host holds consecutive rows"
    )
  return range(ordered[0], ordered[-1] + 1)


def host_layout(config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding) -> HostLayout:
  """The shards of this process; every process's rows must be whole shards."""
  batch = config.data.batch_size
  rows = process_rows(sharding, batch)
  shards = config.data.num_shards if config.data.num_shards > 0 else batch // len(rows)
  per_shard = batch // shards
  if batch % shards or rows.start % per_shard or len(rows) % per_shard:
    raise ConfigError(
        f"data.num_shards={config.data.num_shards} is not allowed: this process "
        f"holds rows {rows.start}..{rows.stop - 1} of the batch of {batch}, which "
        f"must be whole shards of batch_size / num_shards rows"
    )
  return HostLayout(
      shards, per_shard, tuple(range(rows.start // per_shard, rows.stop // per_shard))
  )


def _vocabulary_and_provider(config: ml_collections.ConfigDict):
  """(vocabulary, seqio provider of data.task, its kind "pretrain" or "sft") for this config."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from llada_jax.data import registry  # pylint: disable=g-import-not-at-top
  from llada_jax.data.vocab import get_vocabulary  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  registry.import_task_module(config.data.task_module)
  vocabulary = get_vocabulary(config)
  provider = registry.seqio_provider(
      config.data.task, config.data.vocabulary, vocabulary, registry.layout_of(config)
  )
  if config.data.use_cached:
    registry.check_cached(provider, config.data.cache_dir)
  return vocabulary, provider, registry.task_kind(config.data.task)


def _feature_dataset(
    config: ml_collections.ConfigDict, layout: HostLayout, split: str, train: bool, start_step: int
):
  """This process's part of the global batches, as a tf.data.Dataset of numpy-able dicts."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from llada_jax.data import features  # pylint: disable=g-import-not-at-top

  vocabulary, provider, kind = _vocabulary_and_provider(config)
  spec = features.MaskingSpec(
      seed=config.seed,
      stream=Stream.TRAIN if train else Stream.EVAL,
      mask_id=config.tokens.mask_id,
      eps=config.diffusion.eps,
      time_sampling=config.diffusion.time_sampling,
      random_length_prob=config.diffusion.random_length_prob
      if train and kind == "pretrain"
      else 0.0,
      global_batch=config.data.batch_size,
  )
  mask_here = pipeline_masks(config)
  per_shard = layout.rows_per_shard
  parts = []
  for shard in layout.shards:
    first = start_step * per_shard
    stream = streams.stream_for(config, vocabulary, shard, layout.num_shards) if train else None
    if stream is not None:
      ds = _stream_dataset(config, stream, first)
    else:
      ds = provider.get_dataset(
          sequence_length={"targets": config.data.sequence_length},
          split=split,
          shuffle=False,
          seed=config.seed,
          shard_info=seqio.ShardInfo(shard, layout.num_shards),
          num_epochs=None if train else 1,
          use_cached=config.data.use_cached,
      )
      if train:
        if start_step:
          logging.warning(
              "data.task=%r has no random access: resuming at step %d reads the %d "
              "examples shard %d consumed",
              config.data.task,
              start_step,
              first,
              shard,
          )
        ds = ds.shuffle(
            config.data.shuffle_buffer,
            seed=config.seed * 65_537 + shard,
            reshuffle_each_iteration=True,
        )
      ds = ds.skip(first)
    offset = shard * per_shard

    def convert(i, ex, offset=offset):
      index = (i // per_shard) * config.data.batch_size + offset + i % per_shard
      return features.convert(ex, index, spec, mask_here)

    ds = ds.enumerate(first).map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    parts.append(ds.batch(per_shard, drop_remainder=True))
  joined = tf.data.Dataset.zip(tuple(parts)).map(
      lambda *shards: {k: tf.concat([s[k] for s in shards], 0) for k in shards[0]}
  )
  return joined.prefetch(tf.data.AUTOTUNE)


def _stream_dataset(config: ml_collections.ConfigDict, stream: streams.Stream, first: int):
  """Examples first, first + 1, ... of a random-access stream as a tf.data.Dataset (the window
  holding `first` is read here, so an empty task fails before training)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  chunks = stream.chunks(first)
  head = next(chunks, None)
  _check_not_empty(config, "train", head)
  signature = {
      name: tf.TensorSpec((None, *value.shape[1:]), tf.as_dtype(value.dtype))
      for name, value in head.items()
  }
  return tf.data.Dataset.from_generator(
      lambda: itertools.chain([head], chunks), output_signature=signature
  ).unbatch()


def global_batch(
    sharding: jax.sharding.Sharding, local: dict[str, np.ndarray], batch_size: int
) -> Batch:
  """Assembles this process's rows of every feature into global arrays."""
  out = {}
  for name, value in local.items():
    shape = (batch_size, *value.shape[1:])
    if isinstance(sharding, NamedSharding):
      feature_sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:1]))
    else:
      feature_sharding = sharding
    out[name] = jax.make_array_from_process_local_data(feature_sharding, value, shape)
  return out


def local_rows(array: jax.Array, rows: range) -> np.ndarray:
  """The inverse of `global_batch`: rows `rows` (this process's, `process_rows`) of a global
  array [batch, ...] whose leading axis is split over devices, on the host, in order."""
  out = np.empty((len(rows), *array.shape[1:]), array.dtype)
  for shard in array.addressable_shards:
    start, stop, _ = shard.index[0].indices(array.shape[0])
    if start < rows.start or stop > rows.stop:
      raise ValueError(f"a shard holds rows {start}..{stop - 1}, outside this process's {rows}")
    out[start - rows.start : stop - rows.start] = np.asarray(shard.data)
  return out


def _prefetched(iterator: Iterator[Any], size: int) -> Iterator[Any]:
  """Runs `iterator` in a background thread, `size` items ahead (exceptions re-raised here).

  Closing the returned generator (or dropping it) stops and joins the thread, so no thread is
  left inside TensorFlow when the process exits.
  """
  if size == 0:
    yield from iterator
    return
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterator:
        if not put(item):
          return
      put(done)
    except BaseException as e:  # pylint: disable=broad-exception-caught
      put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while (item := items.get()) is not done:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()


def _check_not_empty(config: ml_collections.ConfigDict, split: str, first: Any) -> None:
  if first is None:
    raise ConfigError(
        f"data.task={config.data.task!r} split {split!r} yields no batch of "
        f"{config.data.batch_size} x {config.data.sequence_length} tokens on this "
        "process: check the files, data.sequence_length and data.batch_size"
    )


def train_batches(
    config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding, start_step: int = 0
) -> Iterator[Batch]:
  """Endless global feature batches for steps start_step, start_step + 1, ... (resumes exactly)."""
  layout = host_layout(config, sharding)
  _log_sft_overflow(config, "train")
  local = _feature_dataset(
      config, layout, "train", train=True, start_step=start_step
  ).as_numpy_iterator()
  first = next(local, None)
  _check_not_empty(config, "train", first)

  def stream():
    yield first
    yield from local

  return _prefetched(
      (global_batch(sharding, b, config.data.batch_size) for b in stream()), config.data.prefetch
  )


def eval_batches(
    config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding, num_batches: int | None
) -> list[Batch]:
  """The first `num_batches` (None: all) validation batches with their noise (fixed across
  evaluations)."""
  layout = host_layout(config, sharding)
  ds = _feature_dataset(config, layout, "validation", train=False, start_step=0)
  batches = [
      global_batch(sharding, b, config.data.batch_size)
      for b in ds.take(-1 if num_batches is None else num_batches).as_numpy_iterator()
  ]
  _check_not_empty(config, "validation", batches[0] if batches else None)
  if num_batches is not None and len(batches) < num_batches:
    logging.warning(
        "validation split of %r holds %d batches; evaluating on those, not %d",
        config.data.task,
        len(batches),
        num_batches,
    )
  return batches


def _log_sft_overflow(config: ml_collections.ConfigDict, split: str) -> None:
  """Logs how many SFT examples are too long for the sequence length (they are skipped)."""
  from llada_jax.data import registry  # pylint: disable=g-import-not-at-top

  vocabulary, _, kind = _vocabulary_and_provider(config)
  if kind != "sft":
    return
  too_long, total = registry.count_too_long(
      config.data.task, split, vocabulary, config.data.sequence_length
  )
  if too_long == total:
    raise ConfigError(
        f"data.sequence_length={config.data.sequence_length} is not allowed for "
        f"{config.data.task!r}: none of its {total} {split} examples fits"
    )
  if too_long:
    logging.warning(
        "%s: skipping %d of %d %s examples longer than data.sequence_length=%d",
        config.data.task,
        too_long,
        total,
        split,
        config.data.sequence_length,
    )
