"""Cache a config's task with SeqIO's offline caching on Apache Beam (needs `llada_jax[beam]`).

  llada-cache --config=configs/tiny.py --output_cache_dir=DIR \
      [--pipeline_options=--runner=DirectRunner --min_shards=64 --overwrite]

Writes the seqio Tasks of --config's data.task (every task of a mixture) for its data.vocabulary
and data.packing, tokenized, under DIR; then train with --config.data.use_cached=True
--config.data.cache_dir=DIR. --pipeline_options are Beam's, comma-separated, e.g.
--pipeline_options=--runner=DataflowRunner,--project=P,--region=R,--temp_location=gs://b/tmp.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from absl import flags
from ml_collections import config_flags

from llada_jax.cli_support import entry_point
from llada_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path of a config file (configs/*.py).", lock_config=True
)
_OUTPUT = flags.DEFINE_string(
    "output_cache_dir", None, "Cache directory (default: the config's data.cache_dir)."
)
_OPTIONS = flags.DEFINE_list(
    "pipeline_options", ["--runner=DirectRunner"], "Comma-separated Apache Beam pipeline options."
)
_MIN_SHARDS = flags.DEFINE_integer(
    "min_shards", 64, "TFRecord files per split at least (>= data.num_shards)."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rewrite tasks the directory holds already.")


def _exit_on_interrupt(output: str) -> None:
  """Makes Ctrl-C (SIGINT) end the command at once with one line on stderr and exit code 130.

  Beam's DirectRunner has no cancel: a KeyboardInterrupt raised inside a bundle is logged and
  re-raised by every layer of the runner (three tracebacks). Nothing is lost by stopping at once:
  a task's COMPLETED is written last, seqio and training read only complete caches, and the next
  run rewrites a task directory that lacks it.
  """

  def stop(signum, frame) -> None:
    del signum, frame
    sys.stdout.flush()
    print(
        f"interrupted (Ctrl-C): the tasks being cached in {output} have no COMPLETED file, so "
        "training will not read them; the same command rewrites them",
        file=sys.stderr,
        flush=True,
    )
    os._exit(130)  # pylint: disable=protected-access  # no runner code runs after the interrupt

  signal.signal(signal.SIGINT, stop)


def _cache(argv: list[str]) -> None:
  """Caches the config's tasks and prints, per task, its documents and tokens per split."""
  if len(argv) > 1:
    raise ConfigError(f"arguments {argv[1:]} are not allowed: llada-cache takes flags only")
  if _CONFIG.value is None:
    raise ConfigError("--config is required, e.g. --config=configs/tiny.py")
  output = _OUTPUT.value or _CONFIG.value.data.cache_dir
  if not output:
    raise ConfigError("--output_cache_dir (or --config.data.cache_dir) is required")
  _exit_on_interrupt(output)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from llada_jax.data import beam_cache  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  written = beam_cache.cache_tasks(
      _CONFIG.value,
      output,
      _OPTIONS.value,
      min_shards=_MIN_SHARDS.value,
      overwrite=_OVERWRITE.value,
  )
  seconds = time.perf_counter() - start
  for directory in written:
    stats = {}
    for path in tf.io.gfile.glob(os.path.join(directory, "stats.*.json")):
      with tf.io.gfile.GFile(path) as f:
        stats[os.path.basename(path)[len("stats.") : -len(".json")]] = json.load(f)
    summary = ", ".join(
        f"{split}: {s.get('examples', 0):,} documents, {s.get('targets_tokens', 0):,} tokens"
        for split, s in stats.items()
    )
    print(f"cached {directory} ({summary})", flush=True)
  print(
      f"done in {seconds:.1f} s; train with --config.data.use_cached=True "
      f"--config.data.cache_dir={output}",
      flush=True,
  )


run = entry_point(_cache)  # console script `llada-cache`


if __name__ == "__main__":
  run()
