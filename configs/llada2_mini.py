"""LLaDA2.0-mini (inclusionAI, llada2_moe): a 16B Mixture-of-Experts block diffusion model with
1.4B active parameters (dFactory configs/model_configs/llada2_mini/config.json; docs/moe.md).

20 layers (layer 0 a dense SwiGLU of 5120), d 2048, 16 heads of 128 with 4 KV heads, QK-norm, RoPE
(theta 600000) on the first 64 dims of each head; every other layer 256 routed experts of 512
(8 per token: sigmoid scores, expert-bias selection in 8 groups keeping 4, weights renormalised
x 2.5) plus one shared expert; vocabulary 157184 (mask 156895, EOS 156892); untied head. Block
diffusion with blocks of 32. Parameters: 16,255,638,528 (+ 4,864 expert biases), as the official
modeling code counts them; 1,432,968,192 active per token.

The data sections name the tokenizer of a converted folder: `llada-convert from-hf` of the
official checkpoint writes a workdir with all of this; this config is for training from scratch or
compiling (`llada-compile --config=configs/llada2_mini.py --topology=v5p:2x2x2`).
"""

import ml_collections

from llada_jax.config import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model.update(
      dict(
          vocab_size=157184,
          d_model=2048,
          n_layers=20,
          n_heads=16,
          n_kv_heads=4,
          mlp_hidden_size=5120,
          max_sequence_length=16384,
          rope_theta=600000.0,
          rms_norm_eps=1e-6,
          qk_norm=True,
          rotary_dim=64,
          dtype="bfloat16",
          param_dtype="float32",
          remat="full",
          attention="auto",
      )
  )
  c.model.moe.update(
      dict(
          num_experts=256,
          experts_per_token=8,
          expert_hidden_size=512,
          num_shared_experts=1,
          first_k_dense_replace=1,
          router="sigmoid_grouped",
          n_group=8,
          topk_group=4,
          routed_scaling_factor=2.5,
          norm_topk_prob=True,
          bias_update_rate=1e-3,
      )
  )
  c.tokens.update(dict(mask_id=156895, pad_id=156892, eos_id=156892, bos_id=-1))
  c.data.update(dict(sequence_length=4096, batch_size=512))
  c.diffusion.update(dict(objective="block", block_size=32, logit_alignment="same"))
  c.optimizer.update(dict(peak_lr=3e-4, warmup_steps=2000, weight_decay=0.1))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.checkpoint.update(dict(save_every=1000, keep=3))
  c.sampling.update(dict(gen_length=256, block_length=32, steps=32))
  return c
