"""AR initialisation: which logit alignment keeps what the autoregressive model knew.

  python benchmarks/ar_init.py [--ar_steps=800 --steps=300 --peak_lr=3e-3 --out=runs/ar_init]

1. Trains the tiny causal model (configs/tiny.py, objective arm) on Tiny Shakespeare bytes and
   exports it as a Llama folder (`llada-convert to-hf`), the stand-in for a released AR model.
2. For each diffusion objective (block with B = 1 and B = 4, mdm) and each logit alignment (same:
   token i read at i, LLaDA; shifted: at i - 1, Dream / Fast-dLLM v2 / MaxText), starts a run
   from that folder (`train.init_from`) and reports the held-out bound (nats per byte, the
   trainer's validation batches, exact schedule) at step 0 and after --steps steps. Runs of one
   objective have the same shapes, passes and steps, so the two alignments compare at equal FLOPs.

The last line printed is one JSON object: the AR model's own held-out loss and, per objective and
alignment, {"step_0": ..., "step_N": ...}.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
from absl import app, flags, logging

from configs import tiny
from llada_jax.config import validate
from llada_jax.data import pipeline
from llada_jax.interop.workdir import to_hf
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.parallel.mesh import make_mesh
from llada_jax.parallel.sharding import axis_rules, batch_sharding
from llada_jax.training.loop import train
from llada_jax.training.state import config_with_init_from, imported_params

_OUT = flags.DEFINE_string("out", "runs/ar_init", "Folder of the runs (reused when present).")
_AR_STEPS = flags.DEFINE_integer("ar_steps", 800, "Training steps of the AR model.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps of each AR-initialised run.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "Held-out batches of each bound.")
_PEAK_LR = flags.DEFINE_float("peak_lr", 3e-3, "Peak learning rate of the AR-initialised runs.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["block1", "block4", "mdm"], "Objectives to start from the AR model."
)

VARIANTS = {"block1": ("block", 1), "block4": ("block", 4), "mdm": ("mdm", 0)}


def _config(objective: str, block_size: int, steps: int, **train):
  config = tiny.get_config()
  config.diffusion.objective = objective
  config.model.causal = objective == "arm"
  if block_size:
    config.diffusion.block_size = block_size
  config.train.update(dict(num_steps=steps, eval_every=steps, eval_batches=_EVAL_BATCHES.value))
  config.train.update(train)
  config.checkpoint.update(dict(save_every=steps, keep=1))
  config.optimizer.update(dict(warmup_steps=min(50, steps // 5)))
  return validate(config)


def held_out_bound(config, params) -> float:
  """The trainer's validation bound (nats per token, exact schedule) of params."""
  model = MaskedDiffusionLM(config)
  mesh = make_mesh(config)
  batches = pipeline.eval_batches(
      config, batch_sharding(mesh, axis_rules(config)), config.train.eval_batches
  )
  loss = jax.jit(lambda p, b, k: model.loss(p, b, k, random_length_prob=0.0, exact=True)[0])
  keys = [jax.random.fold_in(jax.random.PRNGKey(config.seed), i) for i in range(len(batches))]
  return float(np.mean([loss(params, b, k) for b, k in zip(batches, keys)]))


def _final_bound(workdir: pathlib.Path) -> float:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss_bound"] for r in rows if r.get("split") == "eval"][-1]


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value)
  ar_dir, folder = out / "arm", out / "arm_llama"
  train(_config("arm", 0, _AR_STEPS.value), ar_dir)
  if folder.exists():
    shutil.rmtree(folder)
  to_hf(str(ar_dir), str(folder), "float32", "5GB")
  results = {"arm_held_out": _final_bound(ar_dir)}
  results["peak_lr"] = _PEAK_LR.value
  for variant in _VARIANTS.value:
    objective, block_size = VARIANTS[variant]
    for alignment in ("same", "shifted"):
      name = f"{variant}_{alignment}_lr{_PEAK_LR.value:g}"
      config = config_with_init_from(
          _config(objective, block_size, _STEPS.value, init_from=str(folder))
      )
      config.optimizer.peak_lr = _PEAK_LR.value
      config.optimizer.final_lr = min(config.optimizer.final_lr, _PEAK_LR.value)
      config.diffusion.logit_alignment = alignment
      start = held_out_bound(config, imported_params(config))
      train(config, out / name)
      results[name] = {"step_0": start, f"step_{_STEPS.value}": _final_bound(out / name)}
      logging.info("%s: %s", name, results[name])
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
