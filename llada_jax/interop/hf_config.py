"""The official LLaDA `config.json` <-> the llada_jax config (model, token and diffusion sections).

What the official format has no field for is recorded in `llada_jax_*` fields, which the official
loader (and transformers, for an exported Llama) ignores and the import reads back: the vocabulary,
the objective and block size of a block model, the logit alignment, the end-of-turn id.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from llada_jax.config import (
    LOGIT_ALIGNMENTS,
    OBJECTIVES,
    VOCABULARY_SIZES,
    default_config,
    objective_of,
    validate,
)
from llada_jax.diffusion.alignment import resolve
from llada_jax.errors import CheckpointError, ConfigError

# The vocabulary of an exported model: "byte" and "spm8k" ship with llada_jax, "llada_hf" and "hf"
# come as tokenizer.json beside config.json. The official loader ignores the field; import reads
# it back (a LLaDA folder without it is "llada_hf", a Llama/Mistral one "hf").
VOCABULARY_FIELD = "llada_jax_vocabulary"
# diffusion.objective of a LLaDA folder ("mdm" when absent; an ARM is exported as a Llama folder).
OBJECTIVE_FIELD = "llada_jax_objective"
# diffusion.block_size of a block model (written for objective "block" only).
BLOCK_SIZE_FIELD = "llada_jax_block_size"
# The resolved diffusion.logit_alignment of an MDM or block model ("same" when absent: LLaDA's).
ALIGNMENT_FIELD = "llada_jax_logit_alignment"
# tokens.eot_id, the end-of-turn token (absent: none, or the tokenizer's <|eot_id|>).
EOT_FIELD = "llada_jax_eot_token_id"

# Features of the OLMo-derived LLaDA config that this model does not implement: (field, required).
REQUIRED = (
    ("block_type", "llama"),
    ("alibi", False),
    ("include_bias", False),
    ("include_qkv_bias", False),
    ("attention_layer_norm", False),
    ("layer_norm_type", "rms"),
    ("activation_type", "silu"),
    ("rope", True),
    ("scale_logits", False),
    ("input_emb_norm", False),
)


# Token ids of config.json (the official field names, and EOT_FIELD) and, for those config.json
# may leave out, the official LLaDA ids (mask and EOS; BOS and EoT then stay as in the base).
TOKEN_FIELDS = {
    "mask_id": "mask_token_id",
    "eos_id": "eos_token_id",
    "bos_id": "bos_token_id",
    "eot_id": EOT_FIELD,
}
LLADA_IDS = {"mask_id": 126336, "eos_id": 126081}


def recorded_choice(
    hf: dict[str, Any], field: str, default: str, allowed: tuple[str, ...], source: str
) -> str:
  """config.json's `field` (one of `allowed`), or `default` when it has none.

  Raises:
    CheckpointError: a value outside `allowed`, named with `source`.
  """
  value = hf.get(field, default)
  if value not in allowed:
    raise CheckpointError(
        f"{source} {field}={value!r} is not allowed: expected one of {', '.join(allowed)}"
    )
  return value


def config_from_hf(
    hf: dict[str, Any],
    base: ml_collections.ConfigDict | None = None,
    tokenizer_ids: dict[str, int] | None = None,
    source: str = "config.json",
) -> ml_collections.ConfigDict:
  """A validated llada_jax config for an HF LLaDA config.json (other sections from `base`).

  tokenizer_ids: the special ids of the folder's tokenizer.json (`HFTokenizer.special`), which
  name what config.json does not (BOS, end of turn); ids both give must agree. Without a
  tokenizer, config.json's ids (or the LLaDA defaults) are used and BOS/EoT, when config.json
  names none, stay as in `base`. The llada_jax_* fields give the vocabulary (default "llada_hf"),
  the objective (default "mdm"; model.causal follows it), a block model's block size and the
  logit alignment (default "same", LLaDA's); data.sequence_length is base's, at most the model's
  maximum, and for a block model a multiple of its block size.

  Raises:
    CheckpointError: unsupported architecture features, missing fields, a llada_jax_* field with a
      value that is not allowed, or an id config.json gives that differs from the tokenizer's (each
      named with `source`).
  """
  for field, required in REQUIRED:
    if field in hf and hf[field] not in (required, None):
      raise CheckpointError(
          f"{source} {field}={hf[field]!r} is not supported: llada_jax "
          f"implements {field}={required!r}"
      )
  for field in ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size"):
    if field not in hf:
      raise CheckpointError(f"{source} has no {field!r}: not a LLaDA config")
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
          tie_embeddings=bool(hf.get("weight_tying", False)),
      )
  )
  for name, field in TOKEN_FIELDS.items():
    value = hf.get(field)
    if tokenizer_ids and value is not None and int(value) != tokenizer_ids[name]:
      raise CheckpointError(
          f"{source} {field}={value} is not allowed: tokenizer.json has "
          f"{tokenizer_ids[name]} for that token"
      )
    if tokenizer_ids:
      theirs = tokenizer_ids[name]
      config.tokens[name] = theirs if name in LLADA_IDS or 0 <= theirs < vocab else -1
    elif value is not None:
      config.tokens[name] = int(value)
    elif name in LLADA_IDS:
      config.tokens[name] = LLADA_IDS[name]
    elif field in hf:  # null: the model has no such token
      config.tokens[name] = -1
  pad = hf.get("pad_token_id")
  config.tokens.pad_id = config.tokens.eos_id if pad is None else int(pad)
  if config.tokens.bos_id >= vocab or config.tokens.eot_id >= vocab:
    config.tokens.update(dict(bos_id=-1, eot_id=-1))
  config.data.vocabulary = recorded_choice(
      hf, VOCABULARY_FIELD, "llada_hf", tuple(VOCABULARY_SIZES), source
  )
  _read_objective(hf, config, source)
  return validate(config)


def _read_objective(hf: dict[str, Any], config: ml_collections.ConfigDict, source: str) -> None:
  """Sets the diffusion section (and model.causal, data.sequence_length) from a LLaDA config.json:
  see config_from_hf."""
  d = config.diffusion
  objective = recorded_choice(hf, OBJECTIVE_FIELD, "mdm", tuple(OBJECTIVES), source)
  block_size = hf.get(BLOCK_SIZE_FIELD, d.block_size)
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise CheckpointError(
        f"{source} {BLOCK_SIZE_FIELD}={block_size!r} is not allowed: expected a positive block "
        "size"
    )
  d.update(
      dict(
          objective=objective,
          block_size=block_size,
          block_size_schedule="",  # the exported model is sampled and scored with block_size
          logit_alignment=recorded_choice(hf, ALIGNMENT_FIELD, "same", LOGIT_ALIGNMENTS, source),
      )
  )
  traits = OBJECTIVES[objective]
  if not traits.blocks:
    d.update(dict(t_min=0.0, t_max=1.0))
  config.model.causal = traits.causal
  length = min(config.data.sequence_length, config.model.max_sequence_length)
  if traits.blocks and block_size <= length:
    length -= length % block_size
  config.data.sequence_length = length


def config_to_hf(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config.json the official LLaDA loader reads for this model, with the llada_jax_* fields
  that config_from_hf reads back (the resolved logit alignment included)."""
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
          "weight_tying": m.tie_embeddings,
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
          OBJECTIVE_FIELD: config.diffusion.objective,
          ALIGNMENT_FIELD: resolve(config),
      }
  )
  if objective_of(config).blocks:
    hf[BLOCK_SIZE_FIELD] = config.diffusion.block_size
  if t.bos_id >= 0:
    hf["bos_token_id"] = t.bos_id
  if t.eot_id >= 0:
    hf[EOT_FIELD] = t.eot_id
  return hf


def validated(config: ml_collections.ConfigDict, source: str) -> ml_collections.ConfigDict:
  """config, validated; a config an HF folder's config.json gave (`source`) that llada_jax refuses
  is a CheckpointError naming that file.

  Raises:
    CheckpointError: `llada_jax.config.validate` refuses the config.
  """
  try:
    return validate(config)
  except ConfigError as e:
    raise CheckpointError(f"{source} does not give a valid llada_jax config: {e}") from None


def check_fields(
    hf: dict[str, Any],
    required: tuple[str, ...],
    unsupported: tuple[tuple[str, tuple[Any, ...]], ...],
    family: str,
    source: str,
    defaults: dict[str, Any] | None = None,
) -> None:
  """Refuses a config.json of `family` that lacks a `required` field or sets an `unsupported`
  (field, allowed values) option to another value. A missing option is allowed, unless
  `defaults` gives the value the official class then takes.

  Raises:
    CheckpointError: one line naming the file, the field and what llada_jax implements.
  """
  for field in required:
    if hf.get(field) is None:
      raise CheckpointError(f"{source} has no {field!r}: not a {family} config")
  for field, allowed in unsupported:
    value = hf.get(field, (defaults or {}).get(field))
    if value not in allowed and (value is not None or field in (defaults or {})):
      raise CheckpointError(
          f"{source} {field}={value!r} is not supported: llada_jax implements "
          f"{field}={allowed[0]!r}"
      )
