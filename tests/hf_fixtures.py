"""Tiny HuggingFace LLaDA folders written by the tests themselves (random weights, safetensors)."""

import json

import numpy as np

from llada_jax.interop import safetensors_io
from llada_jax.interop.hf_config import VOCABULARY_FIELD, config_to_hf

P = "model.transformer."


def hf_tensors(config, dtype=np.float32, seed=0) -> dict[str, np.ndarray]:
  """Random weights in PyTorch layout under the official HF names."""
  m = config.model
  d, h, k, f, v = m.d_model, m.n_heads, m.n_kv_heads, m.mlp_hidden_size, m.vocab_size
  hd = d // h
  rng = np.random.RandomState(seed)
  shapes = {P + "wte.weight": (v, d), P + "ln_f.weight": (d,), P + "ff_out.weight": (v, d)}
  for i in range(m.n_layers):
    b = f"{P}blocks.{i}."
    shapes.update(
        {
            b + "attn_norm.weight": (d,),
            b + "ff_norm.weight": (d,),
            b + "q_proj.weight": (h * hd, d),
            b + "k_proj.weight": (k * hd, d),
            b + "v_proj.weight": (k * hd, d),
            b + "attn_out.weight": (d, h * hd),
            b + "ff_proj.weight": (f, d),
            b + "up_proj.weight": (f, d),
            b + "ff_out.weight": (d, f),
        }
    )
  return {
      name: (1.0 + 0.1 * rng.randn(*s) if len(s) == 1 else 0.2 * rng.randn(*s)).astype(dtype)
      for name, s in shapes.items()
  }


def write_folder(path, config, tensors, shards=1):
  """config.json (as the official one: no llada_jax vocabulary field) plus one safetensors file, or
  `shards` files and an index."""
  path.mkdir(parents=True, exist_ok=True)
  hf = config_to_hf(config)
  del hf[VOCABULARY_FIELD]
  (path / "config.json").write_text(json.dumps(hf))
  names = sorted(tensors)
  if shards == 1:
    safetensors_io.write_file(path / "model.safetensors", tensors)
    return path
  weight_map = {}
  for i in range(shards):
    part = names[i::shards]
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    safetensors_io.write_file(path / file, {n: tensors[n] for n in part})
    weight_map.update({n: file for n in part})
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return path
