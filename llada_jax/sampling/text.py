"""Text in, text out: restore a workdir for sampling, tokenize prompts, decode answers."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from llada_jax.errors import ConfigError
from llada_jax.model import ModelConfig, Transformer
from llada_jax.parallel.mesh import make_mesh
from llada_jax.sampling.generate import generate
from llada_jax.training.checkpoint import latest_step, load_config, load_params
from llada_jax.training.optimizer import make_optimizer
from llada_jax.training.state import state_shardings


def load_model(path: str | pathlib.Path) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) from a training workdir or an official HuggingFace LLaDA folder."""
  if (pathlib.Path(path) / "config.json").is_file():
    from llada_jax.interop.hf_checkpoint import load_hf  # pylint: disable=g-import-not-at-top
    return load_hf(path)
  return load_for_sampling(path)


def load_for_sampling(workdir: str | pathlib.Path) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) of the latest checkpoint, parameters only, replicated over local devices."""
  step = latest_step(workdir)
  config = load_config(workdir, step)
  serving = ml_collections.ConfigDict(config.to_dict())
  serving.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  mesh = make_mesh(serving, jax.local_devices())
  abstract, _ = state_shardings(serving, Transformer(ModelConfig.from_config(serving)),
                                make_optimizer(serving), mesh)
  return config, load_params(workdir, step, abstract.params)


def text_codec(config: ml_collections.ConfigDict) -> Any:
  """Something with encode/decode for the config's vocabulary, or None when it has no tokenizer."""
  if config.data.vocabulary == "byte":
    from llada_jax.data.vocab import get_vocabulary  # pylint: disable=g-import-not-at-top
    return get_vocabulary(config)
  if config.data.tokenizer and pathlib.Path(config.data.tokenizer).is_file():
    from llada_jax.data.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
    return HFTokenizer(config.data.tokenizer)
  return None


def trim_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
  """The ids before the first EOS (all of them if there is none)."""
  ids = list(ids)
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


def sample(config: ml_collections.ConfigDict, params: Any, *, texts: Sequence[str] | None = None,
           ids: Sequence[Sequence[int]] | None = None, seed: int = 0,
           **generate_kwargs: Any) -> dict[str, list]:
  """Generates one answer per prompt (text or ids; left-padded to a common length).

  Returns {"prompt": prompts as text, "tokens": answer ids cut at the first EOS, "text": decoded}.
  generate_kwargs go to `generate` (steps, gen_length, block_length, temperature, ...).
  """
  vocab = text_codec(config)
  if texts is not None and vocab is None:
    raise ConfigError(f"text prompts need a tokenizer, and data.vocabulary="
                      f"{config.data.vocabulary!r} has none bundled: give token ids instead")
  encoded = [list(vocab.encode(t)) for t in texts] if texts is not None else [list(i) for i in ids]
  width = max(len(e) for e in encoded)
  tokens = np.full((len(encoded), width), config.tokens.pad_id, np.int32)
  mask = np.zeros((len(encoded), width), bool)
  for row, row_ids in enumerate(encoded):
    tokens[row, width - len(row_ids):] = row_ids
    mask[row, width - len(row_ids):] = True
  out = generate(config, params, tokens, mask, rng=jax.random.PRNGKey(seed), **generate_kwargs)
  answers = [trim_at_eos(row, config.tokens.eos_id) for row in np.asarray(out)[:, width:].tolist()]
  decode = vocab.decode if vocab is not None else lambda ids: ""
  prompts = list(texts) if texts is not None else [decode(e) for e in encoded]
  return {"prompt": prompts, "tokens": answers, "text": [decode(a) for a in answers]}
