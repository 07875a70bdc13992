"""The MoE feed-forward against a dense SwiGLU of the same active FLOPs: tokens/s, both directions.

  python benchmarks/moe.py                      # LLaDA2.0-mini's layer shape at 1/4 width
  python benchmarks/moe.py --small              # CI-sized
  python benchmarks/moe.py --tokens=16384 --d_model=2048 --experts=256 --k=8 --expert_hidden=512

Compared (forward + backward of one layer, jit-compiled, the median of --repeats timed runs):
  ragged: the MoE layer as trained (router, tokens sorted by expert, three grouped matmuls
    `jax.lax.ragged_dot`, one shared expert), llada_jax.model.moe.MoEFeedForward;
  dense_experts: the same layer computing every expert on every token (E / k times the FLOPs; the
    tests' reference);
  swiglu: a dense SwiGLU whose hidden width (k + shared) x expert_hidden gives the MoE layer's
    active matmul FLOPs (the router's d x E excluded), the number to compare with.
FLOPs per token (forward + backward = 3 x forward): 6 x 3 d f_active for swiglu and ragged, plus
6 d E for the router; 6 x 3 d f E' for dense_experts with E' = E + shared. The last line is one JSON
object of every row, with the device named.
"""

from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from llada_jax.model.moe import MoEConfig, MoEFeedForward

_SMALL = flags.DEFINE_bool("small", False, "CI-sized: 1024 tokens, d 64, 16 experts.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per call (batch x length).")
_D = flags.DEFINE_integer("d_model", 512, "Model width.")
_EXPERTS = flags.DEFINE_integer("experts", 64, "Routed experts.")
_K = flags.DEFINE_integer("k", 8, "Experts per token.")
_HIDDEN = flags.DEFINE_integer("expert_hidden", 128, "Hidden width of each expert.")
_SHARED = flags.DEFINE_integer("shared", 1, "Shared experts.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per case.")


def _moe(implementation: str, d: int, experts: int, k: int, hidden: int, shared: int) -> MoEConfig:
  return MoEConfig(
      num_experts=experts,
      experts_per_token=k,
      expert_hidden_size=hidden,
      num_shared_experts=shared,
      first_k_dense_replace=0,
      router="sigmoid_grouped",
      n_group=1,
      topk_group=1,
      routed_scaling_factor=1.0,
      norm_topk_prob=True,
      implementation=implementation,
      aux_loss_coef=0.0,
      z_loss_coef=0.0,
      bias_update_rate=0.0,
  )


class SwiGLU(nn.Module):
  hidden: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, name=name)
    h = nn.silu(dense(self.hidden, "gate")(x)) * dense(self.hidden, "up")(x)
    return dense(x.shape[-1], "down")(h), {}


def _time(module: nn.Module, x: jax.Array, repeats: int) -> float:
  params = jax.jit(module.init)(jax.random.PRNGKey(0), x)

  def loss(p, x):
    y, _ = module.apply(p, x)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  jax.block_until_ready(step(params, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv: list[str]) -> None:
  del argv
  if _SMALL.value:
    tokens, d, experts, k, hidden, shared, repeats = 1024, 64, 16, 2, 32, 1, 2
  else:
    tokens, d, experts, k, hidden, shared = (
        _TOKENS.value,
        _D.value,
        _EXPERTS.value,
        _K.value,
        _HIDDEN.value,
        _SHARED.value,
    )
    repeats = _REPEATS.value
  dtype = jnp.dtype(_DTYPE.value)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, tokens, d), dtype)
  active = (k + shared) * hidden
  flops = {
      "swiglu": 6 * 3 * d * active,
      "ragged": 6 * 3 * d * active + 6 * d * experts,
      "dense_experts": 6 * 3 * d * hidden * (experts + shared) + 6 * d * experts,
  }
  modules = {
      "swiglu": SwiGLU(active, dtype),
      "ragged": MoEFeedForward(
          _moe("ragged", d, experts, k, hidden, shared), d, 0.02, dtype, dtype
      ),
      "dense_experts": MoEFeedForward(
          _moe("dense", d, experts, k, hidden, shared), d, 0.02, dtype, dtype
      ),
  }
  device = jax.devices()[0].device_kind
  rows = []
  for name, module in modules.items():
    seconds = _time(module, x, repeats)
    rows.append(
        {
            "layer": name,
            "tokens_per_s": tokens / seconds,
            "gflops_per_s": flops[name] * tokens / seconds / 1e9,
            "flops_per_token": flops[name],
            "seconds": seconds,
        }
    )
    print(
        f"{name:>14}: {tokens / seconds:12.0f} tokens/s  {rows[-1]['gflops_per_s']:8.1f} GFLOP/s"
        f"  ({seconds * 1e3:.1f} ms per forward + backward)"
    )
  ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
  print(f"ragged MoE / dense SwiGLU of the same active FLOPs: {ratio:.2f}x tokens/s on {device}")
  print(
      json.dumps(
          {
              "device": device,
              "shape": dict(tokens=tokens, d_model=d, experts=experts, k=k, hidden=hidden),
              "dtype": str(dtype),
              "rows": rows,
              "ragged_over_swiglu": ratio,
          }
      )
  )


if __name__ == "__main__":
  app.run(main)
