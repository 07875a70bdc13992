"""LLaDA 2.x checkpoints (`llada2_moe`: LLaDA2.0-mini/flash, LLaDA2.1, 2.2) <-> llada_jax.

The format of the official modeling file `modeling_llada2_moe.py` (HF hub; vendored by
ZHZisZZ/dllm) and of dFactory's merged-expert training layout (model_type
"llada2_moe_veomni"). Facts (docs/moe.md; checked against the official code on
tiny random folders in tests/test_llada2_moe.py):

- names: model.word_embeddings, model.layers.{i}.input_layernorm,
  attention.query_key_value (one fused [(H + 2 KV) * hd, d] weight, rows q heads | k heads | v
  heads), attention.{query,key}_layernorm (QK-norm over head_dim), attention.dense,
  post_attention_layernorm, then a dense SwiGLU mlp.{gate,up,down}_proj in the first
  first_k_dense_replace layers, else mlp.gate.weight [E, d] and its buffer mlp.gate.expert_bias
  [E], routed experts mlp.experts.{e}.{gate,up,down}_proj (merged: mlp.experts.{gate,up}_proj
  [E, f, d] and down_proj [E, d, f], no ".weight") and mlp.shared_experts.{gate,up,down}_proj;
  model.norm, lm_head (untied).
- routing: DeepSeek-V3's sigmoid router with group-limited selection (`routers.sigmoid_grouped`);
  the official gate renormalises the k weights whenever k > 1, whatever norm_topk_prob says.
- attention: RoPE on the first int(head_dim * partial_rotary_factor) dims (rotate-half), QK-norm
  when use_qk_norm (default True); no biases (use_bias, use_qkv_bias must be false).
- token ids: mask 156895, EOS 156892 (pad_token_id) unless given or recorded in config.json
  (mask_token_id, eos_token_id: an export's); the vocabulary is the folder's tokenizer.json ("hf").
- the model is a block diffusion model (diffusion.objective "block", block_size 32 unless an
  export recorded its own).
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np

from llada_jax.config import default_config, objective_of
from llada_jax.errors import CheckpointError, ConfigError
from llada_jax.interop.files import hf_files, read_json
from llada_jax.interop.hf_config import BLOCK_SIZE_FIELD, check_fields, validated
from llada_jax.interop.rules import (
    LAYER,
    Rule,
    attention_output_rule,
    dense_mlp_rules,
    head_rules,
    kernel_rule,
    load_tensors,
    norm_rule,
    same,
    swap_last,
)

MODEL_TYPES = ("llada2_moe", "llada2_moe_veomni")
MERGED = "llada2_moe_veomni"  # dFactory's training layout: experts stacked in one tensor
ARCHITECTURE = "LLaDA2MoeModelLM"
# The LLaDA 2.x family's token ids (not in config.json).
MASK_ID, EOS_ID = 156895, 156892
BLOCK_SIZE = 32
AUTO_MAP = {
    "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
    "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
    "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
}
REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)
# Options of the official class that llada_jax's network does not implement: (field, allowed).
UNSUPPORTED = (
    ("hidden_act", ("silu",)),
    ("use_bias", (False,)),
    ("use_qkv_bias", (False,)),
    ("tie_word_embeddings", (False,)),
    ("rope_scaling", (None,)),
)


def is_llada2_moe(hf: dict[str, Any]) -> bool:
  """Whether a config.json is this family's (by model_type or architecture)."""
  return hf.get("model_type") in MODEL_TYPES or ARCHITECTURE in (hf.get("architectures") or ())


def config_from_llada2_moe(
    hf: dict[str, Any],
    base: ml_collections.ConfigDict | None = None,
    mask_id: int | None = None,
    eos_id: int | None = None,
    source: str = "config.json",
) -> ml_collections.ConfigDict:
  """The validated llada_jax config of a llada2_moe config.json (other sections from `base`).

  Raises:
    CheckpointError: a required field is missing or names a feature llada_jax does not implement
      (biases, tied embeddings, rope scaling, head_dim other than hidden_size / heads).
    ConfigError: the mask or EOS id (given or the family's) is not a token of the vocabulary.
  """
  # The official class defaults use_bias to True: a folder without the field has biases.
  check_fields(hf, REQUIRED_FIELDS, UNSUPPORTED, "llada2_moe", source, {"use_bias": True})
  d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or d // heads)
  if head_dim * heads != d:
    raise CheckpointError(
        f"{source} head_dim={head_dim} is not supported: llada_jax has head_dim = hidden_size / "
        f"num_attention_heads = {d / heads:g}"
    )
  vocab = int(hf["vocab_size"])
  if mask_id is None:
    mask_id = int(hf.get("mask_token_id", MASK_ID))
  if eos_id is None:
    eos_id = int(hf.get("eos_token_id") or hf.get("pad_token_id") or EOS_ID)
  for flag, value in (("mask_id", mask_id), ("eos_id", eos_id)):
    if not 0 <= value < vocab:
      raise ConfigError(
          f"{flag}={value} is not allowed: expected a token id in [0, vocab_size={vocab}) of "
          f"{source} (pass --{flag})"
      )
  experts = int(hf["num_experts"])
  config = default_config() if base is None else ml_collections.ConfigDict(base.to_dict())
  config.model.update(
      dict(
          vocab_size=vocab,
          d_model=d,
          n_layers=int(hf["num_hidden_layers"]),
          n_heads=heads,
          n_kv_heads=int(hf["num_key_value_heads"]),
          mlp_hidden_size=int(hf["intermediate_size"]),
          max_sequence_length=int(hf.get("max_position_embeddings", 16384)),
          rope_theta=float(hf.get("rope_theta", 10000.0)),
          rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
          causal=False,
          qk_norm=bool(hf.get("use_qk_norm", True)),
          rotary_dim=int(head_dim * float(hf.get("partial_rotary_factor", 0.5))),
      )
  )
  k = int(hf["num_experts_per_tok"])
  config.model.moe.update(
      dict(
          num_experts=experts,
          experts_per_token=k,
          expert_hidden_size=int(hf["moe_intermediate_size"]),
          num_shared_experts=int(hf.get("num_shared_experts") or 0),
          first_k_dense_replace=int(hf.get("first_k_dense_replace", 0)),
          router="sigmoid_grouped",
          n_group=int(hf.get("n_group", 1)),
          topk_group=int(hf.get("topk_group", 1)),
          routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
          norm_topk_prob=k > 1,
      )
  )
  config.tokens.update(dict(mask_id=mask_id, eos_id=eos_id, pad_id=eos_id, bos_id=-1))
  config.data.vocabulary = "hf"
  config.diffusion.objective = "block"
  config.diffusion.block_size = int(hf.get(BLOCK_SIZE_FIELD, BLOCK_SIZE))
  config.diffusion.logit_alignment = "same"
  config.diffusion.block_size_schedule = ""
  block = config.diffusion.block_size
  if config.data.sequence_length % block:
    config.data.sequence_length = block * max(1, config.data.sequence_length // block)
  return validated(config, source)


def rules(config: ml_collections.ConfigDict, merged: bool = False) -> list[Rule]:
  """The name table of a llada2_moe folder (merged: dFactory's stacked-expert layout)."""
  m = config.model
  d, h, kv, hd = m.d_model, m.n_heads, m.n_kv_heads, m.d_model // m.n_heads
  f, e, ff = m.moe.expert_hidden_size, m.moe.num_experts, m.mlp_hidden_size
  shared = f * m.moe.num_shared_experts

  def qkv_to_ours(w: np.ndarray) -> tuple[np.ndarray, ...]:
    q, k, v = w[: h * hd], w[h * hd : (h + kv) * hd], w[(h + kv) * hd :]
    return tuple(x.T.reshape(d, n, hd) for x, n in ((q, h), (k, kv), (v, kv)))

  def qkv_to_hf(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.concatenate([x.reshape(d, -1).T for x in (q, k, v)])

  table = [
      Rule(
          "model.word_embeddings.weight",
          (("wte", "embedding"),),
          (m.vocab_size, d),
          same,
          lambda w: w,
      ),
      norm_rule("input_layernorm.weight", d, "attn_norm"),
      Rule(
          LAYER + "attention.query_key_value.weight",
          (("q_proj", "kernel"), ("k_proj", "kernel"), ("v_proj", "kernel")),
          ((h + 2 * kv) * hd, d),
          qkv_to_ours,
          qkv_to_hf,
      ),
      attention_output_rule("attention.dense.weight", d, h, hd),
      norm_rule("post_attention_layernorm.weight", d, "ff_norm"),
      *dense_mlp_rules(d, ff),
      kernel_rule("mlp.gate.weight", (e, d), ("moe", "gate"), "moe"),
      Rule(
          LAYER + "mlp.gate.expert_bias", (("moe", "expert_bias"),), (e,), same, lambda w: w, "moe"
      ),
  ]
  if m.qk_norm:
    table[3:3] = [
        norm_rule("attention.query_layernorm.weight", hd, "q_norm"),
        norm_rule("attention.key_layernorm.weight", hd, "k_norm"),
    ]
  projections = (
      ("gate_proj", "wi_gate", (f, d)),
      ("up_proj", "wi_up", (f, d)),
      ("down_proj", "wo", (d, f)),
  )
  for hf_name, ours, shape in projections:
    if merged:
      table.append(
          Rule(
              LAYER + f"mlp.experts.{hf_name}",
              (("moe", ours),),
              (e,) + shape,
              lambda w: (swap_last(w),),
              swap_last,
              "moe",
          )
      )
    else:
      table.append(
          kernel_rule(f"mlp.experts.{{expert}}.{hf_name}.weight", shape, ("moe", ours), "moe")
      )
  if shared:
    for hf_name, ours, shape in (
        ("gate_proj", "shared_gate", (shared, d)),
        ("up_proj", "shared_up", (shared, d)),
        ("down_proj", "shared_down", (d, shared)),
    ):
      table.append(kernel_rule(f"mlp.shared_experts.{hf_name}.weight", shape, ("moe", ours), "moe"))
  table += head_rules(m.vocab_size, d)
  return table


def read_config(
    path: str | pathlib.Path,
    base: ml_collections.ConfigDict | None = None,
    mask_id: int | None = None,
    eos_id: int | None = None,
) -> ml_collections.ConfigDict:
  """The llada_jax config of a llada2_moe folder, its tokenizer.json attached when it has one."""
  path = pathlib.Path(path)
  hf = read_json(path / "config.json")
  config = config_from_llada2_moe(hf, base, mask_id, eos_id, source=str(path / "config.json"))
  if (path / "tokenizer.json").is_file():
    config.data.tokenizer = str(path / "tokenizer.json")
  return config


def load(
    path: str | pathlib.Path,
    *,
    mask_id: int | None = None,
    eos_id: int | None = None,
    dtype: str | None = None,
    base: ml_collections.ConfigDict | None = None,
    shardings: Any = None,
) -> tuple[ml_collections.ConfigDict, Any]:
  """Reads a llada2_moe folder (per-expert or merged layout) into (config, params), one tensor at
  a time; `shardings` places each leaf on the devices.

  Raises:
    CheckpointError: as config_from_llada2_moe, and tensors missing, unknown or of another shape.
  """
  path = pathlib.Path(path)
  hf = read_json(path / "config.json")
  config = read_config(path, base, mask_id, eos_id)
  table = rules(config, merged=hf.get("model_type") == MERGED)
  params = load_tensors(path, hf_files(path), config, table, dtype, shardings)
  return config, params


def config_to_llada2_moe(
    config: ml_collections.ConfigDict, dtype: str = "bfloat16"
) -> dict[str, Any]:
  """The config.json of an export: the official class's fields and `auto_map`, so that
  transformers' AutoModelForCausalLM (trust_remote_code, with the official modeling file beside)
  loads it.

  Raises:
    CheckpointError: the model is not one the format can hold (no MoE layers, a router other than
      sigmoid_grouped, k = 1 with norm_topk_prob (the official gate normalises only for k > 1),
      a causal or shifted model, or a full rotary head).
  """
  m, moe = config.model, config.model.moe
  problems = []
  if not moe.num_experts or moe.router != "sigmoid_grouped":
    problems.append("a MoE model with router sigmoid_grouped")
  if moe.norm_topk_prob != (moe.experts_per_token > 1):
    problems.append("norm_topk_prob = (experts_per_token > 1)")
  if m.causal or objective_of(config).causal:
    problems.append("a bidirectional (mdm or block) model")
  hd = m.d_model // m.n_heads
  if problems:
    raise CheckpointError(
        "this model cannot be written as a llada2_moe folder: it must be " + "; ".join(problems)
    )
  return {
      "architectures": [ARCHITECTURE],
      "auto_map": AUTO_MAP,
      "model_type": "llada2_moe",
      "vocab_size": m.vocab_size,
      "hidden_size": m.d_model,
      "intermediate_size": m.mlp_hidden_size,
      "num_hidden_layers": m.n_layers,
      "num_attention_heads": m.n_heads,
      "num_key_value_heads": m.n_kv_heads,
      "head_dim": hd,
      "hidden_act": "silu",
      "use_qkv_bias": False,
      "use_bias": False,
      "use_qk_norm": m.qk_norm,
      "rms_norm_eps": m.rms_norm_eps,
      "tie_word_embeddings": False,
      "max_position_embeddings": m.max_sequence_length,
      "rope_theta": m.rope_theta,
      "rope_scaling": None,
      "partial_rotary_factor": (m.rotary_dim or hd) / hd,
      "pad_token_id": config.tokens.pad_id,
      "num_experts": moe.num_experts,
      "num_shared_experts": moe.num_shared_experts or None,
      "num_experts_per_tok": moe.experts_per_token,
      "n_group": moe.n_group,
      "topk_group": moe.topk_group,
      "routed_scaling_factor": moe.routed_scaling_factor,
      "moe_intermediate_size": moe.expert_hidden_size,
      "first_k_dense_replace": moe.first_k_dense_replace,
      "embedding_dropout": 0.0,
      "attention_dropout": 0.0,
      "output_dropout": 0.0,
      "torch_dtype": dtype,
      "mask_token_id": config.tokens.mask_id,
      "eos_token_id": config.tokens.eos_id,
      BLOCK_SIZE_FIELD: config.diffusion.block_size,
  }
