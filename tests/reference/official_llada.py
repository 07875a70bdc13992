"""The official dense LLaDA PyTorch model (modeling_llada.py), run on tiny random weights (float32).

The modeling file under `official/` is vendored unmodified (see official/README.md). It was written
for transformers 4.x; two things make it run here without touching it:

  1. `LLaDAModelLM.__init__` builds its network with `init_device = "cuda"` hard-coded (the comment
     beside it says CPU). The constructor takes a ready `model=`, so the network is built here with
     the same `create_model_config_from_pretrained_config` and `init_device="cpu"`.
  2. 5.x's PretrainedConfig does not keep `use_cache`, which the official forward reads; it is set
     on the instance (False: no cache, as the official folders ship it).

Folders are written as the official ones are (GSAI-ML/LLaDA-8B-Base's config.json keys, one
safetensors file under the official names `model.transformer.*`); with weight_tying the file has
no `ff_out.weight` (the official model reads the head from `wte`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import safetensors.torch
import torch

from . import official_moe  # pylint: disable=unused-import  (its transformers 5.x shims)
from .official.configuration_llada import LLaDAConfig
from .official.modeling_llada import (
    LLaDAModel,
    LLaDAModelLM,
    create_model_config_from_pretrained_config,
)

_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM",
}


def _official(config: dict[str, Any]) -> torch.nn.Module:
  """The official LLaDAModelLM of a config.json dict, float32, eval mode, built on the CPU."""
  hf_config = LLaDAConfig(**{k: v for k, v in config.items() if k not in ("auto_map",)})
  inner = create_model_config_from_pretrained_config(hf_config)
  inner.init_device = "cpu"
  model = LLaDAModelLM(hf_config, model=LLaDAModel(inner, init_params=True))
  model.config.use_cache = False
  return model.float().eval()


def build_llada_folder(
    path: str,
    *,
    vocab_size: int = 128,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 4,
    mlp_hidden_size: int = 96,
    weight_tying: bool = False,
    rope_theta: float = 500000.0,
    mask_token_id: int = 126,
    eos_token_id: int = 125,
    seed: int = 0,
) -> None:
  """Writes a tiny random official LLaDA folder: config.json with the official 8B folders' keys
  (only the sizes, ids and weight_tying changed) and model.safetensors from the official model's
  state dict (weights ~ N(0, 1/fan_in), embedding N(0, 1), norms 1 + 0.1 N(0, 1))."""
  config = {
      "activation_type": "silu",
      "alibi": False,
      "alibi_bias_max": 8.0,
      "architectures": ["LLaDAModelLM"],
      "attention_dropout": 0.0,
      "attention_layer_norm": False,
      "attention_layer_norm_with_affine": True,
      "auto_map": _AUTO_MAP,
      "bias_for_layer_norm": False,
      "block_group_size": 1,
      "block_type": "llama",
      "d_model": d_model,
      "embedding_dropout": 0.0,
      "embedding_size": vocab_size,
      "eos_token_id": eos_token_id,
      "flash_attention": False,
      "include_bias": False,
      "include_qkv_bias": False,
      "init_cutoff_factor": None,
      "init_device": "meta",
      "init_fn": "mitchell",
      "init_std": 0.02,
      "input_emb_norm": False,
      "layer_norm_type": "rms",
      "layer_norm_with_affine": True,
      "mask_token_id": mask_token_id,
      "max_sequence_length": 64,
      "mlp_hidden_size": mlp_hidden_size,
      "mlp_ratio": 4,
      "model_type": "llada",
      "multi_query_attention": None,
      "n_heads": n_heads,
      "n_kv_heads": n_kv_heads,
      "n_layers": n_layers,
      "pad_token_id": eos_token_id,
      "precision": "amp_bf16",
      "residual_dropout": 0.0,
      "rms_norm_eps": 1e-5,
      "rope": True,
      "rope_full_precision": True,
      "rope_theta": rope_theta,
      "scale_logits": False,
      "torch_dtype": "float32",
      "use_cache": False,
      "vocab_size": vocab_size,
      "weight_tying": weight_tying,
  }
  model = _official(config)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if p.ndim == 1:
        p.copy_(1.0 + 0.1 * r)
      elif name.endswith("wte.weight"):
        p.copy_(r)
      else:
        p.copy_(r * p.shape[-1] ** -0.5)
  os.makedirs(path, exist_ok=True)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  safetensors.torch.save_file(state, os.path.join(path, "model.safetensors"), {"format": "pt"})
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)


def load_official(path: str) -> torch.nn.Module:
  """The official model of a LLaDA folder (one safetensors file), weights loaded strictly."""
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    model = _official(json.load(f))
  state = safetensors.torch.load_file(os.path.join(path, "model.safetensors"))
  model.load_state_dict(state, strict=True)
  return model


def official_logits(path: str, tokens: np.ndarray) -> np.ndarray:
  """Float32 logits [B, L, V] of the official bidirectional forward (no attention mask)."""
  model = load_official(path)
  with torch.no_grad():
    out = model(torch.from_numpy(np.asarray(tokens, np.int64))).logits
  return out.float().numpy()
