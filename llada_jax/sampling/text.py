"""Text in, text out: restore a workdir for sampling, tokenize prompts, decode answers."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from llada_jax.model import ModelConfig, Transformer
from llada_jax.parallel.mesh import make_mesh
from llada_jax.sampling.generate import generate
from llada_jax.training.checkpoint import latest_step, load_config, load_state
from llada_jax.training.optimizer import make_optimizer
from llada_jax.training.state import state_shardings


def load_for_sampling(workdir: str | pathlib.Path) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) of the latest checkpoint, parameters replicated over the local devices."""
  step = latest_step(workdir)
  config = load_config(workdir, step)
  serving = ml_collections.ConfigDict(config.to_dict())
  serving.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  mesh = make_mesh(serving, jax.local_devices())
  abstract, _ = state_shardings(serving, Transformer(ModelConfig.from_config(serving)),
                                make_optimizer(serving), mesh)
  return config, load_state(workdir, step, abstract).params


def sample_texts(config: ml_collections.ConfigDict, params: Any, prompts: Sequence[str], *,
                 steps: int, gen_length: int, block_length: int, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
  """Generates one answer per prompt (prompts left-padded to a common length)."""
  from llada_jax.data.vocab import get_vocabulary  # pylint: disable=g-import-not-at-top

  vocab = get_vocabulary(config)
  encoded = [list(vocab.encode(p)) for p in prompts]
  width = max(len(e) for e in encoded)
  tokens = np.full((len(encoded), width), vocab.pad_id, np.int32)
  mask = np.zeros((len(encoded), width), bool)
  for row, ids in enumerate(encoded):
    tokens[row, width - len(ids):] = ids
    mask[row, width - len(ids):] = True
  out = generate(config, params, tokens, mask, steps=steps, gen_length=gen_length,
                 block_length=block_length, temperature=temperature,
                 rng=jax.random.PRNGKey(seed))
  return [vocab.decode(row.tolist()) for row in np.asarray(out)[:, width:]]
