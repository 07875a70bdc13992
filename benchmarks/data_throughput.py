"""Input pipeline throughput per host, next to the step rate of the model it feeds.

  python benchmarks/data_throughput.py [--batches=200]

For each task (configs/tiny.py shapes: 16 x 128 tokens; SFT at 16 x 512) it times global batches
from `pipeline.train_batches` (forward process in the pipeline, and with masking left to the
device), after the first batch, and prints examples/s and tokens/s. Then it times the train step of
configs/tiny.py on this machine. The pipeline keeps up when its tokens/s exceed the step's.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  pylint: disable=wrong-import-position
from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position

from configs import tiny  # noqa: E402  pylint: disable=wrong-import-position
from llada_jax.data import pipeline  # noqa: E402  pylint: disable=wrong-import-position
from llada_jax.lm import MaskedDiffusionLM  # noqa: E402
from llada_jax.parallel.mesh import make_mesh  # noqa: E402
from llada_jax.parallel.sharding import axis_rules, batch_sharding  # noqa: E402
from llada_jax.training.optimizer import make_optimizer  # noqa: E402
from llada_jax.training.state import create_train_state  # noqa: E402
from llada_jax.training.step import make_train_step  # noqa: E402

_BATCHES = flags.DEFINE_integer("batches", 200, "Batches timed per case.")

CASES = (  # (task, vocabulary, packing, sequence length)
    ("tinyshakespeare", "byte", "chunk", 128),
    ("gutenberg", "byte", "chunk", 128),
    ("corpora", "byte", "chunk", 128),
    ("corpora", "byte", "pack", 128),
    ("corpora", "spm8k", "chunk", 128),
    ("gsm8k_sft", "byte", "chunk", 512),
)


def _config(task: str, vocabulary: str, packing: str, length: int, masking: str):
  c = tiny.get_config()
  c.data.update(
      task=task, vocabulary=vocabulary, packing=packing, sequence_length=length, masking=masking
  )
  c.model.max_sequence_length = max(c.model.max_sequence_length, length)
  if vocabulary == "spm8k":
    c.tokens.mask_id, c.model.vocab_size = 8000, 8064
  return c


def _time(iterator, n: int) -> float:
  next(iterator)
  start = time.perf_counter()
  for _ in range(n):
    batch = next(iterator)
  jax.block_until_ready(batch)
  return time.perf_counter() - start


def main(argv: list[str]) -> None:
  del argv
  n = _BATCHES.value
  print(f"{jax.process_count()} process(es), {os.cpu_count()} CPUs, devices: {jax.devices()}")
  print(f"{'task':16} {'vocab':6} {'layout':6} {'masking':9} {'examples/s':>11} {'tokens/s':>10}")
  for task, vocabulary, packing, length in CASES:
    for masking in ("pipeline", "device"):
      c = _config(task, vocabulary, packing, length, masking)
      sharding = batch_sharding(make_mesh(c), axis_rules(c))
      seconds = _time(pipeline.train_batches(c, sharding), n)
      examples = n * c.data.batch_size / jax.process_count()
      print(
          f"{task:16} {vocabulary:6} {packing:6} {masking:9} {examples / seconds:11.0f} "
          f"{examples * length / seconds:10.0f}"
      )

  c = tiny.get_config()
  mesh = make_mesh(c)
  model, tx = MaskedDiffusionLM(c), make_optimizer(c)
  state, shardings = create_train_state(c, model, tx, mesh)
  step = make_train_step(c, model, tx, mesh, shardings)
  batches = pipeline.train_batches(c, batch_sharding(mesh, axis_rules(c)))
  state, _ = step(state, next(batches))
  steps = max(n // 10, 5)
  fed = [next(batches) for _ in range(steps)]
  start = time.perf_counter()
  for batch in fed:
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  tokens = c.data.batch_size * c.data.sequence_length
  print(
      f"configs/tiny.py train step: {seconds * 1e3:.0f} ms = {tokens / seconds:.0f} tokens/s "
      f"({c.data.batch_size / seconds:.0f} examples/s)"
  )


if __name__ == "__main__":
  app.run(main)
