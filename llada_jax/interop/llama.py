"""Autoregressive LLaMA-architecture HuggingFace checkpoints (Llama, Mistral) -> llada_jax params.

The AR initialisation of LLaDA 2.0 / Dream: an AR model's weights start a masked diffusion model.
The format is transformers' LlamaForCausalLM / MistralForCausalLM: config.json (model_type "llama"
or "mistral") and safetensors named model.embed_tokens, model.layers.{i}.input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj, model.norm and
lm_head (absent when tie_word_embeddings), single-file or sharded with an index. The network is
llada_jax's own (pre-norm RMSNorm blocks, SwiGLU, GQA), so the import is `hf_checkpoint`'s one
conversion path with a second name table; the imported config is the causal model
(model.causal=True, diffusion.objective="arm") whose logits are the HF model's.

RoPE: HF Llama rotates (x[:hd/2], x[hd/2:]) pairs ("rotate_half"); transformers' Meta -> HF
conversion already permuted q_proj/k_proj from Meta's interleaved pairs into that layout.
llada_jax's `apply_rope` is rotate_half with the same frequencies (theta^(-2i/hd) for both
halves), so the q/k weights are taken as stored. Checkpoints in Meta's original layout
(consolidated.*.pth) are not this format.

The mask token: an AR vocabulary has none. By default one row is appended (vocab_size + 1,
mask_id = the HF vocab_size): its embedding is the mean of the embedding rows and its head column
the mean of the head's, so the causal model's logits over the HF vocabulary are unchanged and the
mask's logit is their mean. mask_id=<an existing id> keeps the vocabulary as it is and makes that
token the mask: a reserved special token, or an unused row of a padded embedding (as Dream's
<|mask|> sits in Qwen2.5's padding).

The tied head: a tie_word_embeddings checkpoint gives a model with model.tie_embeddings (the head
is the embedding transposed, and stays one matrix in training and export); a stored
lm_head.weight is skipped, as HF's loader ties it away.

The tokenizer: the imported config's data.vocabulary is "hf" (data/hf_tokenizer.py: any
tokenizer.json, its BOS/EOS/mask ids the config's), with data.tokenizer the folder's
tokenizer.json when it has one (a workdir converted from it keeps a copy). BOS and EOS come from
the first of SPECIAL_ID_FILES that names them, and every one that names them must agree; the
end-of-turn id is the tokenizer's <|eot_id|> (Llama 3), so its chat template is LLaDA-Instruct's.
An appended mask row is no token of the tokenizer: decoding drops it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np

from llada_jax.config import (
    TOKENIZER_VOCABULARIES,
    VOCABULARY_SIZES,
    default_config,
    validate,
)
from llada_jax.data.hf_tokenizer import CONFIG_IDS, HFTokenizer, config_ids
from llada_jax.data.vocab import mask_is_a_token
from llada_jax.errors import CheckpointError, ConfigError
from llada_jax.interop import hf_checkpoint
from llada_jax.interop.hf_checkpoint import NameTable, Tensor
from llada_jax.interop.hf_config import EOT_FIELD, VOCABULARY_FIELD, recorded_choice

MODEL_TYPES = ("llama", "mistral")
EMBEDDING = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"
# HF block name -> llada_jax block (hf_checkpoint.block_layouts gives the layouts).
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out",
    "post_attention_layernorm": "ff_norm",
    "mlp.gate_proj": "ff_proj",
    "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
}
REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
# Where a folder names its BOS and EOS, in order of precedence: ids in config.json and
# generation_config.json, token texts (looked up in tokenizer.json) in tokenizer_config.json.
SPECIAL_ID_FILES = (
    ("config.json", {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}),
    ("generation_config.json", {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}),
    ("tokenizer_config.json", {"bos_token_id": "bos_token", "eos_token_id": "eos_token"}),
)
# Features of LlamaConfig that llada_jax's network does not implement: (field, what is allowed).
UNSUPPORTED = (
    ("hidden_act", ("silu",)),
    ("attention_bias", (False,)),
    ("mlp_bias", (False,)),
)


def model_type(path: str | pathlib.Path) -> str:
  """config.json's model_type ("llada" for the official LLaDA folders, which also name it).

  Raises:
    CheckpointError: config.json is missing or is not a JSON object.
  """
  file = pathlib.Path(path) / "config.json"
  if not file.is_file():
    raise CheckpointError(f"{path} has no config.json: not a HuggingFace checkpoint folder")
  return str(hf_checkpoint.read_json(file).get("model_type", ""))


def _first_id(value: Any) -> int | None:
  """A token id of config.json: an int, a list of them (Llama 3.1 eos) as its first, or None."""
  if isinstance(value, list):
    return int(value[0]) if value else None
  return None if value is None else int(value)


def config_from_llama(
    hf: dict[str, Any],
    base: ml_collections.ConfigDict | None = None,
    mask_id: int | None = None,
    source: str = "config.json",
) -> ml_collections.ConfigDict:
  """The validated causal llada_jax config of a Llama/Mistral config.json (other sections from
  `base`).

  model: the sizes of config.json (n_kv_heads = num_key_value_heads, default num_attention_heads;
  max_sequence_length = max_position_embeddings, capped at Mistral's sliding_window, below which
  windowed and full attention agree), causal=True, diffusion.objective="arm" (logit alignment
  "same"). vocab_size is config.json's plus one appended mask row, or config.json's when the mask
  is an existing token: `mask_id`, or the mask_token_id config.json records (a llada_jax export).
  tokens: eos (the first of a list), bos (-1 if none), pad (eos if none); eot llada_jax's
  EOT_FIELD, else -1. data.vocabulary: VOCABULARY_FIELD, else "hf", with no tokenizer attached
  (read_llama_config attaches the folder's).

  Raises:
    CheckpointError: a field is missing or names a feature llada_jax does not implement
      (rope_scaling, head_dim other than hidden_size / num_attention_heads, biases, an activation
      other than SiLU), eos_token_id is null, or a recorded mask_token_id or vocabulary is not
      allowed.
    ConfigError: mask_id outside [0, vocab_size), equal to another special id, or other than the
      mask_token_id config.json records.
  """
  for field in REQUIRED_FIELDS:
    if field not in hf:
      raise CheckpointError(f"{source} has no {field!r}: not a LLaMA-architecture config")
  for field, allowed in UNSUPPORTED:
    if hf.get(field) not in allowed + (None,):
      raise CheckpointError(
          f"{source} {field}={hf[field]!r} is not supported: llada_jax implements "
          f"{field}={allowed[0]!r}"
      )
  rope_theta = hf.get("rope_theta", 10000.0)
  for field in ("rope_scaling", "rope_parameters"):  # transformers >= 5 names it rope_parameters
    rope = hf.get(field)
    if rope is None:
      continue
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else rope
    if kind != "default":
      raise CheckpointError(
          f"{source} {field}={rope!r} is not supported: llada_jax's RoPE has no scaling "
          "(null or rope_type 'default' only)"
      )
    rope_theta = rope.get("rope_theta", rope_theta)
  d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  if hf.get("head_dim") is not None and int(hf["head_dim"]) * heads != d:
    raise CheckpointError(
        f"{source} head_dim={hf['head_dim']} is not supported: llada_jax has head_dim = "
        f"hidden_size / num_attention_heads = {d / heads:g}"
    )
  vocab = int(hf["vocab_size"])
  recorded = hf.get("mask_token_id")  # a mask token inside the vocabulary (a llada_jax export)
  if recorded is not None:
    if isinstance(recorded, bool) or not isinstance(recorded, int) or not 0 <= recorded < vocab:
      raise CheckpointError(
          f"{source} mask_token_id={recorded!r} is not allowed: expected a token id in "
          f"[0, vocab_size={vocab})"
      )
    if mask_id is not None and mask_id != recorded:
      raise ConfigError(
          f"mask_id={mask_id} is not allowed: {source} records its mask token, "
          f"mask_token_id={recorded} (leave --mask_id out)"
      )
    mask_id = recorded
  if mask_id is not None and not 0 <= mask_id < vocab:
    raise ConfigError(
        f"mask_id={mask_id} is not allowed: expected an existing token id in [0, {vocab}) of "
        f"{source}, or none (one row is appended for the mask token)"
    )
  length = int(hf.get("max_position_embeddings", 2048))
  if hf.get("sliding_window") is not None:
    length = min(length, int(hf["sliding_window"]))
  config = default_config() if base is None else ml_collections.ConfigDict(base.to_dict())
  config.model.update(
      dict(
          vocab_size=vocab if mask_id is not None else vocab + 1,
          d_model=d,
          n_layers=int(hf["num_hidden_layers"]),
          n_heads=heads,
          n_kv_heads=int(hf.get("num_key_value_heads") or heads),
          mlp_hidden_size=int(hf["intermediate_size"]),
          max_sequence_length=length,
          rope_theta=float(rope_theta),
          rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
          init_std=float(hf.get("initializer_range", 0.02)),
          causal=True,
          tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      )
  )
  config.diffusion.update(
      dict(
          objective="arm",
          logit_alignment="same",
          block_size_schedule="",
          t_min=0.0,
          t_max=1.0,
      )
  )
  eos = _first_id(hf.get("eos_token_id", 2))
  bos = _first_id(hf.get("bos_token_id", 1))
  pad = _first_id(hf.get("pad_token_id"))
  eot = _first_id(hf.get(EOT_FIELD))  # recorded by a llada_jax export; else the tokenizer's
  if eos is None:
    raise CheckpointError(
        f"{source} eos_token_id=None is not allowed: llada_jax needs an end-of-sequence id"
    )
  config.tokens.update(
      dict(
          mask_id=vocab if mask_id is None else mask_id,
          eos_id=eos,
          bos_id=-1 if bos is None else bos,
          pad_id=eos if pad is None else pad,
          eot_id=-1 if eot is None else eot,
      )
  )
  vocabulary = recorded_choice(hf, VOCABULARY_FIELD, "hf", tuple(VOCABULARY_SIZES), source)
  config.data.update(dict(vocabulary=vocabulary, tokenizer=""))
  config.data.sequence_length = min(config.data.sequence_length, length)
  return validate(config)


def read_llama_config(
    path: str | pathlib.Path,
    base: ml_collections.ConfigDict | None = None,
    mask_id: int | None = None,
) -> ml_collections.ConfigDict:
  """config_from_llama of a folder's config.json, with the BOS/EOS ids it lacks from the folder's
  other files (SPECIAL_ID_FILES) and, when the folder has a tokenizer.json, data.tokenizer that
  file (its <|eot_id|>, if any, as tokens.eot_id).

  Raises:
    CheckpointError: as config_from_llama, an unreadable file, a model_type other than
      MODEL_TYPES, a tokenizer.json with more tokens than config.json's vocab_size, or files that
      name different BOS/EOS ids.
    ConfigError: as config_from_llama, or special ids outside the tokenizer (check_config).
  """
  path = pathlib.Path(path)
  file = path / "config.json"
  hf = hf_checkpoint.read_json(file)
  if hf.get("model_type") not in MODEL_TYPES:
    raise CheckpointError(
        f"{file} model_type={hf.get('model_type')!r} is not allowed: expected one of "
        + ", ".join(MODEL_TYPES)
    )
  tokenizer = path / "tokenizer.json"
  # A model of a shipped vocabulary (byte, spm8k: an exported llada_jax ARM) has no tokenizer.json.
  has_tokenizer = tokenizer.is_file() and hf.get(VOCABULARY_FIELD, "hf") in TOKENIZER_VOCABULARIES
  texts = HFTokenizer(tokenizer, dict.fromkeys(CONFIG_IDS, -1)) if has_tokenizer else None
  named = _named_special_ids(path, texts)
  hf = dict(hf, **{field: found[0][1] for field, found in named.items() if found})
  config = config_from_llama(hf, base, mask_id, source=str(file))
  if texts is not None:
    if texts.vocab_size > int(hf["vocab_size"]):
      raise CheckpointError(
          f"{tokenizer} has {texts.vocab_size} tokens, more than {file}'s "
          f"vocab_size={hf['vocab_size']}: expected this model's tokenizer (at most that many)"
      )
    config.data.tokenizer = str(tokenizer.absolute())
    HFTokenizer(tokenizer, config_ids(config)).check_config(config)  # takes <|eot_id|>
  for field, found in named.items():
    name = field.replace("_token", "")  # bos_token_id -> bos_id
    # Llama 3 Instruct's tokenizer_config.json names <|eot_id|> its EOS.
    ours = {config.tokens[name]} | ({config.tokens.eot_id} if name == "eos_id" else set())
    for source, ids in found:
      if ids and not ours & set(ids):
        raise CheckpointError(
            f"{source} names {field}={ids} but the model's is {config.tokens[name]} (from "
            f"{found[0][0]}): expected files of one model that agree"
        )
  return config


def _named_special_ids(
    path: pathlib.Path, texts: HFTokenizer | None
) -> dict[str, list[tuple[str, list[int]]]]:
  """{"bos_token_id": [(file, its ids)], "eos_token_id": ...} of the SPECIAL_ID_FILES in `path`
  that name them, in order of precedence (an id list such as Llama 3.1's EOS kept whole; a
  config.json null is an empty list: no such token). tokenizer_config.json's token texts count
  only with a tokenizer.json (`texts`) to look them up in.

  Raises:
    CheckpointError: an unreadable file, or a token text the tokenizer does not have.
  """
  named: dict[str, list[tuple[str, list[int]]]] = {"bos_token_id": [], "eos_token_id": []}
  for name, fields in SPECIAL_ID_FILES:
    file = path / name
    if not file.is_file() or (name == "tokenizer_config.json" and texts is None):
      continue
    values = hf_checkpoint.read_json(file)
    for field, key in fields.items():
      if key not in values or (values[key] is None and name != "config.json"):
        continue
      value = values[key]
      if name == "tokenizer_config.json":  # a text, or an AddedToken {"content": text, ...}
        text = value.get("content") if isinstance(value, dict) else value
        if texts.token_id(str(text)) == -1:
          raise CheckpointError(
              f"{file} {key}={text!r} is not a token of tokenizer.json: expected the tokenizer "
              "of this model"
          )
        value = texts.token_id(str(text))
      ids = (
          [] if value is None else [int(v) for v in (value if isinstance(value, list) else [value])]
      )
      named[field].append((str(file), ids))
  return named


def llama_table(config: ml_collections.ConfigDict, appended: bool) -> NameTable:
  """The Llama/Mistral names of `config`'s parameters.

  With a mask row `appended` (the HF vocabulary is config's vocab_size - 1) the embedding gains
  the mean embedding row and the head the mean head column. A model with tied embeddings
  (model.tie_embeddings) has no head of its own: the file's lm_head.weight, if any, is skipped
  (HF's loader ties it away too).
  """
  m = config.model
  tied = m.tie_embeddings
  rows = m.vocab_size - 1 if appended else m.vocab_size

  def embedding(w: np.ndarray) -> np.ndarray:
    """[rows, d] -> [vocab_size, d]; the mean is taken in float32 (bf16 files)."""
    if not appended:
      return w
    return np.concatenate([w, w.astype(np.float32).mean(0, keepdims=True).astype(w.dtype)])

  head = ((("ff_out", "kernel"), lambda w: embedding(w).T),)
  top = {
      EMBEDDING: Tensor((rows, m.d_model), ((("wte", "embedding"), embedding),)),
      NORM: Tensor((m.d_model,), ((("ln_f", "weight"), lambda w: w),)),
  }
  if not tied:
    top[HEAD] = Tensor((rows, m.d_model), head)
  return NameTable(
      block_prefix="model.layers.",
      block_names=dict(BLOCK_NAMES),
      top=top,
      ignored=frozenset({HEAD} if tied else ()),
  )


def load_llama(
    path: str | pathlib.Path,
    *,
    mask_id: int | None = None,
    dtype: str | None = None,
    base: ml_collections.ConfigDict | None = None,
    shardings: Any = None,
) -> tuple[ml_collections.ConfigDict, Any]:
  """Reads a Llama/Mistral HF folder into (causal config, params).

  mask_id: an existing token to serve as the mask token; None: the mask_token_id config.json
  records, else one appended row (see the module docstring). dtype: parameter dtype ("float32",
  "bfloat16"; default: as stored). base: config whose non-model sections are kept. shardings:
  optional tree of target shardings; each tensor is placed as soon as it is complete.

  Raises:
    CheckpointError: as read_llama_config, missing or unreadable files, and tensors missing,
      unknown or of another shape than config.json gives (named with the folder).
    ConfigError: a mask_id that is not allowed.
  """
  path = pathlib.Path(path)
  files = hf_checkpoint.hf_files(path)
  config = read_llama_config(path, base, mask_id)
  hf = hf_checkpoint.read_json(path / "config.json")
  appended = config.model.vocab_size == int(hf["vocab_size"]) + 1  # else an existing mask token
  params = hf_checkpoint.load_tensors(
      path, files, config, llama_table(config, appended), dtype, shardings
  )
  return config, params


def exported_rows(config: ml_collections.ConfigDict) -> int:
  """The vocabulary rows of an ARM's Llama export: model.vocab_size less an appended mask row.

  The mask row counts as appended (the Llama it came from had none, and a causal model never
  reads it) when it is the last row and no token of the vocabulary: at or above the shipped
  vocabulary's size, or the tokenizer.json's ("llada_hf", "hf"; without one the last row is taken
  as appended). A mask token inside the vocabulary is kept, and `config_to_llama` records it.
  """
  m = config.model
  appended = config.tokens.mask_id == m.vocab_size - 1 and not mask_is_a_token(config)
  return m.vocab_size - 1 if appended else m.vocab_size


def config_to_llama(
    config: ml_collections.ConfigDict, rows: int, dtype: str = "float32"
) -> dict[str, Any]:
  """The config.json of an ARM (model.causal) as transformers' LlamaForCausalLM: the same network
  (pre-norm RMSNorm, SwiGLU, rotate-half RoPE, GQA, the head tied or not) with `rows` vocabulary
  rows (`exported_rows`). What LlamaConfig has no field for is recorded where `config_from_llama`
  reads it back: a mask token inside the vocabulary (mask_token_id), the end-of-turn id and the
  vocabulary (llada_jax_* fields); the ids are the model's, the dtype names the tensors'.
  """
  m, t = config.model, config.tokens
  hf = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": m.d_model,
      "intermediate_size": m.mlp_hidden_size,
      "num_hidden_layers": m.n_layers,
      "num_attention_heads": m.n_heads,
      "num_key_value_heads": m.n_kv_heads,
      "head_dim": m.d_model // m.n_heads,
      "hidden_act": "silu",
      "max_position_embeddings": m.max_sequence_length,
      "rms_norm_eps": m.rms_norm_eps,
      "rope_theta": m.rope_theta,
      "rope_scaling": None,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "tie_word_embeddings": m.tie_embeddings,
      "initializer_range": m.init_std,
      "vocab_size": rows,
      "bos_token_id": t.bos_id if t.bos_id >= 0 else None,
      "eos_token_id": t.eos_id,
      "pad_token_id": t.pad_id,
      "torch_dtype": dtype,
      "use_cache": True,
      VOCABULARY_FIELD: config.data.vocabulary,
  }
  if rows == m.vocab_size:
    hf["mask_token_id"] = t.mask_id
  if t.eot_id >= 0:
    hf[EOT_FIELD] = t.eot_id
  return hf
