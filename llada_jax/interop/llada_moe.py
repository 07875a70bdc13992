"""LLaDA-MoE checkpoints (LLaDA-MoE-7B-A1B-Base/Instruct) <-> llada_jax.

The format of the official modeling file `modeling_lladamoe.py` (HF hub; vendored by ZHZisZZ/dllm
under dllm/pipelines/llada/models/). Its config.json names the architecture LLaDAMoEModelLM (the
hub's model_type is "llada", the configuration class's "lladamoe"): the folder is recognised by
either the architecture or "lladamoe". Facts (checked against the official code on a tiny random
folder in tests/test_llada_moe.py):

- names: model.embed_tokens, model.layers.{i}.input_layernorm, self_attn.{q,k,v,o}_proj (no
  biases), self_attn.{q,k}_norm (QK-norm over head_dim, when qk_layernorm),
  post_attention_layernorm, then per layer either a dense SwiGLU mlp.{gate,up,down}_proj
  (dense_intermediate_size) or the MoE block: mlp.gate.weight [E, d], the buffer mlp.expert_bias
  [E] (when moe_router_enable_expert_bias), mlp.experts.{e}.{gate,up,down}_proj
  (expert_intermediate_size), and a layer-level shared_expert.{gate,up,down}_proj
  (shared_expert_intermediate_size; added to the MoE output, which is our shared experts);
  model.norm, lm_head (untied).
- routing: softmax probabilities plus the expert bias, the top k of that sum as the weights,
  never renormalised, no routed scaling (`routers.softmax`; the official block ignores
  config.json's norm_topk_prob and routed_scaling_factor). moe_layer_freq (0 dense, 1 MoE per
  layer) must be dense layers first.
- attention: RoPE (rotate-half) on the first int(head_dim * partial_rotary_factor) dims.
- token ids: mask 156895 unless given (--mask_id) or recorded by an export (mask_token_id); EOS
  config.json's eos_token_id (else 156892); the vocabulary is the folder's tokenizer.json ("hf").
- the model is a LLaDA mask predictor (diffusion.objective "mdm"), sampled by LLaDA's reverse
  process; training adds its load-balancing loss with config.json's router_aux_loss_coef.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections

from llada_jax.config import default_config
from llada_jax.errors import CheckpointError, ConfigError
from llada_jax.interop.files import hf_files, read_json
from llada_jax.interop.hf_config import check_fields, validated
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
)

MODEL_TYPE = "lladamoe"
ARCHITECTURE = "LLaDAMoEModelLM"
MASK_ID, EOS_ID = 156895, 156892
AUTO_MAP = {
    "AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
    "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
    "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
}
REQUIRED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "num_experts",
    "num_experts_per_tok",
    "expert_intermediate_size",
    "moe_layer_freq",
)
# Options of the official class that llada_jax's network does not implement: (field, allowed).
UNSUPPORTED = (
    ("hidden_act", ("silu",)),
    ("attention_bias", (False,)),
    ("clip_qkv", (None,)),
    ("tie_word_embeddings", (False,)),
    ("rope_scaling", (None,)),
    ("moe_router_score_function", ("softmax",)),
)


def is_llada_moe(hf: dict[str, Any]) -> bool:
  """Whether a config.json is LLaDA-MoE's (by architecture, or the configuration class's
  model_type)."""
  return ARCHITECTURE in (hf.get("architectures") or ()) or hf.get("model_type") == MODEL_TYPE


def config_from_llada_moe(
    hf: dict[str, Any],
    base: ml_collections.ConfigDict | None = None,
    mask_id: int | None = None,
    source: str = "config.json",
) -> ml_collections.ConfigDict:
  """The validated llada_jax config of a LLaDA-MoE config.json (other sections from `base`).

  Raises:
    CheckpointError: a required field is missing or names a feature llada_jax does not implement
      (biases, clipped QKV, tied embeddings, rope scaling, a non-softmax score, MoE layers before
      dense ones, a shared expert that is not a whole number of experts).
    ConfigError: the mask or EOS id is not a token of the vocabulary.
  """
  check_fields(hf, REQUIRED_FIELDS, UNSUPPORTED, "LLaDA-MoE", source)
  layers = int(hf["num_hidden_layers"])
  freq = [int(x) for x in hf["moe_layer_freq"]]
  dense = freq.index(1) if 1 in freq else layers
  if len(freq) != layers or freq != [0] * dense + [1] * (layers - dense):
    raise CheckpointError(
        f"{source} moe_layer_freq={freq} is not supported: llada_jax implements dense layers "
        f"first, then MoE layers ([0] * k + [1] * (num_hidden_layers - k), {layers} entries)"
    )
  d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = d // heads
  expert = int(hf["expert_intermediate_size"])
  shared = int(hf.get("shared_expert_intermediate_size") or 0)
  if shared % expert:
    raise CheckpointError(
        f"{source} shared_expert_intermediate_size={shared} is not supported: llada_jax's shared "
        f"experts are a multiple of expert_intermediate_size={expert}"
    )
  factor = float(hf.get("partial_rotary_factor") or 1.0)
  if not 0 < factor <= 1:
    raise CheckpointError(
        f"{source} partial_rotary_factor={factor} is not supported: expected a factor in (0, 1]"
    )
  vocab = int(hf["vocab_size"])
  mask_id = int(hf.get("mask_token_id", MASK_ID)) if mask_id is None else mask_id
  eos_id = int(hf.get("eos_token_id") or EOS_ID)
  for flag, value in (("mask_id", mask_id), ("eos_id", eos_id)):
    if not 0 <= value < vocab:
      raise ConfigError(
          f"{flag}={value} is not allowed: expected a token id in [0, vocab_size={vocab}) of "
          f"{source}" + (" (pass --mask_id)" if flag == "mask_id" else "")
      )
  config = default_config() if base is None else ml_collections.ConfigDict(base.to_dict())
  config.model.update(
      dict(
          vocab_size=vocab,
          d_model=d,
          n_layers=layers,
          n_heads=heads,
          n_kv_heads=int(hf.get("num_key_value_heads") or heads),
          mlp_hidden_size=int(hf.get("dense_intermediate_size") or 0) if dense else expert,
          max_sequence_length=int(hf.get("max_position_embeddings", 4096)),
          rope_theta=float(hf.get("rope_theta", 10000.0)),
          rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
          causal=False,
          qk_norm=bool(hf.get("qk_layernorm")),
          rotary_dim=0 if factor == 1 else int(head_dim * factor),
      )
  )
  config.model.moe.update(
      dict(
          num_experts=int(hf["num_experts"]),
          experts_per_token=int(hf["num_experts_per_tok"]),
          expert_hidden_size=expert,
          num_shared_experts=shared // expert,
          first_k_dense_replace=dense,
          router="softmax",
          n_group=1,
          topk_group=1,
          routed_scaling_factor=1.0,
          norm_topk_prob=False,
          aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)),
      )
  )
  config.tokens.update(dict(mask_id=mask_id, eos_id=eos_id, pad_id=eos_id, bos_id=-1))
  config.data.vocabulary = "hf"
  config.diffusion.objective = "mdm"
  config.diffusion.logit_alignment = "same"
  return validated(config, source)


def rules(config: ml_collections.ConfigDict, expert_bias: bool = True) -> list[Rule]:
  """The name table of a LLaDA-MoE folder (expert_bias: the folder holds mlp.expert_bias)."""
  m = config.model
  d, h, kv, hd = m.d_model, m.n_heads, m.n_kv_heads, m.d_model // m.n_heads
  f, e, ff = m.moe.expert_hidden_size, m.moe.num_experts, m.mlp_hidden_size
  shared = f * m.moe.num_shared_experts

  def heads(name: str, n: int, ours: str) -> Rule:  # [n * hd, d] <-> our [d, n, hd]
    return Rule(
        LAYER + name,
        ((ours, "kernel"),),
        (n * hd, d),
        lambda w: (w.T.reshape(d, n, hd),),
        lambda w: w.reshape(d, n * hd).T,
    )

  table = [
      Rule(
          "model.embed_tokens.weight",
          (("wte", "embedding"),),
          (m.vocab_size, d),
          same,
          lambda w: w,
      ),
      norm_rule("input_layernorm.weight", d, "attn_norm"),
      heads("self_attn.q_proj.weight", h, "q_proj"),
      heads("self_attn.k_proj.weight", kv, "k_proj"),
      heads("self_attn.v_proj.weight", kv, "v_proj"),
      attention_output_rule("self_attn.o_proj.weight", d, h, hd),
      norm_rule("post_attention_layernorm.weight", d, "ff_norm"),
      *dense_mlp_rules(d, ff),
      kernel_rule("mlp.gate.weight", (e, d), ("moe", "gate"), "moe"),
      kernel_rule("mlp.experts.{expert}.gate_proj.weight", (f, d), ("moe", "wi_gate"), "moe"),
      kernel_rule("mlp.experts.{expert}.up_proj.weight", (f, d), ("moe", "wi_up"), "moe"),
      kernel_rule("mlp.experts.{expert}.down_proj.weight", (d, f), ("moe", "wo"), "moe"),
  ]
  if expert_bias:
    table.append(
        Rule(LAYER + "mlp.expert_bias", (("moe", "expert_bias"),), (e,), same, lambda w: w, "moe")
    )
  if m.qk_norm:
    table += [
        norm_rule("self_attn.q_norm.weight", hd, "q_norm"),
        norm_rule("self_attn.k_norm.weight", hd, "k_norm"),
    ]
  if shared:
    table += [
        kernel_rule("shared_expert.gate_proj.weight", (shared, d), ("moe", "shared_gate"), "moe"),
        kernel_rule("shared_expert.up_proj.weight", (shared, d), ("moe", "shared_up"), "moe"),
        kernel_rule("shared_expert.down_proj.weight", (d, shared), ("moe", "shared_down"), "moe"),
    ]
  table += head_rules(m.vocab_size, d)
  return table


def read_config(
    path: str | pathlib.Path,
    base: ml_collections.ConfigDict | None = None,
    mask_id: int | None = None,
) -> ml_collections.ConfigDict:
  """The llada_jax config of a LLaDA-MoE folder, its tokenizer.json attached when it has one."""
  path = pathlib.Path(path)
  config = config_from_llada_moe(
      read_json(path / "config.json"), base, mask_id, source=str(path / "config.json")
  )
  if (path / "tokenizer.json").is_file():
    config.data.tokenizer = str(path / "tokenizer.json")
  return config


def load(
    path: str | pathlib.Path,
    *,
    mask_id: int | None = None,
    dtype: str | None = None,
    base: ml_collections.ConfigDict | None = None,
    shardings: Any = None,
) -> tuple[ml_collections.ConfigDict, Any]:
  """Reads a LLaDA-MoE folder into (config, params), one tensor at a time; a folder without the
  expert-bias buffer gets zero biases. `shardings` places each leaf on the devices.

  Raises:
    CheckpointError: as config_from_llada_moe, and tensors missing, unknown or of another shape.
  """
  path = pathlib.Path(path)
  hf = read_json(path / "config.json")
  config = read_config(path, base, mask_id)
  with_bias = bool(hf.get("moe_router_enable_expert_bias"))
  params = load_tensors(
      path,
      hf_files(path),
      config,
      rules(config, with_bias),
      dtype,
      shardings,
      zeros=None if with_bias else "expert_bias",
  )
  return config, params


def config_to_llada_moe(
    config: ml_collections.ConfigDict, dtype: str = "bfloat16"
) -> dict[str, Any]:
  """The config.json of an export: the official class's fields and `auto_map`, so that
  transformers' AutoModelForCausalLM (trust_remote_code, with the official modeling file beside)
  loads it; the expert bias is always written (moe_router_enable_expert_bias).

  Raises:
    CheckpointError: the model is not one the format can hold (the softmax router without
      renormalisation or scaling, a bidirectional LLaDA (mdm) model).
  """
  m, moe = config.model, config.model.moe
  problems = []
  if moe.router != "softmax" or moe.norm_topk_prob or moe.routed_scaling_factor != 1.0:
    problems.append("router softmax, norm_topk_prob False, routed_scaling_factor 1")
  if m.causal or config.diffusion.objective != "mdm":
    problems.append("a LLaDA (mdm) model")
  if problems:
    raise CheckpointError(
        "this model cannot be written as a LLaDA-MoE folder: it must be " + "; ".join(problems)
    )
  hd = m.d_model // m.n_heads
  dense = moe.first_k_dense_replace
  shared = moe.expert_hidden_size * moe.num_shared_experts
  return {
      "architectures": [ARCHITECTURE],
      "auto_map": AUTO_MAP,
      "model_type": MODEL_TYPE,
      "vocab_size": m.vocab_size,
      "hidden_size": m.d_model,
      "dense_intermediate_size": m.mlp_hidden_size,
      "expert_intermediate_size": moe.expert_hidden_size,
      "shared_expert_intermediate_size": shared or None,
      "num_hidden_layers": m.n_layers,
      "num_attention_heads": m.n_heads,
      "num_key_value_heads": m.n_kv_heads,
      "hidden_act": "silu",
      "max_position_embeddings": m.max_sequence_length,
      "rms_norm_eps": m.rms_norm_eps,
      "use_cache": False,
      "pad_token_id": config.tokens.pad_id,
      "eos_token_id": config.tokens.eos_id,
      "mask_token_id": config.tokens.mask_id,
      "tie_word_embeddings": False,
      "rope_theta": m.rope_theta,
      "partial_rotary_factor": (m.rotary_dim or hd) / hd,
      "rope_scaling": None,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "clip_qkv": None,
      "num_experts_per_tok": moe.experts_per_token,
      "num_experts": moe.num_experts,
      "router_aux_loss_coef": moe.aux_loss_coef,
      "norm_topk_prob": False,
      "qk_layernorm": m.qk_norm,
      "moe_layer_freq": [0] * dense + [1] * (m.n_layers - dense),
      "moe_router_enable_expert_bias": True,
      "moe_router_score_function": "softmax",
      "routed_scaling_factor": 1,
      "torch_dtype": dtype,
  }
