"""LLaDA 1B (paper Table 5): 22 layers, d 2048, 32 heads with 4 KV heads (GQA), FFN 5634, vocab 126464.

1.49B parameters, 0.97B of them outside the embedding and head. The ARM 1B baseline has the same
shape with `model.causal=True`. Tokenizer, ids and recipe as LLaDA-8B.
"""

import ml_collections

from llada_jax.config import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model.update(dict(
      vocab_size=126464, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
      mlp_hidden_size=5634, max_sequence_length=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
      dtype="bfloat16", param_dtype="float32", remat="full"))
  c.tokens.update(dict(mask_id=126336, pad_id=126081, eos_id=126081, bos_id=126080, eot_id=126348))
  c.data.update(dict(vocabulary="llada_hf", sequence_length=4096, batch_size=512))
  c.optimizer.update(dict(peak_lr=4e-4, warmup_steps=2000, weight_decay=0.1, final_lr=1e-5))
  c.train.update(dict(num_steps=100_000, eval_every=1000))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.checkpoint.update(dict(save_every=1000, keep=3))
  return c
