"""SeqIO's offline cache of a config's task, written by an Apache Beam pipeline (`llada-cache`).

The distributed path of preprocessing: `seqio.beam_utils.PreprocessTask` runs each seqio Task's
preprocessors up to its `seqio.CacheDatasetPlaceholder` (tokenization for llada_jax's own tasks)
with one Beam work item per source shard, reshuffles the examples globally and writes them as
seqio's cached task: `{cache_dir}/{task}/{split}.tfrecord-*-of-*`, `info.{split}.json`,
`stats.{split}.json` and `COMPLETED` (the layout `seqio.scripts.cache_tasks_main` writes, which
`seqio.Task.get_dataset(use_cached=True)` reads). Training reads it with `data.use_cached=True` and
`data.cache_dir`, chunking or packing the cached documents as usual.

Any Beam runner works: DirectRunner on one machine, Dataflow/Flink/Spark at scale. Each worker
rebuilds the config's seqio Tasks from the config's JSON before its first shard (the workers need
llada_jax and the task module installed). A source with one shard (bundled corpora,
`register_text_task`: a `seqio.FunctionDataSource`) is one work item; sharded sources (files of
a `seqio.TextLineDataSource` / `TFExampleDataSource`, TFDS) spread over the workers.
"""

from __future__ import annotations

import functools
import os

import ml_collections
from absl import logging

from llada_jax.config import from_json, to_json
from llada_jax.errors import ConfigError


def build_provider(config: ml_collections.ConfigDict):
  """Imports data.task_module and returns the seqio provider of data.task for this config."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from llada_jax.data import registry  # pylint: disable=g-import-not-at-top
  from llada_jax.data.vocab import get_vocabulary  # pylint: disable=g-import-not-at-top

  registry.import_task_module(config.data.task_module)
  return registry.seqio_provider(
      config.data.task, config.data.vocabulary, get_vocabulary(config), registry.layout_of(config)
  )


def _register(config_json: str) -> None:
  """Beam worker set-up: registers the config's seqio Tasks (idempotent)."""
  build_provider(from_json(config_json))


def cache_tasks(
    config: ml_collections.ConfigDict,
    output_cache_dir: str,
    pipeline_options: list[str],
    *,
    min_shards: int = 64,
    overwrite: bool = False,
) -> list[str]:
  """Runs the Beam pipeline that caches every seqio Task of config.data.task.

  Args:
    config: a training config; its data.task, task_module, vocabulary and packing name the tasks.
    output_cache_dir: where the cached tasks go (local or gs://); pass it as data.cache_dir.
    pipeline_options: Beam options, e.g. ["--runner=DirectRunner"] or Dataflow's.
    min_shards: TFRecord files per split at least (a host reads whole files: use at least the
      largest data.num_shards you will train with).
    overwrite: rewrite a task that output_cache_dir already holds (otherwise it is skipped).

  Returns:
    The directories of the tasks written (skipped ones excluded).

  Raises:
    ConfigError: apache-beam is not installed, min_shards < 1, or a task cannot be cached.
  """
  try:
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    from seqio import beam_utils  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(
        f"llada-cache needs Apache Beam: pip install 'llada_jax[beam]' ({e})"
    ) from None
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from llada_jax.data import registry  # pylint: disable=g-import-not-at-top

  if min_shards < 1:
    raise ConfigError(f"min_shards={min_shards} is not allowed: expected at least 1")
  tasks = registry.seqio_tasks(build_provider(config))
  for task in tasks:
    if not task.supports_caching:
      raise ConfigError(
          f"seqio task {task.name!r} cannot be cached: its preprocessors hold no "
          "seqio.CacheDatasetPlaceholder"
      )
  setup = functools.partial(_register, to_json(config))
  modules = [config.data.task_module] if config.data.task_module else []
  written = []
  tf.io.gfile.makedirs(output_cache_dir)
  with beam.Pipeline(
      options=beam.options.pipeline_options.PipelineOptions(pipeline_options)
  ) as pipeline:
    for task in tasks:
      output_dir = os.path.join(output_cache_dir, seqio.get_task_dir_from_name(task.name))
      if tf.io.gfile.exists(output_dir):
        if tf.io.gfile.exists(os.path.join(output_dir, "COMPLETED")) and not overwrite:
          logging.info("%s is cached in %s already; skipping it", task.name, output_dir)
          continue
        tf.io.gfile.rmtree(output_dir)  # an interrupted run's files, or overwrite
      written.append(output_dir)
      done = []
      for split in task.splits:
        label = f"{task.name}_{split}"
        read = beam_utils.PreprocessTask(task, split, setup_fn=setup, modules_to_import=modules)
        num_shards = max(len(read.shards), min_shards)
        # Reshuffle: documents land in the files in a global random order (seqio's choice).
        examples = pipeline | f"{label}_read" >> read | f"{label}_shuffle" >> beam.Reshuffle()
        done.append(
            examples
            | f"{label}_write"
            >> beam_utils.WriteExampleTfRecord(
                seqio.get_cached_tfrecord_prefix(output_dir, split), num_shards=num_shards
            )
        )
        done.append(
            examples
            | f"{label}_info" >> beam_utils.GetInfo(num_shards)
            | f"{label}_write_info"
            >> beam_utils.WriteJson(seqio.get_cached_info_path(output_dir, split))
        )
        done.append(
            examples
            | f"{label}_stats" >> beam_utils.GetStats(task.output_features)
            | f"{label}_write_stats"
            >> beam_utils.WriteJson(seqio.get_cached_stats_path(output_dir, split))
        )
      # COMPLETED is written once every split's files are: seqio reads only complete caches.
      _ = (
          done
          | f"{task.name}_flatten" >> beam.Flatten()
          | f"{task.name}_nothing" >> beam.Filter(lambda _: False)
          | f"{task.name}_completed"
          >> beam.io.textio.WriteToText(
              os.path.join(output_dir, "COMPLETED"), num_shards=1, shard_name_template=""
          )
      )
  return written
