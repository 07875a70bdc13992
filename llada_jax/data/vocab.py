"""Vocabularies. The byte vocabulary is seqio's (pad 0, EOS 1, UNK 2, byte b -> b + 3: 259 real ids);
the mask id and any padding of the embedding table sit above the real ids."""

from __future__ import annotations

import ml_collections

from llada_jax.errors import ConfigError


def get_vocabulary(config: ml_collections.ConfigDict):
  """The seqio Vocabulary named by config.data.vocabulary."""
  import seqio  # pylint: disable=g-import-not-at-top

  if config.data.vocabulary == "byte":
    return seqio.ByteVocabulary()
  raise ConfigError(f"data.vocabulary={config.data.vocabulary!r} cannot be built yet: only 'byte' "
                    "has a bundled tokenizer (the LLaDA tokenizer.json arrives with HF import)")
