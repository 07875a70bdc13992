"""Official LLaDA HuggingFace checkpoints (config.json + safetensors) <-> llada_jax params.

PyTorch Linear weights are [out, in]; Flax kernels here are [in, out] with heads split out:
q_proj [d, H, hd], attn_out [H, hd, d]. Every tensor is mapped and transposed on its own while the
files are read, so an import holds the parameters being built plus one source tensor.
`load_tensors` is that one import path for any HF format of this architecture, given the format's
`NameTable` (`llada_table` here, `interop.llama.llama_table` for Llama/Mistral).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
from typing import Any, Callable, Iterator, NamedTuple

import jax
import ml_collections
import ml_dtypes
import numpy as np

from llada_jax.config import TOKENIZER_VOCABULARIES, objective_of
from llada_jax.data.hf_tokenizer import HFTokenizer
from llada_jax.errors import CheckpointError, ConfigError
from llada_jax.interop import safetensors_io
from llada_jax.interop.files import INDEX, SINGLE, hf_files, read_json
from llada_jax.interop.hf_config import VOCABULARY_FIELD, config_from_hf, config_to_hf

PREFIX = "model.transformer."
BLOCK_PREFIX = PREFIX + "blocks."
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}

Keys = tuple[str, ...]  # a path into the parameter tree, e.g. ("ln_f", "weight")


class Tensor(NamedTuple):
  """One HF tensor outside the blocks: its shape in the file and the parameters it gives, each as
  (our keys, HF layout -> ours) (a tied embedding gives both wte and the head)."""

  shape: tuple[int, ...]
  targets: tuple[tuple[Keys, Callable[[np.ndarray], np.ndarray]], ...]


@dataclasses.dataclass(frozen=True)
class NameTable:
  """How one HF format names llada_jax's parameters: the one import path (`load_tensors`) reads
  any format through its table.

  block_prefix: block tensors are named f"{block_prefix}{layer}.{name}.weight"; block_names maps
  each such `name` to llada_jax's block (attn_norm, q_proj, ..., ff_out), whose layouts are
  `block_layouts`'s (PyTorch Linear [out, in] in every HF format). top: the tensors outside the
  blocks. ignored: names read past (a tied head's stored copy, which HF's loader also drops).
  """

  block_prefix: str
  block_names: dict[str, str]
  top: dict[str, Tensor]
  ignored: frozenset[str] = frozenset()

  def names(self, n_layers: int) -> list[str]:
    """Every tensor name the format requires for an n_layers model."""
    blocks = [self.block_name(i, name) for i in range(n_layers) for name in self.block_names]
    return list(self.top) + blocks

  def block_name(self, layer: int, name: str) -> str:
    return f"{self.block_prefix}{layer}.{name}.weight"


def block_layouts(
    m: ml_collections.ConfigDict,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], Callable, Callable]]:
  """Per block weight: (our shape, HF shape, hf -> ours, ours -> hf)."""
  d, h, k, hd, f = m.d_model, m.n_heads, m.n_kv_heads, m.d_model // m.n_heads, m.mlp_hidden_size

  def split_out(heads: int):
    return (
        (d, heads, hd),
        (heads * hd, d),
        lambda w: w.T.reshape(d, heads, hd),
        lambda w: w.reshape(d, heads * hd).T,
    )

  def linear(n_in: int, n_out: int):
    return ((n_in, n_out), (n_out, n_in), lambda w: w.T, lambda w: w.T)

  return {
      "attn_norm": ((d,), (d,), lambda w: w, lambda w: w),
      "ff_norm": ((d,), (d,), lambda w: w, lambda w: w),
      "q_proj": split_out(h),
      "k_proj": split_out(k),
      "v_proj": split_out(k),
      "attn_out": (
          (h, hd, d),
          (d, h * hd),
          lambda w: w.T.reshape(h, hd, d),
          lambda w: w.reshape(h * hd, d).T,
      ),
      "ff_proj": linear(d, f),
      "up_proj": linear(d, f),
      "ff_out": linear(f, d),
  }


def _leaf(block: str) -> str:
  return "weight" if block.endswith("norm") else "kernel"


def llada_table(config: ml_collections.ConfigDict) -> NameTable:
  """The official LLaDA names (model.transformer.*, OLMo-derived): the same names as ours."""
  m = config.model
  top = {
      PREFIX + "wte.weight": Tensor((m.vocab_size, m.d_model), ((("wte", "embedding"), _same),)),
      PREFIX + "ln_f.weight": Tensor((m.d_model,), ((("ln_f", "weight"), _same),)),
  }
  if not m.tie_embeddings:  # weight_tying: the head is wte.weight (no ff_out tensor in the file)
    top[PREFIX + "ff_out.weight"] = Tensor(
        (m.vocab_size, m.d_model), ((("ff_out", "kernel"), np.transpose),)
    )
  return NameTable(
      block_prefix=BLOCK_PREFIX, block_names={block: block for block in block_layouts(m)}, top=top
  )


def _same(w: np.ndarray) -> np.ndarray:
  return w


def read_hf_config(
    path: str | pathlib.Path, base: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """The llada_jax config of an HF folder's config.json (other sections from `base`), with the
  special ids of its tokenizer.json when it has one (the official config.json names no BOS or
  end-of-turn id) and data.tokenizer pointing at that file.

  Raises:
    CheckpointError: unreadable files, or ids that config.json and tokenizer.json disagree on.
  """
  path = pathlib.Path(path) / "config.json"
  hf = read_json(path)
  tokenizer = path.parent / "tokenizer.json"
  vocabulary = hf.get(VOCABULARY_FIELD, "llada_hf")
  has_tokenizer = tokenizer.is_file() and vocabulary in TOKENIZER_VOCABULARIES
  # LLaDA's tokenizer names its special ids; any other model's are config.json's own.
  special = HFTokenizer(tokenizer).special if has_tokenizer and vocabulary == "llada_hf" else None
  config = config_from_hf(hf, base, special, source=str(path))
  config.data.tokenizer = str(tokenizer.absolute()) if has_tokenizer else ""
  return config


def load_hf(
    path: str | pathlib.Path,
    *,
    dtype: str | None = None,
    base: ml_collections.ConfigDict | None = None,
    shardings: Any = None,
) -> tuple[ml_collections.ConfigDict, Any]:
  """Reads an HF LLaDA folder into (config, params).

  dtype: parameter dtype ("float32", "bfloat16"; default: as stored). base: config whose non-model
  sections are kept. shardings: optional tree of target shardings (from the config's mesh); each
  tensor is then placed as soon as it is complete instead of collected on the host.
  """
  path = pathlib.Path(path)
  files = hf_files(path)
  config = read_hf_config(path, base)
  return config, load_tensors(path, files, config, llada_table(config), dtype, shardings)


def load_tensors(
    path: pathlib.Path,
    files: list[pathlib.Path],
    config: ml_collections.ConfigDict,
    table: NameTable,
    dtype: str | None = None,
    shardings: Any = None,
) -> Any:
  """The parameter tree of `config`'s model from HF safetensors `files` named as `table` says.

  Each tensor is checked against its HF shape, converted (transposed, heads split out) and cast
  to `dtype` ("float32", "bfloat16"; None: as stored) on its own, as the files are read; with
  `shardings` every leaf is then placed on the devices. Block weights are stacked over layers
  [n_layers, ...] under "blocks" when model.scan_layers, else under "blocks_{i}".

  Raises:
    CheckpointError: a tensor appears twice, is unknown to the table, has another shape than the
      config gives, or is missing (each named with the folder).
  """
  m = config.model
  layouts = block_layouts(m)
  block = re.compile(rf"^{re.escape(table.block_prefix)}(\d+)\.(.+)\.weight$")
  target = (
      np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else (np.dtype(dtype) if dtype else None)
  )
  params: dict[str, Any] = {}
  seen: set[str] = set()

  def store(keys: Keys, value: np.ndarray, layer: int | None) -> None:
    node = params
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    if layer is None:
      node[keys[-1]] = value
      return
    if keys[-1] not in node:
      node[keys[-1]] = np.empty((m.n_layers,) + value.shape, value.dtype)
    node[keys[-1]][layer] = value

  for name, tensor in _all_tensors(files):
    if name in seen:
      raise CheckpointError(f"tensor {name} appears twice in {path}")
    seen.add(name)
    if name in table.ignored:
      continue
    value = np.asarray(tensor)
    dtype_out = target or value.dtype
    match = block.match(name)
    if match:
      layer, ours = int(match.group(1)), table.block_names.get(match.group(2))
      if ours is None or layer >= m.n_layers:
        raise CheckpointError(
            f"unexpected tensor {name} in {path} (unknown to a {m.n_layers}-layer "
            "llama-architecture model)"
        )
      _, hf_shape, to_ours, _ = layouts[ours]
      converted = _convert(name, value, hf_shape, to_ours, dtype_out, path)
      if m.scan_layers:
        store(("blocks", ours, _leaf(ours)), converted, layer)
      else:
        store((f"blocks_{layer}", ours, _leaf(ours)), converted, None)
    elif name in table.top:
      entry = table.top[name]
      for keys, to_ours in entry.targets:
        store(keys, _convert(name, value, entry.shape, to_ours, dtype_out, path), None)
    else:
      raise CheckpointError(f"unexpected tensor {name} in {path} (not part of this model format)")
    # Free this tensor before the next is read: the loop names would keep it alive meanwhile.
    del tensor, value
  missing = sorted(set(table.names(m.n_layers)) - seen)
  if missing:
    raise CheckpointError(f"{path} lacks tensor {missing[0]} (and {len(missing) - 1} more)")
  if shardings is not None:
    params = jax.tree.map(jax.device_put, params, shardings)
  return params


def _all_tensors(files: list[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
  for file in files:
    yield from safetensors_io.iter_tensors(file)


def _convert(
    name: str,
    value: np.ndarray,
    shape: tuple[int, ...],
    fn: Callable,
    dtype: np.dtype,
    path: pathlib.Path,
) -> np.ndarray:
  """fn(value) as a C-contiguous `dtype` array, once value has the HF `shape` the config gives."""
  if value.shape != shape:
    raise CheckpointError(
        f"tensor {name} has shape {list(value.shape)} in {path}, but the config gives "
        f"{list(shape)}"
    )
  return np.ascontiguousarray(fn(value), dtype=dtype)


def hf_names(config: ml_collections.ConfigDict) -> list[str]:
  """Every tensor name of the HF checkpoint of this model."""
  return llada_table(config).names(config.model.n_layers)


# The top-level parameters an export writes, by their keys in a NameTable's targets: (ours -> HF
# layout, whether its first axis is the vocabulary, cut to the rows the format has).
TOP_EXPORTS = {
    ("wte", "embedding"): (_same, True),
    ("ln_f", "weight"): (_same, False),
    ("ff_out", "kernel"): (np.transpose, True),
}


def to_hf_tensors(
    config: ml_collections.ConfigDict,
    params: Any,
    dtype: str = "bfloat16",
    table: NameTable | None = None,
    rows: int | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array in PyTorch layout) one tensor at a time, named as `table` says
  (default: the official LLaDA names, `llada_table`); embedding and head cut to their first
  `rows` vocabulary rows (default all: an exported Llama leaves an appended mask row out)."""
  table = table or llada_table(config)
  rows = config.model.vocab_size if rows is None else rows
  out = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)

  def host(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x)), dtype=out)

  def top(name: str) -> tuple[str, np.ndarray]:
    keys = table.top[name].targets[0][0]
    node = params
    for key in keys:
      node = node[key]
    to_hf, vocabulary = TOP_EXPORTS[keys]
    weight = to_hf(np.asarray(jax.device_get(node)))
    return name, host(weight[:rows] if vocabulary else weight)

  # The embedding first, then the blocks, then the rest (the order of the official files).
  first = [n for n, t in table.top.items() if t.targets[0][0] == ("wte", "embedding")]
  yield from (top(name) for name in first)
  layouts = block_layouts(config.model)
  for layer in range(config.model.n_layers):
    for hf_block, block in table.block_names.items():
      if config.model.scan_layers:
        weight = params["blocks"][block][_leaf(block)][layer]
      else:
        weight = params[f"blocks_{layer}"][block][_leaf(block)]
      to_hf = layouts[block][3]
      yield table.block_name(layer, hf_block), host(to_hf(np.asarray(jax.device_get(weight))))
  yield from (top(name) for name in table.top if name not in first)


def parse_size(size: str | int) -> int:
  """'5GB' -> 5e9 bytes (decimal units, as HF uses)."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)\s*", size.upper())
  if not match:
    raise CheckpointError(f"max_shard_size={size!r} is not allowed: expected e.g. '5GB' or '200MB'")
  return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


# The weight files an export writes (those of an earlier export into the same folder are removed,
# as transformers' save_pretrained does: a stale index would be read instead of the new files).
WEIGHT_FILES = re.compile(
    r"model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|shard-\d{5}\.partial"
)


def stale_weight_files(folder: Any, written: list[str]) -> list[Any]:
  """The files of `folder` (a pathlib or storage path) named like an export's files (weights,
  index: WEIGHT_FILES, INDEX; tokenizer.json) that are not among `written` (names)."""
  return [
      f
      for f in folder.iterdir()
      if is_export_file(f.name) and f.name != "config.json" and f.name not in written
  ]


def is_export_file(name: str) -> bool:
  """Whether a file of this name is one `save_hf` writes (config.json, weights, their index,
  tokenizer.json)."""
  return bool(WEIGHT_FILES.fullmatch(name)) or name in (INDEX, "config.json", "tokenizer.json")


def check_export_folder(folder: Any, flag: str = "--out") -> None:
  """ConfigError unless `folder` (a pathlib or storage path) is missing, empty or an earlier
  export (its config.json names VOCABULARY_FIELD and every file is one `save_hf` writes): an
  export never mixes its files with another model's (a generation_config.json or tokenizer
  beside them would be read back with it) and never deletes what it did not write."""
  if not folder.exists():
    return
  names = sorted(f.name for f in folder.iterdir())
  if not names:
    return
  earlier = "config.json" in names and VOCABULARY_FIELD in read_json(folder / "config.json")
  foreign = [n for n in names if not is_export_file(n)]
  if not earlier or foreign:
    what = ", ".join((foreign or names)[:3])
    raise ConfigError(
        f"{flag}={folder} is not allowed: it holds files that are not an earlier llada-convert "
        f"export ({what}); expected a new or empty folder or an earlier export"
    )


def save_hf(
    config: ml_collections.ConfigDict,
    params: Any,
    path: str | pathlib.Path,
    max_shard_size: str | int = "5GB",
    dtype: str = "bfloat16",
) -> list[pathlib.Path]:
  """Writes the HF folder of a model: an ARM (diffusion.objective "arm") as a Llama folder
  (`interop.llama.config_to_llama`: transformers' LlamaForCausalLM loads it, an appended mask row
  left out), an MDM or block model as an official LLaDA folder (`config_to_hf`, with the
  llada_jax_* fields the import reads back). Both get safetensors (sharded with an index when over
  max_shard_size) and the model's tokenizer.json for a tokenizer vocabulary ("llada_hf", "hf";
  config.json records the vocabulary, so a byte or spm8k model comes back as one). Weight files of
  an earlier export into `path` are removed once the new ones are written.

  Shards are written as they fill, so at most one shard is held on the host at a time.

  Raises:
    CheckpointError: a dtype other than bfloat16 or float32, or a bad max_shard_size.
  """
  from llada_jax.interop import llama  # pylint: disable=g-import-not-at-top  (llama imports us)

  if dtype not in ("bfloat16", "float32"):
    raise CheckpointError(f"dtype={dtype!r} is not allowed: expected bfloat16 or float32")
  limit = parse_size(max_shard_size)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  if not config.model.moe.num_experts and (config.model.qk_norm or config.model.rotary_dim):
    raise CheckpointError(
        "this model cannot be written as a LLaDA or Llama folder: it has QK-norm or partial "
        "rotary (model.qk_norm, model.rotary_dim), which those formats do not hold"
    )
  if config.model.moe.num_experts and config.model.tie_embeddings:
    raise CheckpointError(
        "this model cannot be written as an llada2_moe or LLaDA-MoE folder: it has tied "
        "embeddings (model.tie_embeddings), which those formats do not hold"
    )
  if config.model.moe.num_experts:
    from llada_jax.interop import llada2_moe, llada_moe, rules  # pylint: disable=g-import-not-at-top

    if config.model.moe.router == "softmax":  # LLaDA-MoE's router; LLaDA 2.x's is sigmoid_grouped
      hf = llada_moe.config_to_llada_moe(config, dtype)
      table = llada_moe.rules(config)
    else:
      hf = llada2_moe.config_to_llada2_moe(config, dtype)
      table = llada2_moe.rules(config)
    tensors = rules.to_hf_tensors(config, params, table, dtype)
  elif objective_of(config).causal:
    rows = llama.exported_rows(config)
    hf = llama.config_to_llama(config, rows, dtype)
    tensors = to_hf_tensors(config, params, dtype, llama.llama_table(config, appended=False), rows)
  else:
    hf, tensors = config_to_hf(config), to_hf_tensors(config, params, dtype)
  (path / "config.json").write_text(json.dumps(hf, indent=2))
  tokenizer = pathlib.Path(config.data.tokenizer) if config.data.tokenizer else None
  kept = []  # the files beside the weights this export writes
  if (
      config.data.vocabulary in TOKENIZER_VOCABULARIES
      and tokenizer is not None
      and tokenizer.is_file()
  ):
    if tokenizer.resolve() != (path / "tokenizer.json").resolve():
      shutil.copyfile(tokenizer, path / "tokenizer.json")
    kept.append("tokenizer.json")
  written: list[tuple[pathlib.Path, list[str]]] = []
  shard: dict[str, np.ndarray] = {}
  size = total = 0

  def flush() -> None:
    file = path / f"shard-{len(written):05d}.partial"
    safetensors_io.write_file(file, shard, {"format": "pt"})
    written.append((file, list(shard)))

  for name, tensor in tensors:
    if shard and size + tensor.nbytes > limit:
      flush()
      shard, size = {}, 0
    shard[name] = tensor
    size += tensor.nbytes
    total += tensor.nbytes
  flush()
  names = (
      [SINGLE]
      if len(written) == 1
      else [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
  )
  partials = [partial.name for partial, _ in written]
  index = [INDEX] if len(written) > 1 else []
  for stale in stale_weight_files(path, names + partials + index + kept):
    stale.unlink()
  if len(written) == 1:
    written[0][0].rename(path / SINGLE)
    return [path / SINGLE]
  files, weight_map = [], {}
  for name, (partial, tensor_names) in zip(names, written):
    file = path / name
    partial.rename(file)
    weight_map.update({tensor_name: file.name for tensor_name in tensor_names})
    files.append(file)
  (path / INDEX).write_text(
      json.dumps(
          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
          indent=2,
      )
  )
  return files
