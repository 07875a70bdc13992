"""A seconds-scale config for command-line tests: the tiny config, shrunk."""

import ml_collections

from llada_jax.config import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model.update(
      dict(
          d_model=32,
          n_layers=1,
          n_heads=2,
          n_kv_heads=1,
          mlp_hidden_size=64,
          max_sequence_length=64,
      )
  )
  c.data.update(dict(sequence_length=32, batch_size=8, shuffle_buffer=64))
  c.optimizer.update(dict(warmup_steps=1))
  c.train.update(dict(num_steps=3, log_every=1, eval_every=3, eval_batches=1))
  c.checkpoint.update(dict(save_every=2, keep=2))
  c.sampling.update(dict(steps=4, gen_length=8, block_length=4))
  return c
