"""Tiny HuggingFace LLaDA folders written by the tests themselves (random weights, safetensors)."""

import json

import numpy as np
import safetensors.numpy

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


def official_config(config) -> dict:
  """config.json as the official LLaDA-8B folders ship it (GSAI-ML/LLaDA-8B-Base), written out
  field by field, not through llada_jax's own exporter: the sizes and token ids are `config`'s."""
  m, t = config.model, config.tokens
  return {
      "activation_type": "silu",
      "alibi": False,
      "alibi_bias_max": 8.0,
      "architectures": ["LLaDAModelLM"],
      "attention_dropout": 0.0,
      "attention_layer_norm": False,
      "attention_layer_norm_with_affine": True,
      "auto_map": {
          "AutoConfig": "configuration_llada.LLaDAConfig",
          "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
          "AutoModel": "modeling_llada.LLaDAModelLM",
      },
      "bias_for_layer_norm": False,
      "block_group_size": 1,
      "block_type": "llama",
      "d_model": m.d_model,
      "embedding_dropout": 0.0,
      "embedding_size": m.vocab_size,
      "eos_token_id": t.eos_id,
      "flash_attention": False,
      "include_bias": False,
      "include_qkv_bias": False,
      "init_cutoff_factor": None,
      "init_device": "meta",
      "init_fn": "mitchell",
      "init_std": m.init_std,
      "input_emb_norm": False,
      "layer_norm_type": "rms",
      "layer_norm_with_affine": True,
      "mask_token_id": t.mask_id,
      "max_sequence_length": m.max_sequence_length,
      "mlp_hidden_size": m.mlp_hidden_size,
      "mlp_ratio": 4,
      "model_type": "llada",
      "multi_query_attention": None,
      "n_heads": m.n_heads,
      "n_kv_heads": m.n_kv_heads,
      "n_layers": m.n_layers,
      "pad_token_id": t.pad_id,
      "precision": "amp_bf16",
      "residual_dropout": 0.0,
      "rms_norm_eps": m.rms_norm_eps,
      "rope": True,
      "rope_full_precision": True,
      "rope_theta": m.rope_theta,
      "scale_logits": False,
      "torch_dtype": "bfloat16",
      "transformers_version": "4.46.3",
      "use_cache": False,
      "vocab_size": m.vocab_size,
      "weight_tying": False,
  }


def write_folder(path, config, tensors, shards=1):
  """config.json (official_config) plus one safetensors file, or `shards` files and an index, all
  written by the `safetensors` package as `transformers` writes them (metadata format=pt)."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(official_config(config), indent=2))
  names = sorted(tensors)
  if shards == 1:
    safetensors.numpy.save_file(dict(tensors), str(path / "model.safetensors"), {"format": "pt"})
    return path
  weight_map = {}
  for i in range(shards):
    part = names[i::shards]
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    safetensors.numpy.save_file({n: tensors[n] for n in part}, str(path / file), {"format": "pt"})
    weight_map.update({n: file for n in part})
  total = sum(t.nbytes for t in tensors.values())
  (path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
  )
  return path
