"""Reverse-process speed per mode and batch size, and how far fast modes are from exact decoding.

  python benchmarks/sampler.py --workdir=runs/demo            # a trained model (make demo)
  python benchmarks/sampler.py --small                         # random tiny model, CI-sized
  python benchmarks/sampler.py --workdir=W --batch=1,8,32 --modes=exact,dual,t0.9 --json=s.json

Modes (comma-separated): `exact` (LLaDA's schedule, low-confidence remasking, temperature 0),
`prefix` / `dual` (key/value caches refreshed at block boundaries), `tτ` (confidence-threshold
parallel decoding, e.g. t0.9) and combinations such as `dual+t0.9`. For each: generated tokens/s
after compilation, the fraction of answer tokens equal to exact decoding's and, with
--likelihood_samples > 0, the model's own Monte-Carlo log-likelihood of the answers (nats per
answer token): a fast mode that agrees less but scores as high has not lost quality by the model's
measure. Exact decoding costs `steps` forward passes over prompt + answer: 2 N_matmul B (P + G)
FLOPs each plus attention; GFLOP/s is printed for it, and the share of its time spent outside
those passes (1 - the time of `steps` bare forward passes, one compiled loop, / exact's time).
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
from llada_jax.diffusion.likelihood import log_likelihood
from llada_jax.errors import ConfigError
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.model.forward import logits
from llada_jax.sampling import generate
from llada_jax.training.flops import matmul_parameters

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (default: a random model).")
_CONFIG = flags.DEFINE_enum(
    "config",
    "tiny",
    ["tiny", "llada_1b", "llada_8b"],
    "Architecture of the random model (without --workdir).",
)
_DTYPE = flags.DEFINE_string("dtype", None, "Compute and parameter dtype of the random model.")
_SMALL = flags.DEFINE_bool("small", False, "CI-sized: gen 32, batch 1 and 4, one repeat.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 112, "Answer length.")
_STEPS = flags.DEFINE_integer("steps", 112, "Exact-mode steps.")
_BLOCK = flags.DEFINE_integer("block_length", 16, "Block length.")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_MODES = flags.DEFINE_list(
    "modes",
    ["exact", "prefix", "dual", "t0.9", "t0.5", "dual+t0.9"],
    "Sampler modes: exact, prefix, dual, tτ and combinations like dual+t0.9.",
)
_LIKELIHOOD = flags.DEFINE_integer(
    "likelihood_samples",
    0,
    "Monte-Carlo samples for the model's " "log-likelihood of each answer (0: not computed).",
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per case.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows here.")

PROMPTS = ("ROMEO:\n", "First Citizen:\n", "KING HENRY:\n", "JULIET:\n")


def _model():
  if _WORKDIR.value:
    from llada_jax.data.codec import text_codec  # pylint: disable=g-import-not-at-top
    from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top

    config, params = load_model(_WORKDIR.value)
    return config, params, text_codec(config)
  config = {"tiny": tiny, "llada_1b": llada_1b, "llada_8b": llada_8b}[_CONFIG.value].get_config()
  if _DTYPE.value:
    config.model.update(dtype=_DTYPE.value, param_dtype=_DTYPE.value)
  params = jax.jit(MaskedDiffusionLM(config).init)(jax.random.PRNGKey(0))
  return config, nn.meta.unbox(params), None


def _prompts(codec, batch: int) -> np.ndarray:
  if codec is None:
    return np.full((batch, 16), 40, np.int32)
  ids = [list(codec.encode(PROMPTS[i % len(PROMPTS)])) for i in range(batch)]
  width = max(len(i) for i in ids)
  return np.asarray([[i[0]] * (width - len(i)) + i for i in ids], np.int32)  # same-token pad


def parse_mode(mode: str) -> dict:
  """`dual+t0.9` -> dict(cache="dual", parallel_threshold=0.9); `exact` -> {}."""
  options = {}
  for part in mode.split("+"):
    if part in ("prefix", "dual"):
      options["cache"] = part
    elif part.startswith("t") and part[1:].replace(".", "", 1).isdigit():
      options["parallel_threshold"] = float(part[1:])
    elif part != "exact":
      raise ConfigError(
          f"mode {mode!r} is not allowed: expected exact, prefix, dual, tτ (e.g. "
          "t0.9) or a combination such as dual+t0.9"
      )
  return options


def _nats_per_token(config, params, prompt: np.ndarray, out: np.ndarray, gen: int) -> float:
  """Mean over rows of the model's log-likelihood estimate of its answer, per answer token."""
  result = log_likelihood(
      config,
      params,
      prompt.tolist(),
      out[:, -gen:].tolist(),
      mc_num=_LIKELIHOOD.value,
      batch_size=min(16, _LIKELIHOOD.value),
  )
  return float(np.mean(result.log_likelihood)) / gen


def _forward_seconds(config, params, tokens: np.ndarray, steps: int) -> float:
  """Seconds of `steps` forward passes over `tokens` in one compiled loop (each pass's input
  depends on the step, so none is hoisted out of the loop)."""

  @jax.jit
  def passes(params, tokens):
    def body(i, total):
      return total + logits(config, params, tokens.at[:, 0].set(3 + i % 200))[:, 0, 0].sum()

    return jax.lax.fori_loop(0, steps, body, jnp.float32(0))

  return _timed(lambda: passes(params, jnp.asarray(tokens)))[1]


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
  print(
      f"{device.device_kind} ({device.platform}); model "
      f"{'trained: ' + _WORKDIR.value if _WORKDIR.value else 'random ' + _CONFIG.value}; "
      f"gen {gen}, "
      f"exact steps {steps}, block {_BLOCK.value}"
  )
  modes = {mode: parse_mode(mode) for mode in ["exact"] + [m for m in _MODES.value if m != "exact"]}
  print(
      "batch | mode | tokens/s | speed-up | agreement with exact | nats/token | GFLOP/s | "
      "outside forward"
  )
  rows = []
  for batch in (int(b) for b in _BATCH.value):
    prompt = _prompts(codec, batch)
    kwargs = dict(gen_length=gen, steps=steps, block_length=_BLOCK.value)
    length = prompt.shape[1] + gen
    flops = steps * (
        2 * matmul_parameters(config) * batch * length
        + 4 * config.model.n_layers * batch * length**2 * config.model.d_model
    )
    exact = exact_s = None
    for mode, options in modes.items():
      out, seconds = _timed(lambda o=options: generate(config, params, prompt, **kwargs, **o))
      if mode == "exact":
        exact, exact_s = out, seconds
        outside = 1 - _forward_seconds(config, params, out, steps) / seconds
      row = dict(
          batch=batch,
          mode=mode,
          tokens_per_s=batch * gen / seconds,
          speedup=exact_s / seconds,
          agreement=float(np.mean(out[:, -gen:] == exact[:, -gen:])),
          nats_per_token=(
              _nats_per_token(config, params, prompt, out, gen)
              if _LIKELIHOOD.value
              else float("nan")
          ),
          gflops=flops / exact_s / 1e9 if mode == "exact" else float("nan"),
          outside_forward=outside if mode == "exact" else float("nan"),
      )
      rows.append(row)
      print(
          f"{batch} | {mode} | {row['tokens_per_s']:.0f} | {row['speedup']:.2f}x | "
          f"{row['agreement']:.3f} | {row['nats_per_token']:.3f} | {row['gflops']:.1f} | "
          f"{'-' if mode != 'exact' else format(row['outside_forward'], '.1%')}",
          flush=True,
      )
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(dict(device=device.device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)
