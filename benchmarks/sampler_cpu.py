"""Wall time per reverse-process step of configs/tiny.py on this machine's CPU, batch 1 and 8.

  python benchmarks/sampler_cpu.py [--gen_length=112 --steps=112]

Each step is one forward pass over prompt + answer (no cache), so the cost per step is
2 * N_matmul * B * L FLOPs plus attention; the printed GFLOP/s puts the time next to that count.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import tiny
from llada_jax.model import ModelConfig, Transformer
from llada_jax.sampling import generate

_GEN_LENGTH = flags.DEFINE_integer("gen_length", 112, "Answer length.")
_STEPS = flags.DEFINE_integer("steps", 112, "Reverse-process steps.")
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 16, "Prompt length.")


def main(argv: list[str]) -> None:
  del argv
  config = tiny.get_config()
  model = Transformer(ModelConfig.from_config(config))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  m = config.model
  n_matmul = m.n_layers * (4 * m.d_model ** 2 + 3 * m.d_model * m.mlp_hidden_size) \
      + m.d_model * m.vocab_size
  length = _PROMPT_LENGTH.value + _GEN_LENGTH.value
  print(f"device: {jax.devices()[0].device_kind}; {len(jax.devices())} device(s)")
  for batch in (1, 8):
    prompt = np.full((batch, _PROMPT_LENGTH.value), 40, np.int32)
    kwargs = dict(steps=_STEPS.value, gen_length=_GEN_LENGTH.value, block_length=16,
                  remasking="low_confidence")
    jax.block_until_ready(generate(config, params, prompt, **kwargs))  # compile
    start = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
      jax.block_until_ready(generate(config, params, prompt, **kwargs))
    per_step = (time.perf_counter() - start) / repeats / _STEPS.value
    flops = 2 * n_matmul * batch * length + 4 * m.n_layers * batch * length ** 2 * m.d_model
    print(f"batch {batch}: {per_step * 1e3:.2f} ms/step, {batch * _GEN_LENGTH.value / (per_step * _STEPS.value):.0f} "
          f"generated tokens/s, {flops / per_step / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
  app.run(main)
