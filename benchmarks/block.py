"""Block diffusion speed: the training step against LLaDA's, and the sampler with and without its
exact cache.

  python benchmarks/block.py                                     # tiny model, CPU-sized
  python benchmarks/block.py --config=llada_1b --dtype=bfloat16 --sequence_length=2048 \
      --batch_size=8 --attention=xla,cudnn --gen_length=256 --block_size=32 --batch=1,16

Training: one jitted loss-and-gradient step (the objective's forward process included) per
objective (mdm, block with --block_size) and attention kernel; ms per step, tokens/s and model
TFLOP/s from `llada_jax.training.flops` (the block objective's two-stream pass counts twice per
token), and every kernel's loss against XLA's on the same batch. Sampling (block model, random
weights, EOS never proposed so every answer runs its full length, low-confidence remasking,
steps = gen_length): generated tokens/s uncached (a full pass over prompt + answer every step)
and with the exact cache (the current block against the cached keys of the prompt and finished
blocks), and the fraction of answer tokens on which the two agree (1.0 expected: the cache is
exact). Random weights: speed only.
"""

from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import llada_1b, tiny
from llada_jax.diffusion.objectives import unpacked_batch
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.training.flops import model_flops_per_token

_CONFIG = flags.DEFINE_enum("config", "tiny", ["tiny", "llada_1b"], "Architecture.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute and parameter dtype (default: the config's).")
_LENGTH = flags.DEFINE_integer("sequence_length", 128, "Training sequence length.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Training rows per step.")
_ATTENTION = flags.DEFINE_list("attention", ["xla"], "Attention kernels to time in training.")
_BLOCK = flags.DEFINE_integer("block_size", 16, "Block size of the block model.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed training steps.")
_GEN = flags.DEFINE_integer("gen_length", 64, "Answer length (= sampler steps).")
_PROMPT = flags.DEFINE_integer("prompt_length", 32, "Prompt tokens.")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Sampler batch sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed sampler runs per case.")
_PARTS = flags.DEFINE_list("parts", ["train", "sample"], "What to measure: train, sample.")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")


def _config(objective: str, attention: str = "xla"):
  c = (tiny if _CONFIG.value == "tiny" else llada_1b).get_config()
  length = max(_LENGTH.value, _PROMPT.value + _GEN.value)
  c.model.update(dict(max_sequence_length=length, attention=attention, remat="full"))
  if _DTYPE.value:
    c.model.update(dict(dtype=_DTYPE.value, param_dtype=_DTYPE.value))
  c.data.update(dict(sequence_length=_LENGTH.value, batch_size=_BATCH_SIZE.value))
  c.diffusion.update(dict(objective=objective, block_size=_BLOCK.value))
  c.sampling.update(
      dict(
          block_length=_BLOCK.value,
          gen_length=_GEN.value,
          steps=_GEN.value,
          temperature=0.0,
          logits_eos_inf=True,
      )
  )
  return c


def _timed(fn, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls after one warm-up (compile) call."""
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def train_rows(params) -> list[dict]:
  tokens = jax.random.randint(
      jax.random.PRNGKey(1), (_BATCH_SIZE.value, _LENGTH.value), 0, 250, jnp.int32
  )
  batch = unpacked_batch(tokens)
  rows = []
  for objective in ("mdm", "block"):
    reference = None
    for attention in _ATTENTION.value:
      config = _config(objective, attention)
      lm = MaskedDiffusionLM(config)
      step = jax.jit(
          jax.value_and_grad(lambda p, lm=lm: lm.loss(p, batch, jax.random.PRNGKey(2))[0])
      )
      try:
        seconds = _timed(lambda step=step: step(params), _STEPS.value)
      except Exception as e:  # pylint: disable=broad-except  # report the kernel, go on
        print(f"train {objective} {attention}: FAILED {type(e).__name__}: {str(e)[:300]}")
        continue
      loss = float(step(params)[0])
      reference = loss if reference is None else reference
      tokens_per_s = tokens.size / seconds
      row = dict(
          part="train",
          objective=objective,
          attention=attention,
          ms_per_step=1e3 * seconds,
          tokens_per_s=tokens_per_s,
          model_tflops=model_flops_per_token(config) * tokens_per_s / 1e12,
          loss=loss,
          loss_minus_first_kernel=loss - reference,
      )
      print(
          f"train {objective:5s} {attention:6s} {row['ms_per_step']:9.2f} ms  "
          f"{tokens_per_s:11,.0f} tokens/s  {row['model_tflops']:8.3f} TFLOP/s  loss {loss:.5f}"
          f" (vs {_ATTENTION.value[0]}: {loss - reference:+.2e})"
      )
      rows.append(row)
  return rows


def sampler_rows(params) -> list[dict]:
  lm = MaskedDiffusionLM(_config("block"))
  rows = []
  for batch in map(int, _BATCH.value):
    prompt = np.asarray(
        jax.random.randint(jax.random.PRNGKey(3), (batch, _PROMPT.value), 2, 250, jnp.int32)
    )
    answers, speeds = {}, {}
    for cache in ("none", "prefix"):
      seconds = _timed(lambda cache=cache: lm.generate(params, prompt, cache=cache), _REPEATS.value)
      answers[cache] = np.asarray(lm.generate(params, prompt, cache=cache))[:, _PROMPT.value :]
      speeds[cache] = batch * _GEN.value / seconds
    agreement = float(np.mean(answers["none"] == answers["prefix"]))
    row = dict(
        part="sample",
        batch=batch,
        uncached_tokens_per_s=speeds["none"],
        cached_tokens_per_s=speeds["prefix"],
        speedup=speeds["prefix"] / speeds["none"],
        agreement=agreement,
    )
    print(
        f"sample batch {batch:3d}: uncached {speeds['none']:10,.1f} tokens/s, exact cache "
        f"{speeds['prefix']:10,.1f} tokens/s = {row['speedup']:.2f}x, agreement {agreement:.4f}"
    )
    rows.append(row)
  return rows


def main(argv: list[str]) -> None:
  del argv
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
  lm = MaskedDiffusionLM(_config("block"))
  params = nn.meta.unbox(jax.jit(lm.init)(jax.random.PRNGKey(0)))
  print(
      f"config {_CONFIG.value}, dtype {lm.config.model.dtype}, block size {_BLOCK.value}, "
      f"train {_BATCH_SIZE.value} x {_LENGTH.value}, sample prompt {_PROMPT.value} + gen "
      f"{_GEN.value}"
  )
  rows = (train_rows(params) if "train" in _PARTS.value else []) + (
      sampler_rows(params) if "sample" in _PARTS.value else []
  )
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(dict(device=device.device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)
