"""Reverse-process speed per mode and batch size, and how far fast modes are from exact decoding.

  python benchmarks/sampler.py --workdir=runs/demo            # a trained model (make demo)
  python benchmarks/sampler.py --small                         # random tiny model, CI-sized
  python benchmarks/sampler.py --workdir=W --batch=1,8,32 --thresholds=0.9,0.7 --json=s.json

Modes: `exact` (LLaDA's schedule, low-confidence remasking, temperature 0) and `τ=…`
(confidence-threshold parallel decoding). For each: generated tokens/s after compilation, and the
fraction of answer tokens equal to exact decoding's. Exact decoding costs `steps` forward passes
over prompt + answer: 2 N_matmul (B (P + G)) FLOPs each plus attention; GFLOP/s is printed for it.
"""

from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import llada_1b, llada_8b, tiny
from llada_jax.model import ModelConfig, Transformer
from llada_jax.sampling import generate
from llada_jax.training.flops import matmul_parameters

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (default: a random model).")
_CONFIG = flags.DEFINE_enum("config", "tiny", ["tiny", "llada_1b", "llada_8b"],
                            "Architecture of the random model (without --workdir).")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute and parameter dtype of the random model.")
_SMALL = flags.DEFINE_bool("small", False, "CI-sized: gen 32, batch 1 and 4, one repeat.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 112, "Answer length.")
_STEPS = flags.DEFINE_integer("steps", 112, "Exact-mode steps.")
_BLOCK = flags.DEFINE_integer("block_length", 16, "Block length.")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_THRESHOLDS = flags.DEFINE_list("thresholds", ["0.9", "0.7", "0.5"], "Parallel-decoding τ values.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per case.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows here.")

PROMPTS = ("ROMEO:\n", "First Citizen:\n", "KING HENRY:\n", "JULIET:\n")


def _model():
  if _WORKDIR.value:
    from llada_jax.sampling.text import load_model, text_codec  # pylint: disable=g-import-not-at-top
    config, params = load_model(_WORKDIR.value)
    return config, params, text_codec(config)
  config = {"tiny": tiny, "llada_1b": llada_1b, "llada_8b": llada_8b}[_CONFIG.value].get_config()
  if _DTYPE.value:
    config.model.update(dtype=_DTYPE.value, param_dtype=_DTYPE.value)
  model = Transformer(ModelConfig.from_config(config))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  return config, nn.meta.unbox(params)["params"], None


def _prompts(codec, batch: int) -> np.ndarray:
  if codec is None:
    return np.full((batch, 16), 40, np.int32)
  ids = [list(codec.encode(PROMPTS[i % len(PROMPTS)])) for i in range(batch)]
  width = max(len(i) for i in ids)
  return np.asarray([[i[0]] * (width - len(i)) + i for i in ids], np.int32)  # same-token pad


def _timed(fn) -> tuple[np.ndarray, float]:
  out = np.asarray(fn())  # compile
  start = time.perf_counter()
  for _ in range(_REPEATS.value):
    out = np.asarray(fn())
  return out, (time.perf_counter() - start) / _REPEATS.value


def main(argv: list[str]) -> None:
  del argv
  if _SMALL.value:
    flags.FLAGS.gen_length, flags.FLAGS.steps, flags.FLAGS.repeats = 32, 32, 1
    flags.FLAGS.batch = ["1", "4"]
  config, params, codec = _model()
  gen, steps = _GEN_LENGTH.value, _STEPS.value
  device = jax.devices()[0]
  print(f"{device.device_kind} ({device.platform}); model "
        f"{'trained: ' + _WORKDIR.value if _WORKDIR.value else 'random ' + _CONFIG.value}; "
        f"gen {gen}, "
        f"exact steps {steps}, block {_BLOCK.value}")
  print("batch | mode | tokens/s | speed-up | agreement with exact | GFLOP/s")
  rows = []
  for batch in (int(b) for b in _BATCH.value):
    prompt = _prompts(codec, batch)
    kwargs = dict(gen_length=gen, steps=steps, block_length=_BLOCK.value)
    exact, exact_s = _timed(lambda: generate(config, params, prompt, **kwargs))
    length = prompt.shape[1] + gen
    flops = steps * (2 * matmul_parameters(config) * batch * length
                     + 4 * config.model.n_layers * batch * length ** 2 * config.model.d_model)
    cases = [("exact", exact, exact_s)]
    for tau in (float(t) for t in _THRESHOLDS.value):
      out, seconds = _timed(lambda tau=tau: generate(config, params, prompt,
                                                     parallel_threshold=tau, **kwargs))
      cases.append((f"τ={tau}", out, seconds))
    for mode, out, seconds in cases:
      row = dict(batch=batch, mode=mode, tokens_per_s=batch * gen / seconds,
                 speedup=exact_s / seconds,
                 agreement=float(np.mean(out[:, -gen:] == exact[:, -gen:])),
                 gflops=flops / exact_s / 1e9 if mode == "exact" else float("nan"))
      rows.append(row)
      print(f"{batch} | {mode} | {row['tokens_per_s']:.0f} | {row['speedup']:.2f}x | "
            f"{row['agreement']:.3f} | {row['gflops']:.1f}")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(dict(device=device.device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)
