"""LLaDA 1B (paper Table 5): 22 layers, d 2048, 32 heads with 4 KV heads (GQA), FFN 5634, vocab 126464.

1.49B parameters, 0.97B of them outside the embedding and head. Tokenizer, token ids and optimizer
as LLaDA-8B; the step budget is a placeholder to set per experiment. The ARM 1B baseline has the
same shape with `model.causal=True` and `diffusion.objective="arm"`.
"""

import ml_collections

from configs import llada_8b


def get_config() -> ml_collections.ConfigDict:
  c = llada_8b.get_config()
  c.model.update(dict(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, mlp_hidden_size=5634))
  c.data.batch_size = 512
  c.optimizer.update(dict(lr_drop_step=0, lr_after_drop=0.0))
  c.train.num_steps = 100_000
  return c
