"""Time from start to the first batch when training resumes at step k, against k.

  python benchmarks/resume_input.py [--out=/tmp/resume_input] [--tokens=100000000]
      [--steps=10,100,1000,10000] [--skip_steps=10,100,1000,10000]

Writes a pre-tokenized corpus in llada-preprocess's format (random byte-vocabulary ids in
documents of 200..1800 tokens, 8 shards, with their indexes) under --out, and the same shards
behind a manifest without indexes, which the pipeline reads the old way: a seeded shuffle of the
repeated stream, then `skip` over the k * B examples consumed. For each k it times
`pipeline.train_batches(config, sharding, start_step=k)` up to the first batch (batch 32 x 512,
one data shard, default shuffle window of 10,000 rows), after a warm-up start at step 0 that pays
the imports and graph building. Prints a table with the machine's CPU.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position
from jax.sharding import SingleDeviceSharding  # noqa: E402  pylint: disable=wrong-import-position

from llada_jax.config import default_config, validate  # noqa: E402
from llada_jax.data import pipeline, pretokenized, registry  # noqa: E402

_OUT = flags.DEFINE_string("out", "/tmp/resume_input", "Where the corpus is written.")
_TOKENS = flags.DEFINE_integer("tokens", 100_000_000, "Corpus size in tokens (at least).")
_STEPS = flags.DEFINE_list(
    "steps",
    ["10", "100", "1000", "10000", "100000"],
    "Resume steps timed with the index (random access).",
)
_SKIP_STEPS = flags.DEFINE_list(
    "skip_steps",
    ["10", "100", "1000", "10000"],
    "Resume steps timed the old way (skip), a subset of --steps.",
)

BATCH, LENGTH, SHARDS = 32, 512, 8


def _write_corpus(directory: str, tokens: int) -> dict:
  """Random documents until `tokens` ids are written; reuses a complete corpus already there."""
  manifest_path = os.path.join(directory, pretokenized.MANIFEST)
  if os.path.exists(manifest_path):
    manifest = pretokenized.read_manifest(directory)
    if manifest["tokens"] >= tokens and pretokenized.has_index(manifest):
      return manifest
  rng = np.random.default_rng(0)

  def documents():
    written = 0
    while written < tokens:
      ids = rng.integers(3, 259, size=int(rng.integers(200, 1800)))
      written += ids.size
      yield pretokenized.encode_example(ids.tolist())

  return pretokenized.write_examples(
      documents(),
      directory,
      pretokenized.VocabularySpec("byte"),
      num_shards=SHARDS,
      sources=["random ids"],
  )


def _unindexed_copy(indexed: str, directory: str, manifest: dict) -> None:
  """The same shards (links) behind a manifest without indexes: the pipeline's skip path."""
  os.makedirs(directory, exist_ok=True)
  for entry in manifest["files"]:
    link = os.path.join(directory, entry["path"])
    if not os.path.exists(link):
      os.symlink(os.path.join(indexed, entry["path"]), link)
  old = {k: v for k, v in manifest.items() if k != "index_every"}
  old["files"] = [{k: v for k, v in e.items() if k != "index"} for e in manifest["files"]]
  with open(os.path.join(directory, pretokenized.MANIFEST), "w", encoding="utf-8") as f:
    json.dump(old, f)


def _config(task: str):
  c = default_config()
  c.model.max_sequence_length = LENGTH
  c.data.update(dict(task=task, sequence_length=LENGTH, batch_size=BATCH, num_shards=1))
  return validate(c)


def _first_batch_seconds(config, step: int) -> float:
  start = time.perf_counter()
  batches = pipeline.train_batches(config, SingleDeviceSharding(jax.devices()[0]), step)
  jax.block_until_ready(next(batches))
  seconds = time.perf_counter() - start
  batches.close()
  return seconds


def _cpu() -> str:
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  return f"{models[0]} ({len(models)} logical CPUs visible)" if models else "unknown CPU"


def main(_) -> None:
  indexed, unindexed = os.path.join(_OUT.value, "indexed"), os.path.join(_OUT.value, "unindexed")
  start = time.perf_counter()
  manifest = _write_corpus(indexed, _TOKENS.value)
  print(
      f"corpus: {manifest['tokens']:,} tokens, {manifest['documents']:,} documents, "
      f"{SHARDS} shards ({time.perf_counter() - start:.0f} s)",
      flush=True,
  )
  _unindexed_copy(indexed, unindexed, manifest)
  registry.register_pretokenized_task("resume_indexed", indexed)
  registry.register_pretokenized_task("resume_unindexed", unindexed)
  times = {}
  for mode, task, steps in (
      ("index", "resume_indexed", _STEPS.value),
      ("skip", "resume_unindexed", _SKIP_STEPS.value),
  ):
    config = _config(task)
    _first_batch_seconds(config, 0)  # imports, graph building
    for step in map(int, steps):
      times[mode, step] = _first_batch_seconds(config, step)
      print(f"{mode} k={step}: {times[mode, step]:.2f} s", flush=True)
  print(
      f"\nMachine: {_cpu()}; batch {BATCH} x {LENGTH}, 1 data shard, shuffle window "
      f"{_config('resume_indexed').data.shuffle_buffer:,} rows; corpus {manifest['tokens']:,} "
      "tokens\n"
  )
  print("| resume step k | tokens consumed | skip (old) | index (new) |")
  print("|---:|---:|---:|---:|")
  for step in sorted({k for _, k in times}):
    cells = [
        f"{times[m, step]:.2f} s" if (m, step) in times else "not run" for m in ("skip", "index")
    ]
    print(f"| {step:,} | {step * BATCH * LENGTH:,} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
  app.run(main)
