"""The likelihood bound on held-out text: LLaDA's loss, in bits per token and per byte.

Every validation sequence of a data task is noised `samples` times on device (keys from the seed and
the sequence's index) and scored with the model's own loss per sequence (`MaskedDiffusionLM.loss`,
reduction="sequence"): the pre-training bound, sum over masked positions of CE / p divided by the
sequence's tokens (for an autoregressive baseline, its exact next-token NLL). The reported value
is the token-weighted mean over sequences; its standard error comes from the spread of the
per-sequence values (data and noise variance together).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from llada_jax.diffusion.objectives import forward_process_of
from llada_jax.errors import ConfigError
from llada_jax.evaluation.distribute import gather_rows
from llada_jax.evaluation.model import EvalModel
from llada_jax.lm import MaskedDiffusionLM


@functools.lru_cache(maxsize=4)
def _sequence_bounds(config_json: str, samples: int):
  """jit(params, batch, keys [B]) -> per-sequence bound (nats/token) averaged over samples [B]:
  `MaskedDiffusionLM.loss` with reduction="sequence" (for an arm model, its exact NLL)."""
  lm = MaskedDiffusionLM(ml_collections.ConfigDict(json.loads(config_json)))

  def one_draw(params, batch, keys):
    noised = jax.vmap(
        lambda key, row: forward_process_of(
            lm.config, jax.tree.map(lambda x: x[None], row), key, random_length_prob=0.0, exact=True
        )
    )(keys, batch)
    noised = jax.tree.map(lambda x: x[:, 0], noised)
    return lm.loss(
        params, noised, keys[0], reduction="sequence", random_length_prob=0.0, exact=True
    )[0]

  @jax.jit
  def bounds(params, batch, keys):
    draws = jax.lax.map(
        lambda k: one_draw(params, batch, k),
        jax.vmap(lambda key: jax.random.split(key, samples), out_axes=1)(keys),
    )
    return draws.mean(0)

  return bounds


def evaluate_elbo(
    model: EvalModel,
    *,
    task: str | None = None,
    limit: int | None = None,
    samples: int = 1,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
  """Bound in nats/bits per token and bits per byte, with standard errors, on held-out text."""
  from llada_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  if samples < 1:
    raise ConfigError(f"--elbo_samples={samples} is not allowed: expected a positive integer")
  config = ml_collections.ConfigDict(model.config.to_dict())
  config.data.update(task=task or config.data.task, masking="device", num_shards=-1)
  config.data.batch_size = -(-config.data.batch_size // model.mesh.size) * model.mesh.size
  batch_size = config.data.batch_size
  batches = pipeline.eval_batches(
      config, model.item_sharding, None if limit is None else -(-limit // batch_size)
  )
  bounds_fn = _sequence_bounds(config.to_json(), samples)
  base = jax.random.PRNGKey(seed)
  mine = np.arange(jax.process_index(), len(batches), jax.process_count())
  rows = []
  for b in mine:
    batch = {k: batches[b][k] for k in ("targets", "valid", "positions", "segment_ids")}
    index = np.arange(b * batch_size, (b + 1) * batch_size, dtype=np.uint32)
    keys = jax.device_put(
        jax.vmap(lambda i: jax.random.fold_in(base, i))(index), model.item_sharding
    )
    bound = np.asarray(bounds_fn(model.params, batch, keys))
    targets, valid = np.asarray(batch["targets"]), np.asarray(batch["valid"])
    tokens = valid.sum(-1)
    nbytes = [_text_bytes(model, t[v].tolist()) for t, v in zip(targets, valid)]
    rows.append(np.stack([bound, tokens, np.asarray(nbytes)], -1))
    if progress is not None:
      progress(batch_size)
  local = np.concatenate(rows) if rows else np.zeros((0, 3))
  row_index = (mine[:, None] * batch_size + np.arange(batch_size)).reshape(-1)
  table = gather_rows(len(batches) * batch_size, row_index, local)[:limit]
  return _summary(table[:, 0], table[:, 1], table[:, 2], config.data.task)


def _text_bytes(model: EvalModel, ids: list[int]) -> int:
  """UTF-8 bytes of the text of `ids`; EOS and padding are tokens without text."""
  special = {model.config.tokens.eos_id, model.config.tokens.pad_id}
  return len(model.codec.decode([i for i in ids if i not in special]).encode("utf-8"))


def _summary(
    bound: np.ndarray, tokens: np.ndarray, nbytes: np.ndarray, task: str
) -> dict[str, Any]:
  """Token-weighted means and standard errors (ratio estimator over sequences)."""
  n = bound.size
  nats = float(np.sum(bound * tokens) / np.sum(tokens))
  per_seq = bound * tokens / np.mean(tokens)  # sequence contributions on the mean's scale
  stderr = (
      float(np.std(per_seq - nats * tokens / np.mean(tokens), ddof=1) / math.sqrt(n))
      if n > 1
      else float("nan")
  )
  tokens_per_byte = float(np.sum(tokens) / max(np.sum(nbytes), 1))
  bits = nats / math.log(2)
  bits_stderr = stderr / math.log(2)
  return dict(
      nats_per_token=nats,
      nats_per_token_stderr=stderr,
      bits_per_token=bits,
      bits_per_token_stderr=bits_stderr,
      bits_per_byte=bits * tokens_per_byte,
      bits_per_byte_stderr=bits_stderr * tokens_per_byte,
      count=n,
      tokens=int(np.sum(tokens)),
      bytes=int(np.sum(nbytes)),
      task=task,
  )
