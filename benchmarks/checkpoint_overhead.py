"""Train-step time with asynchronous vs synchronous checkpoints (configs/tiny.py shapes).

  python benchmarks/checkpoint_overhead.py [--steps=60 --save_every=10]

Times the same steps three ways: no saves, Orbax saves every `save_every` steps in the background
(async, the default) and blocking saves (sync). Prints the time the training loop is blocked inside
each `save` call (the direct cost) and the median step time, whose difference from the no-save run
includes the background writer competing for the host CPU.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from absl import app, flags, logging  # noqa: E402  pylint: disable=wrong-import-position

from configs import tiny  # noqa: E402  pylint: disable=wrong-import-position
from llada_jax.diffusion.objectives import unpacked_batch  # noqa: E402
from llada_jax.lm import MaskedDiffusionLM  # noqa: E402
from llada_jax.parallel.mesh import make_mesh  # noqa: E402
from llada_jax.parallel.sharding import axis_rules, batch_sharding  # noqa: E402
from llada_jax.checkpoint import Checkpointer  # noqa: E402
from llada_jax.training.optimizer import make_optimizer  # noqa: E402
from llada_jax.training.state import create_train_state  # noqa: E402
from llada_jax.training.step import make_train_step  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 60, "Steps timed per mode.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 10, "Steps between checkpoints.")


def _time(mode: str) -> tuple[float, float]:
  """Returns (median seconds per step, mean seconds blocked per save) for one mode."""
  config = tiny.get_config()
  config.checkpoint.update(save_every=_SAVE_EVERY.value, async_save=mode == "async")
  mesh = make_mesh(config)
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  state, shardings = create_train_state(config, model, tx, mesh)
  step = make_train_step(config, model, tx, mesh, shardings)
  shape = (config.data.batch_size, config.data.sequence_length)
  batch = jax.device_put(
      unpacked_batch(jax.random.randint(jax.random.PRNGKey(0), shape, 3, 200)),
      batch_sharding(mesh, axis_rules(config)),
  )
  state, _ = step(state, batch)  # compile
  with tempfile.TemporaryDirectory() as workdir:
    saver = Checkpointer(workdir, config) if mode != "none" else None
    step_seconds, blocked = [], []
    for i in range(1, _STEPS.value + 1):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      stepped = time.perf_counter()
      if saver is not None and saver.save(i, state):
        blocked.append(time.perf_counter() - stepped)
      step_seconds.append(time.perf_counter() - start)
    if saver is not None:
      saver.wait()
      saver.close()
  return float(np.median(step_seconds)), float(np.mean(blocked)) if blocked else 0.0


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  print(
      f"{os.cpu_count()} CPUs, {jax.devices()[0].platform}; configs/tiny.py, "
      f"{_STEPS.value} steps, a save every {_SAVE_EVERY.value}"
  )
  baseline = None
  for mode in ("none", "async", "sync"):
    seconds, blocked = _time(mode)
    baseline = seconds if baseline is None else baseline
    print(
        f"{mode:5}: median {seconds * 1e3:6.1f} ms/step ({seconds / baseline:.2f}x no saves); "
        f"loop blocked {blocked * 1e3:7.1f} ms per save"
    )


if __name__ == "__main__":
  app.run(main)
