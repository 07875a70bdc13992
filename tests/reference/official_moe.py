"""The official LLaDA 2.x MoE and LLaDA-MoE PyTorch models, run on tiny random weights (float32).

The modeling files under `official/` are vendored unmodified (see official/README.md). They were
written for transformers 4.x; `_install_shims` below makes them import and run under transformers
5.x without touching them:

  1. `transformers.utils.import_utils.is_torch_fx_available` was removed in 5.x; the LLaDA2 file
     imports it only to wrap a mask helper with `torch.fx.wrap`. It is defined to return False
     (no numerical effect).
  2. `ROPE_INIT_FUNCTIONS["default"]` was removed in 5.x (default RoPE moved into each model); both
     rotary classes look it up. It is put back as the 4.x `_compute_default_rope_parameters`:
     inv_freq = 1 / rope_theta ** (arange(0, dim, 2) / dim), dim = int(head_dim *
     partial_rotary_factor), attention scaling 1.0 — only while an official model is built
     (`_quiet`), so that transformers' own models in the process are not changed.
  3. `_tied_weights_keys` is a list in both LM classes; 5.x's `save_pretrained` wants the
     {target: source} dict. It is set to {"lm_head.weight": <input embedding>.weight} (what the
     list meant in 4.x; only used when tie_word_embeddings is true).
  4. (official_generate only) LLaDA2's `generate` builds its additive block mask in bfloat16; 5.x
     SDPA on a float32 model refuses a bf16 mask, so the instance's forward casts a floating
     attention_mask to float32 (0 / -inf are exact in both) before calling the official forward.

Folders are written with `save_pretrained` (safetensors); config.json is then rewritten in the
official 4.x form (rope_theta / rope_scaling at top level, no rope_parameters) with the keys the
official folders carry. Models are read back with the official config class and a strict
`load_state_dict` of the safetensors file.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from typing import Any, Iterator

import numpy as np
import safetensors.torch
import torch
import transformers


def _install_shims() -> None:
  """Shims 1 and 2 of the module docstring (before the official files are imported)."""
  from transformers import modeling_rope_utils as rope_utils
  from transformers.utils import import_utils

  if not hasattr(import_utils, "is_torch_fx_available"):
    import_utils.is_torch_fx_available = lambda: False

  def default_rope(config, device=None, seq_len=None, **unused):  # transformers 4.x, verbatim math
    del seq_len, unused
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (config.rope_theta**exponent), 1.0

  global _DEFAULT_ROPE  # pylint: disable=global-statement
  _DEFAULT_ROPE = default_rope


_DEFAULT_ROPE = None
_install_shims()

# pylint: disable=wrong-import-position
from .official.configuration_llada2_moe import LLaDA2MoeConfig  # noqa: E402
from .official.configuration_lladamoe import LLaDAMoEConfig  # noqa: E402
from .official.modeling_llada2_moe import LLaDA2MoeGate, LLaDA2MoeModelLM  # noqa: E402
from .official.modeling_lladamoe import LLaDAMoEModelLM, LLaDAMoESparseMoeBlock  # noqa: E402

# pylint: enable=wrong-import-position

LLaDA2MoeModelLM._tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}  # pylint: disable=protected-access
LLaDAMoEModelLM._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # pylint: disable=protected-access


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """Mutes the 5.x deprecation chatter the 4.x-era official files trigger (and the save bar),
  and holds shim 2 (the "default" RoPE entry, which the official rotary classes read when built)
  only meanwhile: left in place it would change transformers' own models in this process (5.x
  Llama then reads config.rope_theta, which 5.x configs no longer have)."""
  from transformers import modeling_rope_utils as rope_utils  # pylint: disable=import-outside-toplevel

  table = rope_utils.ROPE_INIT_FUNCTIONS
  added = "default" not in table
  if added:
    table["default"] = _DEFAULT_ROPE
  verbosity = transformers.logging.get_verbosity()
  bar = transformers.utils.logging.is_progress_bar_enabled()
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", FutureWarning)
      yield
  finally:
    if added:
      del table["default"]
    transformers.logging.set_verbosity(verbosity)
    if bar:
      transformers.utils.logging.enable_progress_bar()


_MODELS = {
    "llada2_moe": (LLaDA2MoeConfig, LLaDA2MoeModelLM),
    "lladamoe": (LLaDAMoEConfig, LLaDAMoEModelLM),
}

# What dFactory's llada2_mini / llada2_flash config.json carry besides the sizes, and HF's auto_map.
_LLADA2_AUTO_MAP = {
    "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
    "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
    "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
}
_LLADAMOE_AUTO_MAP = {  # as dllm's examples/llada/README.md tells to set it
    "AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
    "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
    "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
}


def _init_kwargs(config_cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
  """Every __init__ argument of an official config class (defaults filled in), then the rest."""
  params = inspect.signature(config_cls.__init__).parameters
  out = {
      n: p.default for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
  }
  return {**out, **kwargs}


def _randomize(model: torch.nn.Module, seed: int, bias_scale: float) -> None:
  """Weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms 1 + 0.1 N(0, 1), biases 0.1 N(0, 1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if p.ndim == 1:
        p.copy_(1.0 + 0.1 * r if "norm" in name else 0.1 * r)
      elif "embed" in name:
        p.copy_(r)
      else:
        p.copy_(r * p.shape[-1] ** -0.5)
    for name, b in model.named_buffers():
      if name.endswith("expert_bias"):
        b.copy_(bias_scale * torch.randn(b.shape, generator=g))


@contextlib.contextmanager
def _capture_llada2_gates(model: torch.nn.Module) -> Iterator[list[dict[str, torch.Tensor]]]:
  """Per MoE layer: the gate's input hidden states and its official top-k expert ids."""
  records: list[dict[str, torch.Tensor]] = []

  def recorder(record: dict[str, torch.Tensor]):
    def hook(module, args, out):
      del module
      record["x"] = args[0].detach().reshape(-1, args[0].shape[-1])
      record["topk_idx"] = out[0].detach()

    return hook

  hooks = []
  for module in model.modules():
    if isinstance(module, LLaDA2MoeGate):
      records.append({})
      hooks.append(module.register_forward_hook(recorder(records[-1])))
  try:
    yield records
  finally:
    for h in hooks:
      h.remove()


def _group_limit_effect(model: LLaDA2MoeModelLM, tokens: torch.Tensor) -> list[int]:
  """Per MoE layer, how many tokens' expert set differs with vs without group-limited top-k."""
  with _capture_llada2_gates(model) as records, torch.no_grad():
    model(tokens)
  gates = [m for m in model.modules() if isinstance(m, LLaDA2MoeGate)]
  changed = []
  for gate, rec in zip(gates, records):
    scores = torch.sigmoid(rec["x"].float() @ gate.weight.float().T) + gate.expert_bias
    plain = torch.topk(scores, gate.top_k, dim=-1).indices
    limited = rec["topk_idx"]
    changed.append(int((plain.sort(-1).values != limited.sort(-1).values).any(-1).sum()))
  return changed


def build_llada2_moe_folder(
    path: str,
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 96,
    moe_intermediate_size: int = 32,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    num_shared_experts: int = 1,
    n_group: int = 4,
    topk_group: int = 2,
    routed_scaling_factor: float = 2.5,
    first_k_dense_replace: int = 1,
    partial_rotary_factor: float = 0.5,
    rope_theta: float = 600000.0,
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
  """Writes a tiny random official LLaDA2 MoE folder (model.safetensors + config.json).

  Non-size settings follow dFactory's llada2_mini config.json (use_bias/use_qkv_bias false,
  rms_norm_eps 1e-6, untied head, dropout 0, use_cache false); `overrides` go to LLaDA2MoeConfig
  (and into config.json). Every MoE gate gets a random `expert_bias` (0.1 N(0, 1)), redrawn until
  group-limited routing picks other experts than a plain top-k for some probe tokens in every MoE
  layer (when n_group > 1 and topk_group < n_group).

  Returns {"group_limit_changed": [count per MoE layer], "probe_tokens": n}: how many of the
  probe tokens (0..vocab_size-1 as one sequence, then the same reversed) route differently.
  """
  kwargs = dict(
      vocab_size=vocab_size,
      hidden_size=hidden_size,
      intermediate_size=intermediate_size,
      num_hidden_layers=num_hidden_layers,
      num_attention_heads=num_attention_heads,
      num_key_value_heads=num_key_value_heads,
      use_qkv_bias=False,
      use_qk_norm=True,
      use_bias=False,
      rms_norm_eps=1e-6,
      norm_head=False,
      tie_word_embeddings=False,
      embedding_dropout=0.0,
      attention_dropout=0.0,
      output_dropout=0.0,
      max_position_embeddings=4096,
      rope_theta=rope_theta,
      use_cache=False,
      rope_scaling=None,
      pad_token_id=vocab_size - 1,
      num_experts=num_experts,
      num_shared_experts=num_shared_experts,
      num_experts_per_tok=num_experts_per_tok,
      n_group=n_group,
      topk_group=topk_group,
      routed_scaling_factor=routed_scaling_factor,
      moe_intermediate_size=moe_intermediate_size,
      first_k_dense_replace=first_k_dense_replace,
      head_dim=head_dim,
      partial_rotary_factor=partial_rotary_factor,
  )
  kwargs.update(overrides)
  with _quiet():
    return _build_llada2(path, kwargs, seed)


def _build_llada2(path: str, kwargs: dict[str, Any], seed: int) -> dict[str, Any]:
  """build_llada2_moe_folder with its config arguments gathered."""
  config = LLaDA2MoeConfig(**kwargs)
  model = LLaDA2MoeModelLM(config).float().eval()
  probe = torch.arange(config.vocab_size).reshape(1, -1)
  probe = torch.cat([probe, probe.flip(-1)])
  want_change = config.n_group > 1 and config.topk_group < config.n_group
  for attempt in range(20):
    _randomize(model, seed + 1000 * attempt, bias_scale=0.1)
    changed = _group_limit_effect(model, probe)
    if not want_change or all(changed):
      break
  else:
    raise RuntimeError(f"no expert_bias draw made group limiting matter: {changed}")
  # Keys dFactory's config.json also carries, which LLaDA2MoeConfig does not take; informational:
  # the official code always routes with sigmoid in fp32, renormalises the top-k, uses RMSNorm.
  extra = dict(
      norm_topk_prob=True,
      score_function="sigmoid",
      router_dtype="fp32",
      moe_router_enable_expert_bias=True,
      rotary_dim=int(config.head_dim * config.partial_rotary_factor),
      use_rmsnorm=True,
      norm_softmax=False,
      using_split_qkv_in_self_attention=False,
  )
  init = {**_init_kwargs(LLaDA2MoeConfig, kwargs), **extra}
  _save(model, path, "llada2_moe", "LLaDA2MoeModelLM", _LLADA2_AUTO_MAP, init)
  return {"group_limit_changed": changed, "probe_tokens": int(probe.numel())}


def build_llada_moe_folder(
    path: str,
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    dense_intermediate_size: int = 96,
    expert_intermediate_size: int = 32,
    shared_expert_intermediate_size: int | None = None,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    moe_layer_freq: list[int] | None = None,
    qk_layernorm: bool = True,
    moe_router_enable_expert_bias: bool = False,
    partial_rotary_factor: float = 1.0,
    rope_theta: float = 50000.0,
    seed: int = 0,
    **overrides: Any,
) -> None:
  """Writes a tiny random official LLaDA-MoE folder (modeling_lladamoe.py; softmax router).

  head_dim is hidden_size // num_attention_heads (the official code has no head_dim setting).
  moe_layer_freq defaults to all layers MoE (1 = MoE, 0 = dense MLP of dense_intermediate_size).
  shared_expert_intermediate_size None means no shared expert.
  """
  kwargs = dict(
      vocab_size=vocab_size,
      hidden_size=hidden_size,
      dense_intermediate_size=dense_intermediate_size,
      expert_intermediate_size=expert_intermediate_size,
      shared_expert_intermediate_size=shared_expert_intermediate_size,
      num_hidden_layers=num_hidden_layers,
      num_attention_heads=num_attention_heads,
      num_key_value_heads=num_key_value_heads,
      rms_norm_eps=1e-5,
      use_cache=False,
      pad_token_id=vocab_size - 1,
      eos_token_id=vocab_size - 2,
      tie_word_embeddings=False,
      rope_theta=rope_theta,
      partial_rotary_factor=partial_rotary_factor,
      rope_scaling=None,
      attention_bias=False,
      attention_dropout=0.0,
      num_experts_per_tok=num_experts_per_tok,
      num_experts=num_experts,
      norm_topk_prob=False,
      qk_layernorm=qk_layernorm,
      moe_layer_freq=list(moe_layer_freq or [1] * num_hidden_layers),
      moe_router_enable_expert_bias=moe_router_enable_expert_bias,
      moe_router_score_function="softmax",
  )
  kwargs.update(overrides)
  with _quiet():
    model = LLaDAMoEModelLM(LLaDAMoEConfig(**kwargs)).float().eval()
    _randomize(model, seed, bias_scale=0.1)
    _save(
        model,
        path,
        "lladamoe",
        "LLaDAMoEModelLM",
        _LLADAMOE_AUTO_MAP,
        _init_kwargs(LLaDAMoEConfig, kwargs),
    )


def _save(
    model: torch.nn.Module,
    path: str,
    model_type: str,
    arch: str,
    auto_map: dict[str, str],
    init: dict[str, Any],
) -> None:
  """save_pretrained (safetensors), then config.json rewritten in the official 4.x form."""
  model.save_pretrained(path, safe_serialization=True)
  config = {"architectures": [arch], "auto_map": auto_map, "model_type": model_type, **init}
  config["torch_dtype"] = "float32"
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)


def load_official(path: str, attn_implementation: str | None = None) -> torch.nn.Module:
  """The official model of a folder, float32, eval mode (attn_implementation None: 5.x's sdpa)."""
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    raw = json.load(f)
  config_cls, model_cls = _MODELS[raw["model_type"]]
  kwargs = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
  if attn_implementation is not None:
    kwargs["attn_implementation"] = attn_implementation
  with _quiet():
    model = model_cls(config_cls(**kwargs)).float().eval()
  state = safetensors.torch.load_file(os.path.join(path, "model.safetensors"))
  model.load_state_dict(state, strict=True)
  return model


def official_logits(
    path: str,
    tokens: np.ndarray,
    attention_mask: np.ndarray | None = None,
    position_ids: np.ndarray | None = None,
    attn_implementation: str | None = None,
) -> np.ndarray:
  """Float32 logits [B, L, V] of the official forward.

  attention_mask is passed through as is. LLaDA2 (sdpa, the 5.x default): None = full
  bidirectional attention; a 4-D [B, 1, L, L] bool mask (True = may attend) or float additive
  mask is used as given (this is what `generate` passes: its block-causal mask); a 2-D [B, L]
  mask goes through HF's *causal* 4-D mask maker (causal + padding unless it is all ones).
  LLaDA2 with attn_implementation="eager" is causal even with no mask. LLaDA-MoE: None =
  bidirectional; only a 2-D [B, L] key-padding mask (1 = attend, no causal part) is accepted.
  """
  model = load_official(path, attn_implementation)
  kwargs: dict[str, Any] = {}
  if attention_mask is not None:
    mask = np.asarray(attention_mask)
    kwargs["attention_mask"] = torch.from_numpy(
        mask.astype(np.float32) if mask.dtype.kind == "f" else mask
    )
  if position_ids is not None:
    kwargs["position_ids"] = torch.from_numpy(np.asarray(position_ids, np.int64))
  with torch.no_grad(), _quiet():
    out = model(torch.from_numpy(np.asarray(tokens, np.int64)), **kwargs).logits
  return out.float().numpy()


def official_router_choice(path: str, tokens: np.ndarray) -> list[np.ndarray]:
  """Per MoE layer, the experts the official router selects: int [B*L, k], tokens row-major.

  LLaDA2: `topk_idx` as returned by each LLaDA2MoeGate (torch.topk order: descending biased score).
  LLaDA-MoE: `selected_experts` of each LLaDAMoESparseMoeBlock (softmax (+ expert_bias) top-k, same
  order), captured from its call to torch.nn.functional.one_hot.
  """
  model = load_official(path)
  x = torch.from_numpy(np.asarray(tokens, np.int64))
  if isinstance(model, LLaDA2MoeModelLM):
    with _capture_llada2_gates(model) as records, torch.no_grad(), _quiet():
      model(x)
    return [r["topk_idx"].numpy() for r in records]
  picks: list[np.ndarray] = []
  one_hot = torch.nn.functional.one_hot

  def recording_one_hot(t, num_classes=-1):
    picks.append(t.detach().numpy().copy())
    return one_hot(t, num_classes)

  n_moe = sum(isinstance(m, LLaDAMoESparseMoeBlock) for m in model.modules())
  torch.nn.functional.one_hot = recording_one_hot
  try:
    with torch.no_grad(), _quiet():
      model(x)
  finally:
    torch.nn.functional.one_hot = one_hot
  assert len(picks) == n_moe, (len(picks), n_moe)
  return picks


def official_generate(path: str, prompt_ids: np.ndarray, **kwargs: Any) -> np.ndarray:
  """LLaDA2MoeModelLM.generate (official, float32) on a [1, P] prompt; returns int [1, n].

  kwargs (official defaults): temperature=0.0 (greedy), block_length=32, steps=32 (per block,
  capped at gen_length // minimal_topk), gen_length=2048, top_p=None, top_k=None,
  eos_early_stop=False, minimal_topk=1, threshold=0.95, eos_id=156892, mask_id=156895. Tiny
  vocabularies must pass mask_id and eos_id. Batch size 1 only (the official loop indexes [0]).
  Returns the generated tokens after the prompt, cut after the first eos_id (included).
  """
  model = load_official(path)
  if not isinstance(model, LLaDA2MoeModelLM):
    raise TypeError("only LLaDA2MoeModelLM has an official generate")
  forward = model.forward

  def forward_float32_mask(*args, attention_mask=None, **kw):
    # generate builds its additive block mask in bfloat16 (0 / -inf); float32 SDPA rejects a bf16
    # mask, so it is cast (exactly) to float32. Shim 4 in the module docstring.
    if attention_mask is not None and attention_mask.is_floating_point():
      attention_mask = attention_mask.float()
    return forward(*args, attention_mask=attention_mask, **kw)

  model.forward = forward_float32_mask
  with _quiet():
    out = model.generate(torch.from_numpy(np.asarray(prompt_ids, np.int64)), **kwargs)
  return out.numpy()


def llada2_parameter_counts(config_json: str) -> dict[str, int]:
  """Official LLaDA2 parameter counts of a config.json, built on the meta device (no memory)."""
  with open(config_json, encoding="utf-8") as f:
    raw = json.load(f)
  kwargs = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
  with torch.device("meta"), _quiet():
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**kwargs))
  params = sum(p.numel() for p in model.parameters())
  buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith("expert_bias"))
  return {"parameters": params, "expert_bias": buffers, "with_expert_bias": params + buffers}
