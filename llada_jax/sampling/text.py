"""Text in, text out: restore a workdir for sampling, tokenize prompts, decode answers."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from llada_jax.data.codec import text_codec
from llada_jax.errors import ConfigError
from llada_jax.model import ModelConfig, Transformer
from llada_jax.parallel.mesh import make_mesh
from llada_jax.sampling.ending import end_answer
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


def sample(config: ml_collections.ConfigDict, params: Any, *, texts: Sequence[str] | None = None,
           ids: Sequence[Sequence[int]] | None = None, seed: int = 0,
           stops: Sequence[str] = (), **generate_kwargs: Any) -> dict[str, list]:
  """Generates one answer per prompt (text or ids; left-padded to a common length).

  Returns {"prompt": prompts as text, "tokens": answer ids cut at the first end token, "text":
  their text cut at the first of `stops`} (`llada_jax.sampling.ending`). generate_kwargs go to
  `generate` (steps, gen_length, block_length, temperature, ...).
  """
  try:
    vocab = text_codec(config)
  except ConfigError:
    if texts is not None:
      raise
    vocab = None  # token ids in and out: an HF model whose tokenizer.json is not at hand
  encoded = [list(vocab.encode(t)) for t in texts] if texts is not None else [list(i) for i in ids]
  width = max(len(e) for e in encoded)
  tokens = np.full((len(encoded), width), config.tokens.pad_id, np.int32)
  mask = np.zeros((len(encoded), width), bool)
  for row, row_ids in enumerate(encoded):
    tokens[row, width - len(row_ids):] = row_ids
    mask[row, width - len(row_ids):] = True
  out = generate(config, params, tokens, mask, rng=jax.random.PRNGKey(seed), **generate_kwargs)
  decode = vocab.decode if vocab is not None else lambda ids: ""
  ended = [end_answer(row, config.tokens, decode, stops)
           for row in np.asarray(out)[:, width:].tolist()]
  prompts = list(texts) if texts is not None else [decode(e) for e in encoded]
  return {"prompt": prompts, "tokens": [i for i, _ in ended], "text": [t for _, t in ended]}
