"""LLaDA2.0-flash (inclusionAI, llada2_moe): a 100B Mixture-of-Experts block diffusion model with
6.1B active parameters (dFactory configs/model_configs/llada2_flash/config.json; docs/moe.md).

LLaDA2.0-mini's architecture (configs/llada2_mini.py) at its larger sizes: 32 layers (layer 0 a
dense SwiGLU of 9216), d 4096, 32 heads of 128 with 4 KV heads, 256 routed experts of 1024 (8 per
token) plus one shared expert. Parameters: 102,889,697,280 (+ 7,936 expert biases), as the
official modeling code counts them; 6,152,269,824 active per token.

Expert parallelism on a pod: `llada-compile --config=configs/llada2_flash.py --topology=v5p:4x4x8
--config.mesh.expert=32`.
"""

import ml_collections

from configs import llada2_mini


def get_config() -> ml_collections.ConfigDict:
  c = llada2_mini.get_config()
  c.model.update(dict(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=9216))
  c.model.moe.expert_hidden_size = 1024
  return c
