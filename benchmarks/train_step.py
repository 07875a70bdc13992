"""Train-step speed: tokens/s, TFLOP/s per device, MFU and peak memory per config and remat policy.

  python benchmarks/train_step.py --small                      # CPU: configs/tiny.py shapes
  python benchmarks/train_step.py --config=llada_1b --sequence_length=4096 --batch_size=4 \\
      --dtype=bfloat16 --remat=none,full --json=train_step.json   # one accelerator

Model FLOPs follow docs/llada.md (llada_jax/training/flops.py); MFU needs the device kind in
its peak table (not for CPUs). Every case compiles once, runs --warmup steps, then times --steps
steps with one block at the end (no host sync per step). Prints a table and optionally JSON.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  pylint: disable=wrong-import-position
from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position

from configs import llada_1b, llada_8b, tiny  # noqa: E402  pylint: disable=wrong-import-position
from llada_jax.config import validate  # noqa: E402
from llada_jax.diffusion.objectives import unpacked_batch  # noqa: E402
from llada_jax.lm import MaskedDiffusionLM  # noqa: E402
from llada_jax.parallel.mesh import make_mesh  # noqa: E402
from llada_jax.parallel.sharding import axis_rules, batch_sharding  # noqa: E402
from llada_jax.training.flops import model_flops_per_step, peak_flops  # noqa: E402
from llada_jax.training.optimizer import make_optimizer  # noqa: E402
from llada_jax.training.state import create_train_state  # noqa: E402
from llada_jax.training.step import make_train_step  # noqa: E402

CONFIGS = {"tiny": tiny, "llada_1b": llada_1b, "llada_8b": llada_8b}
_CONFIG = flags.DEFINE_enum("config", "tiny", list(CONFIGS), "Config module of configs/.")
_SMALL = flags.DEFINE_bool("small", False, "CI-sized: configs/tiny.py, few steps.")
_SEQ = flags.DEFINE_integer("sequence_length", None, "Tokens per row (default: the config's).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype, e.g. bfloat16 (default: config's).")
_REMAT = flags.DEFINE_list("remat", ["none"], "Remat policies to compare.")
_ATTENTION = flags.DEFINE_string("attention", None, "model.attention (default: the config's).")
_ACCUM = flags.DEFINE_integer("grad_accum_steps", 1, "Micro-batches per step.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per case.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows here.")


def _case(remat: str) -> dict[str, float | str]:
  config = CONFIGS[_CONFIG.value].get_config()
  config.model.remat = remat
  if _DTYPE.value:
    config.model.dtype = _DTYPE.value
  if _SEQ.value:
    config.data.sequence_length = config.model.max_sequence_length = _SEQ.value
  if _BATCH.value:
    config.data.batch_size = _BATCH.value
  config.train.grad_accum_steps = _ACCUM.value
  if _ATTENTION.value:
    config.model.attention = _ATTENTION.value
  validate(config)
  mesh = make_mesh(config)
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  state, shardings = create_train_state(config, model, tx, mesh)
  step = make_train_step(config, model, tx, mesh, shardings)
  shape = (config.data.batch_size, config.data.sequence_length)
  tokens = jax.random.randint(jax.random.PRNGKey(0), shape, 3, 250)
  batch = jax.device_put(unpacked_batch(tokens), batch_sharding(mesh, axis_rules(config)))
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  for _ in range(_WARMUP.value):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / _STEPS.value
  flops = model_flops_per_step(config)
  peak = peak_flops(jax.devices()[0])
  memory = jax.devices()[0].memory_stats() or {}
  return dict(
      config=_CONFIG.value,
      remat=remat,
      attention=config.model.attention,
      dtype=config.model.dtype,
      batch=config.data.batch_size,
      seq=config.data.sequence_length,
      step_ms=seconds * 1e3,
      tokens_per_s=shape[0] * shape[1] / seconds,
      tflops_per_device=flops / seconds / mesh.size / 1e12,
      mfu=flops / seconds / (mesh.size * peak) if peak else float("nan"),
      peak_memory_gib=memory.get("peak_bytes_in_use", float("nan")) / 2**30,
      compile_s=compile_seconds,
  )


def main(argv: list[str]) -> None:
  del argv
  if _SMALL.value:
    flags.FLAGS.steps, flags.FLAGS.warmup = 5, 1
  device = jax.devices()[0]
  print(f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}")
  rows = [_case(remat) for remat in _REMAT.value]
  columns = list(rows[0])
  print(" | ".join(columns))
  for row in rows:
    print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(dict(device=device.device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)
