"""Vocabularies. The byte vocabulary is seqio's (pad 0, EOS 1, UNK 2, byte b -> b + 3: 259 real ids;
the mask id and any padding of the embedding table sit above them); "llada_hf" is the official
tokenizer.json named by data.tokenizer."""

from __future__ import annotations

import os

import ml_collections

from llada_jax.errors import ConfigError


def get_vocabulary(config: ml_collections.ConfigDict):
  """The seqio Vocabulary named by config.data.vocabulary."""
  import seqio  # pylint: disable=g-import-not-at-top

  if config.data.vocabulary == "byte":
    return seqio.ByteVocabulary()
  if not config.data.tokenizer:
    raise ConfigError(f"data.vocabulary={config.data.vocabulary!r} needs data.tokenizer: the path "
                      "of the model's tokenizer.json")
  if not os.path.isfile(config.data.tokenizer):
    raise ConfigError(f"data.tokenizer={config.data.tokenizer!r} names no file")
  from llada_jax.data.hf_tokenizer import seqio_vocabulary  # pylint: disable=g-import-not-at-top
  return seqio_vocabulary(config.data.tokenizer)
