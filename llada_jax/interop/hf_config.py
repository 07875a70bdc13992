"""The official LLaDA `config.json` <-> the llada_jax config (model and token sections)."""

from __future__ import annotations

from typing import Any

import ml_collections

from llada_jax.config import default_config, validate
from llada_jax.errors import CheckpointError

# The vocabulary of an exported model: "byte" and "spm8k" ship with llada_jax, "llada_hf" comes as
# tokenizer.json beside config.json. The official loader ignores the field; import reads it back.
VOCABULARY_FIELD = "llada_jax_vocabulary"

# Features of the OLMo-derived LLaDA config that this model does not implement: (field, required).
REQUIRED = (
    ("block_type", "llama"),
    ("alibi", False),
    ("include_bias", False),
    ("include_qkv_bias", False),
    ("weight_tying", False),
    ("attention_layer_norm", False),
    ("layer_norm_type", "rms"),
    ("activation_type", "silu"),
    ("rope", True),
    ("scale_logits", False),
    ("input_emb_norm", False),
)


def config_from_hf(
    hf: dict[str, Any],
    base: ml_collections.ConfigDict | None = None,
    tokenizer_ids: dict[str, int] | None = None,
) -> ml_collections.ConfigDict:
  """A validated llada_jax config for an HF LLaDA config.json (other sections from `base`).

  tokenizer_ids: the special ids of the folder's tokenizer.json (`HFTokenizer.special`), which
  name what config.json does not (BOS, end of turn); ids both give must agree. Without a
  tokenizer, config.json's ids (or the LLaDA defaults) are used and BOS/EoT stay as in `base`.

  Raises:
    CheckpointError: unsupported architecture features, missing fields, or an id config.json
      gives that differs from the tokenizer's.
  """
  for field, required in REQUIRED:
    if field in hf and hf[field] not in (required, None):
      raise CheckpointError(
          f"config.json {field}={hf[field]!r} is not supported: llada_jax "
          f"implements {field}={required!r}"
      )
  for field in ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size"):
    if field not in hf:
      raise CheckpointError(f"config.json has no {field!r}: not a LLaDA config")
  config = default_config() if base is None else ml_collections.ConfigDict(base.to_dict())
  vocab = int(hf.get("embedding_size") or hf["vocab_size"])
  config.model.update(
      dict(
          vocab_size=vocab,
          d_model=int(hf["d_model"]),
          n_layers=int(hf["n_layers"]),
          n_heads=int(hf["n_heads"]),
          n_kv_heads=int(hf.get("n_kv_heads") or hf["n_heads"]),
          mlp_hidden_size=int(hf["mlp_hidden_size"]),
          max_sequence_length=int(hf.get("max_sequence_length", 4096)),
          rope_theta=float(hf.get("rope_theta", 10000.0)),
          rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
          init_std=float(hf.get("init_std", 0.02)),
      )
  )
  ids = {"mask_id": hf.get("mask_token_id"), "eos_id": hf.get("eos_token_id")}
  for name, field in (("mask_id", "mask_token_id"), ("eos_id", "eos_token_id")):
    if tokenizer_ids and ids[name] is not None and int(ids[name]) != tokenizer_ids[name]:
      raise CheckpointError(
          f"config.json {field}={ids[name]} is not allowed: tokenizer.json has "
          f"{tokenizer_ids[name]} for that token"
      )
    ids[name] = int(
        tokenizer_ids[name]
        if tokenizer_ids
        else ids[name]
        if ids[name] is not None
        else {"mask_id": 126336, "eos_id": 126081}[name]
    )
  pad = hf.get("pad_token_id")
  config.tokens.update(
      dict(
          mask_id=ids["mask_id"],
          eos_id=ids["eos_id"],
          pad_id=ids["eos_id"] if pad is None else int(pad),
      )
  )
  if tokenizer_ids:
    config.tokens.update(
        {
            name: tokenizer_ids[name] if 0 <= tokenizer_ids[name] < vocab else -1
            for name in ("bos_id", "eot_id")
        }
    )
  if config.tokens.bos_id >= vocab or config.tokens.eot_id >= vocab:
    config.tokens.update(dict(bos_id=-1, eot_id=-1))
  config.data.vocabulary = hf.get(VOCABULARY_FIELD, "llada_hf")
  config.data.sequence_length = min(config.data.sequence_length, config.model.max_sequence_length)
  return validate(config)


def config_to_hf(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config.json the official LLaDA loader reads for this model."""
  m, t = config.model, config.tokens
  hf = dict(REQUIRED)
  hf.update(
      {
          "architectures": ["LLaDAModelLM"],
          "model_type": "llada",
          "d_model": m.d_model,
          "n_heads": m.n_heads,
          "n_kv_heads": m.n_kv_heads,
          "n_layers": m.n_layers,
          "mlp_hidden_size": m.mlp_hidden_size,
          "mlp_ratio": 4,
          "vocab_size": m.vocab_size,
          "embedding_size": m.vocab_size,
          "max_sequence_length": m.max_sequence_length,
          "rope_theta": m.rope_theta,
          "rms_norm_eps": m.rms_norm_eps,
          "rope_full_precision": True,
          "layer_norm_with_affine": True,
          "bias_for_layer_norm": False,
          "attention_layer_norm_with_affine": True,
          "multi_query_attention": None,
          "block_group_size": 1,
          "init_std": m.init_std,
          "init_fn": "mitchell",
          "attention_dropout": 0.0,
          "residual_dropout": 0.0,
          "embedding_dropout": 0.0,
          "flash_attention": False,
          "use_cache": False,
          "mask_token_id": t.mask_id,
          "eos_token_id": t.eos_id,
          "pad_token_id": t.pad_id,
          VOCABULARY_FIELD: config.data.vocabulary,
      }
  )
  if t.bos_id >= 0:
    hf["bos_token_id"] = t.bos_id
  return hf
