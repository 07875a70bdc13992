"""LLaDA-8B (official HF config.json): 32 layers, d 4096, 32 heads, FFN 12288, vocab 126464.

Paper recipe: AdamW (weight decay 0.1), sequence length 4096, global batch 1280, Warmup-Stable-Decay
(0 -> 4e-4 over 2000 steps, hold to 1.2T tokens, then 1e-4, then linear decay to 1e-5 over the last
0.3T of 2.3T tokens). One step is 1280 x 4096 = 5.24M tokens, so 2.3T tokens = 438,700 steps.
"""

import ml_collections

from llada_jax.config import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model.update(
      dict(
          vocab_size=126464,
          d_model=4096,
          n_layers=32,
          n_heads=32,
          n_kv_heads=32,
          mlp_hidden_size=12288,
          max_sequence_length=4096,
          rope_theta=500000.0,
          rms_norm_eps=1e-5,
          dtype="bfloat16",
          param_dtype="float32",
          remat="full",
          # splash attention on TPUs (docs/scaling.md's rows), cuDNN on GPUs, XLA elsewhere.
          attention="auto",
      )
  )
  c.tokens.update(dict(mask_id=126336, pad_id=126081, eos_id=126081, bos_id=126080, eot_id=126348))
  c.data.update(dict(vocabulary="llada_hf", sequence_length=4096, batch_size=1280))
  c.optimizer.update(
      dict(
          peak_lr=4e-4,
          warmup_steps=2000,
          lr_drop_step=228_900,
          lr_after_drop=1e-4,
          decay_fraction=0.13,
          final_lr=1e-5,
          weight_decay=0.1,
      )
  )
  c.train.update(dict(num_steps=438_700, log_every=10, eval_every=1000))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.checkpoint.update(dict(save_every=1000, keep=3))
  c.sampling.update(dict(steps=256, gen_length=256, block_length=32))
  return c
