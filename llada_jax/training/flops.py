"""Model FLOPs of a training step and MFU (docs/llada.md, "Model FLOPs and MFU").

Per token: 6 N_matmul + 12 n_layers S d_attn, where N_matmul counts every weight used in a matmul
(the output head included, the embedding lookup not) and attention is bidirectional, not halved;
block diffusion's two-stream pass doubles the blocks' tokens and keys (`model_flops_per_token`).
MFU = model FLOPs per step / step time / (devices x peak). Rematerialisation is never counted.
Scaling plots also use the 6 N D convention (docs/llada.md) with N the non-embedding
parameters (Kaplan et al.; neither the embedding nor the head), as LLaDA and SMDM report.
"""

from __future__ import annotations

import jax
import ml_collections

from llada_jax.config import objective_of
from llada_jax.parallel.topology import chip


def matmul_parameters(config: ml_collections.ConfigDict) -> int:
  """Weights one token meets in matmuls: attention and SwiGLU projections of every layer, and the
  head. A MoE layer counts its *active* weights (DeepSeek-V3's and LLaDA 2.0's convention): the
  router, the k routed experts a token goes to and the shared experts; not the E - k others."""
  m, moe = config.model, config.model.moe
  head_dim = m.d_model // m.n_heads
  attention = m.d_model * head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)  # q, out; k, v
  dense = 3 * m.d_model * m.mlp_hidden_size
  moe_layers = 0
  active = 0
  if moe.num_experts:
    moe_layers = m.n_layers - min(moe.first_k_dense_replace, m.n_layers)
    routed = moe.experts_per_token + moe.num_shared_experts
    active = m.d_model * moe.num_experts + 3 * m.d_model * moe.expert_hidden_size * routed
  return (
      m.n_layers * attention
      + (m.n_layers - moe_layers) * dense
      + moe_layers * active
      + m.d_model * m.vocab_size
  )


def non_embedding_parameters(config: ml_collections.ConfigDict) -> int:
  """N of the 6 N D convention: the weights of the blocks, norms included (QK-norm too); no
  embedding or head. A MoE model's active N (`matmul_parameters`)."""
  m = config.model
  norms = (2 * m.n_layers + 1) * m.d_model + (
      2 * m.n_layers * m.d_model // m.n_heads if m.qk_norm else 0
  )
  return matmul_parameters(config) - m.d_model * m.vocab_size + norms


def model_flops_per_token(config: ml_collections.ConfigDict) -> float:
  """Training FLOPs per token at the configured sequence length (forward + backward).

  A block objective runs the blocks on the two-stream input [x_t ; x_0] (BD3-LM): two positions
  per token through every layer, each attending over 2L keys (counted dense, as the kernels
  compute them), the head on the noisy half only.
  """
  m = config.model
  streams = objective_of(config).streams
  head = m.d_model * m.vocab_size
  return float(
      6 * (streams * (matmul_parameters(config) - head) + head)
      + 12 * m.n_layers * streams * streams * config.data.sequence_length * m.d_model
  )


def forward_flops_per_token(config: ml_collections.ConfigDict, length: int) -> float:
  """FLOPs of one forward pass per token of a `length`-token row (inference: sampling, scoring):
  a third of the training count, 2 N_matmul + 4 n_layers S d_attn."""
  m = config.model
  return float(2 * matmul_parameters(config) + 4 * m.n_layers * length * m.d_model)


def model_flops_per_step(config: ml_collections.ConfigDict, prompt_width: int = 0) -> float:
  """Training FLOPs of one step of the global batch. A DPO step (posttrain.method "dpo") scores
  both answers of data.batch_size pairs with posttrain.mc_num rows of data.sequence_length
  tokens each, under the policy (forward and backward: 3 forward passes) and the reference (one
  forward pass): 4 forward passes of 2 x batch x mc_num rows. A GRPO update ("grpo") is the same
  4 passes over data.batch_size rollouts of prompt_width + sampling.gen_length tokens (d1's one
  pass each; the rollouts' sampling is the sampler's program, not counted here, nor are the
  sampling policy's passes of posttrain.inner_updates > 1, one per update, made when sampling)."""
  if config.posttrain.method == "dpo":
    length = config.data.sequence_length
    rows = 2 * config.data.batch_size * config.posttrain.mc_num
    return 4 * rows * length * forward_flops_per_token(config, length)
  if config.posttrain.method == "grpo":
    length = prompt_width + config.sampling.gen_length
    return 4 * config.data.batch_size * length * forward_flops_per_token(config, length)
  return model_flops_per_token(config) * config.data.batch_size * config.data.sequence_length


def peak_flops(device: jax.Device) -> float | None:
  """Peak dense bf16 FLOP/s of one device's chip (llada_jax.parallel.topology.CHIPS), or None for
  kinds not in that table (e.g. CPUs)."""
  found = chip(device)
  return None if found is None else found.peak_flops
