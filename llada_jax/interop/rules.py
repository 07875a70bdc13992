"""The generic HF checkpoint engine for layer- and expert-indexed formats: a family is a list of
`Rule`s, and import and export both read that one list.

A rule names one HF tensor pattern ("model.layers.{layer}.mlp.experts.{expert}.up_proj.weight")
and the llada_jax parameters it holds, with the conversions both ways. The engine places each HF
tensor into the parameter tree of the config's network — dense layers stacked under "blocks" and
MoE layers under "moe_blocks" when model.scan_layers, one "blocks_{i}" per layer otherwise; a
per-expert tensor into its row of the stacked expert weights — one tensor at a time, and checks
every name, shape and completeness against what the config gives. Families: interop/llada2_moe.py,
interop/llada_moe.py.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

from llada_jax.errors import CheckpointError
from llada_jax.interop import safetensors_io

Keys = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor pattern and the llada_jax parameters it holds.

  hf: the name, with "{layer}" for a per-layer tensor and "{expert}" for a per-routed-expert one.
  ours: the parameter paths it fills: top-level ones for a name without {layer}, paths inside the
    layer's block otherwise (("q_proj", "kernel"), ("moe", "wi_gate"), ...).
  hf_shape: its shape in the file.
  to_ours: HF array -> one array per path of `ours` (the layer's, or the expert's row of it).
  to_hf: the arrays of `ours` (same order) -> the HF array.
  layers: for a per-layer name, which layers have it: "all", "dense" or "moe"
    (`ModelConfig.dense_layers` splits them).
  """

  hf: str
  ours: tuple[Keys, ...]
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]
  layers: str = "all"

  @property
  def per_layer(self) -> bool:
    return "{layer}" in self.hf

  @property
  def per_expert(self) -> bool:
    return "{expert}" in self.hf

  def pattern(self) -> re.Pattern[str]:
    text = re.escape(self.hf).replace(r"\{layer\}", r"(?P<layer>\d+)")
    return re.compile("^" + text.replace(r"\{expert\}", r"(?P<expert>\d+)") + "$")


def same(w: np.ndarray) -> tuple[np.ndarray]:
  """HF array -> the one parameter, unchanged (norm weights, biases)."""
  return (w,)


def linear(w: np.ndarray) -> tuple[np.ndarray]:
  """A PyTorch Linear weight [out, in] -> our kernel [in, out]."""
  return (w.T,)


def swap_last(w: np.ndarray) -> np.ndarray:
  return np.swapaxes(w, -1, -2)


LAYER = "model.layers.{layer}."  # the per-layer prefix of the HF families


def kernel_rule(name: str, shape: tuple[int, ...], ours: Keys, layers: str = "all") -> Rule:
  """A per-layer PyTorch Linear weight `name` (after LAYER) [out, in] <-> our kernel [in, out]."""
  return Rule(LAYER + name, (ours,), shape, linear, np.transpose, layers)


def norm_rule(name: str, size: int, ours: str) -> Rule:
  """A per-layer RMSNorm weight [size] <-> our `ours`/weight."""
  return Rule(LAYER + name, ((ours, "weight"),), (size,), same, lambda w: w)


def attention_output_rule(name: str, d: int, heads: int, head_dim: int) -> Rule:
  """The attention output projection [d, heads * head_dim] <-> our attn_out [heads, head_dim, d]."""
  return Rule(
      LAYER + name,
      (("attn_out", "kernel"),),
      (d, heads * head_dim),
      lambda w: (w.T.reshape(heads, head_dim, d),),
      lambda w: w.reshape(heads * head_dim, d).T,
  )


def dense_mlp_rules(d: int, hidden: int) -> list[Rule]:
  """The dense layers' SwiGLU mlp.{gate,up,down}_proj <-> our ff_proj, up_proj, ff_out."""
  return [
      kernel_rule("mlp.gate_proj.weight", (hidden, d), ("ff_proj", "kernel"), "dense"),
      kernel_rule("mlp.up_proj.weight", (hidden, d), ("up_proj", "kernel"), "dense"),
      kernel_rule("mlp.down_proj.weight", (d, hidden), ("ff_out", "kernel"), "dense"),
  ]


def head_rules(vocab: int, d: int) -> list[Rule]:
  """The final norm model.norm and the untied output head lm_head."""
  return [
      Rule("model.norm.weight", (("ln_f", "weight"),), (d,), same, lambda w: w),
      Rule("lm_head.weight", (("ff_out", "kernel"),), (vocab, d), linear, np.transpose),
  ]


def _dense_layers(m: ml_collections.ConfigDict) -> int:
  from llada_jax.model import ModelConfig  # pylint: disable=g-import-not-at-top

  return ModelConfig.from_config(ml_collections.ConfigDict({"model": m})).dense_layers


def layer_range(m: ml_collections.ConfigDict, which: str) -> range:
  """The layers a per-layer rule's `layers` ("all", "dense", "moe") stands for."""
  return _layers(m.n_layers, _dense_layers(m), which)


def _layers(n_layers: int, dense: int, which: str) -> range:
  return {"all": range(n_layers), "dense": range(dense), "moe": range(dense, n_layers)}[which]


def _place(scan: bool, dense: int, layer: int, expert: int | None) -> tuple[Keys, tuple]:
  """(block path prefix, index into the leaf) of one layer's (and expert's) slice, given
  model.scan_layers and the number of dense layers."""
  index = () if expert is None else (expert,)
  if not scan:
    return (f"blocks_{layer}",), index
  if layer < dense:
    return ("blocks",), (layer,) + index
  return ("moe_blocks",), (layer - dense,) + index


def expected_names(config: ml_collections.ConfigDict, rules: list[Rule]) -> list[str]:
  """Every HF tensor name of this model under `rules`, in file order: the top-level names of the
  first rules, then layer by layer (experts in order), then the remaining top-level names."""
  m = config.model
  names = []
  for layer in range(m.n_layers):
    for rule in rules:
      if rule.per_layer and layer in layer_range(m, rule.layers):
        experts = range(m.moe.num_experts) if rule.per_expert else (None,)
        names.extend(rule.hf.format(layer=layer, expert=e) for e in experts)
  top = [rule.hf for rule in rules if not rule.per_layer]
  return top[:1] + names + top[1:]


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes (jax.ShapeDtypeStruct) of the config's parameter tree, without computing
  it."""
  from llada_jax.model import ModelConfig, network  # pylint: disable=g-import-not-at-top

  module = network(ModelConfig.from_config(config))
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  )
  return nn.meta.unbox(shapes)


def fill_zeros(config: ml_collections.ConfigDict, params: Any, leaf: str) -> Any:
  """params with every parameter named `leaf` that they lack set to zeros of the config's shape
  (a buffer a folder may omit, such as LLaDA-MoE's expert bias when it is off)."""

  def walk(shapes: Any, tree: dict[str, Any]) -> dict[str, Any]:
    out = dict(tree)
    for key, value in shapes.items():
      if hasattr(value, "items"):
        out[key] = walk(value, tree.get(key, {}))
      elif key == leaf and key not in tree:
        out[key] = np.zeros(value.shape, value.dtype)
    return out

  return walk(abstract_params(config), params)


def _leaf(tree: Any, keys: Keys) -> Any:
  for key in keys:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def load_tensors(
    path: pathlib.Path,
    files: list[pathlib.Path],
    config: ml_collections.ConfigDict,
    rules: list[Rule],
    dtype: str | None = None,
    shardings: Any = None,
    zeros: str | None = None,
) -> Any:
  """The parameter tree of `config`'s network from HF safetensors `files` named as `rules` say,
  one tensor at a time; cast to `dtype` ("float32", "bfloat16"; None: as stored); parameters named
  `zeros` that no rule fills are zeros (`fill_zeros`); with `shardings` every leaf is then placed
  on the devices.

  Raises:
    CheckpointError: a tensor appears twice, matches no rule (or names a layer or expert the
      config does not have), has another shape than the config gives, or is missing.
  """
  m = config.model
  dense = _dense_layers(m)  # once: every tensor's placement reads it
  shapes = abstract_params(config)
  target = (
      np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else (np.dtype(dtype) if dtype else None)
  )
  patterns = [(rule, rule.pattern()) for rule in rules]
  params: dict[str, Any] = {}
  seen: set[str] = set()
  for file in files:
    for name, tensor in safetensors_io.iter_tensors(file):
      if name in seen:
        raise CheckpointError(f"tensor {name} appears twice in {path}")
      seen.add(name)
      found = next(((r, p.match(name)) for r, p in patterns if p.match(name)), None)
      if found is None:
        raise CheckpointError(f"unexpected tensor {name} in {path} (not part of this model format)")
      rule, match = found
      value = np.asarray(tensor)
      layer = int(match.group("layer")) if rule.per_layer else None
      expert = int(match.group("expert")) if rule.per_expert else None
      if layer is not None and layer not in _layers(m.n_layers, dense, rule.layers):
        raise CheckpointError(
            f"unexpected tensor {name} in {path} (layer {layer} of this {m.n_layers}-layer model, "
            f"{dense} dense, has no such tensor)"
        )
      if expert is not None and expert >= m.moe.num_experts:
        raise CheckpointError(
            f"unexpected tensor {name} in {path} (the model has {m.moe.num_experts} experts)"
        )
      if value.shape != rule.hf_shape:
        raise CheckpointError(
            f"tensor {name} has shape {list(value.shape)} in {path}, but the config gives "
            f"{list(rule.hf_shape)}"
        )
      prefix, index = ((), ()) if layer is None else _place(m.scan_layers, dense, layer, expert)
      for keys, part in zip(rule.ours, rule.to_ours(value)):
        full = prefix + keys
        shape = _leaf(shapes, full)
        if shape is None or tuple(shape.shape[len(index) :]) != part.shape:
          raise CheckpointError(f"tensor {name} of {path} does not fit parameter {'/'.join(full)}")
        node = params
        for key in full[:-1]:
          node = node.setdefault(key, {})
        out = np.ascontiguousarray(part, dtype=target or part.dtype)
        if not index:
          node[full[-1]] = out
        else:
          if full[-1] not in node:
            node[full[-1]] = np.empty(shape.shape, out.dtype)
          node[full[-1]][index] = out
      del tensor, value
  missing = [n for n in expected_names(config, rules) if n not in seen]
  if missing:
    raise CheckpointError(f"{path} lacks tensor {missing[0]} (and {len(missing) - 1} more)")
  if zeros is not None:
    params = fill_zeros(config, params, zeros)
  if shardings is not None:
    params = jax.tree.map(jax.device_put, params, shardings)
  return params


def to_hf_tensors(
    config: ml_collections.ConfigDict, params: Any, rules: list[Rule], dtype: str = "bfloat16"
) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array in the format's layout) of every tensor `rules` name for this model,
  one at a time, in `expected_names` order, cast to `dtype`."""
  m = config.model
  dense = _dense_layers(m)
  out = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  patterns = [(rule, rule.pattern()) for rule in rules]
  for name in expected_names(config, rules):
    rule, match = [(r, p.match(name)) for r, p in patterns if p.match(name)][0]
    prefix, index = ((), ())
    if rule.per_layer:
      expert = int(match.group("expert")) if rule.per_expert else None
      prefix, index = _place(m.scan_layers, dense, int(match.group("layer")), expert)
    parts = [np.asarray(jax.device_get(_leaf(params, prefix + keys)[index])) for keys in rule.ours]
    yield name, np.ascontiguousarray(rule.to_hf(*parts), dtype=out)
