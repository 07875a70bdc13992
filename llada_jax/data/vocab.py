"""Vocabularies, checked against the config's special ids.

"byte": seqio's ByteVocabulary (pad 0, EOS 1, UNK 2, byte b -> b + 3: 259 real ids; the mask id
and any padding of the embedding table sit above them). "spm8k": the shipped SentencePiece model
(8,000 pieces, same pad/EOS/UNK ids). "llada_hf": the official tokenizer.json named by
data.tokenizer; "hf": any other model's tokenizer.json, its BOS/EOS/mask ids the config's
(data/hf_tokenizer.py).
"""

from __future__ import annotations

import functools
import os
from typing import Mapping

import ml_collections

from llada_jax.config import TOKENIZER_VOCABULARIES, VOCABULARY_SIZES
from llada_jax.errors import ConfigError


def vocabulary_by_name(name: str, tokenizer: str = "", ids: Mapping[str, int] | None = None):
  """The seqio Vocabulary called `name` ("byte", "spm8k", or "llada_hf" / "hf" with a
  tokenizer.json and, for "hf", the config's special ids: `hf_tokenizer.config_ids`)."""
  if name in TOKENIZER_VOCABULARIES:
    if not tokenizer or not os.path.isfile(tokenizer):
      raise ConfigError(
          f"vocabulary {name!r} needs the path of the model's tokenizer.json "
          f"(data.tokenizer); {tokenizer!r} names no file"
      )
    from llada_jax.data.hf_tokenizer import seqio_vocabulary  # pylint: disable=g-import-not-at-top

    return seqio_vocabulary(tokenizer, ids)
  if name == "spm8k":
    from llada_jax.data.spm_vocab import spm_vocabulary  # pylint: disable=g-import-not-at-top

    return spm_vocabulary()
  if name == "byte":
    import seqio  # pylint: disable=g-import-not-at-top

    return seqio.ByteVocabulary()
  raise ConfigError(
      f"vocabulary {name!r} is not allowed: expected one of {tuple(VOCABULARY_SIZES)}"
  )


def get_vocabulary(config: ml_collections.ConfigDict):
  """The seqio Vocabulary named by config.data.vocabulary, after checking the token ids."""
  if config.data.vocabulary in TOKENIZER_VOCABULARIES:
    from llada_jax.data.hf_tokenizer import config_ids  # pylint: disable=g-import-not-at-top

    vocabulary = vocabulary_by_name(
        config.data.vocabulary, config.data.tokenizer, config_ids(config)
    )
    vocabulary.tokenizer.check_config(config)
    return vocabulary
  vocabulary = vocabulary_by_name(config.data.vocabulary)
  for name in ("eos_id", "pad_id"):
    if config.tokens[name] != getattr(vocabulary, name):
      raise ConfigError(
          f"tokens.{name}={config.tokens[name]} is not allowed: the "
          f"{config.data.vocabulary!r} vocabulary has {name} "
          f"{getattr(vocabulary, name)}"
      )
  if config.model.vocab_size < vocabulary.vocab_size + 1:
    raise ConfigError(
        f"model.vocab_size={config.model.vocab_size} is not allowed: the "
        f"{config.data.vocabulary!r} vocabulary has {vocabulary.vocab_size} ids "
        "and the model needs one more for the mask id"
    )
  return vocabulary


def real_token_count(config: ml_collections.ConfigDict) -> int | None:
  """The number of ids the vocabulary's tokenizer can emit (its real tokens): the shipped
  vocabulary's size, or the tokenizer.json's ("llada_hf", "hf"); None when that file is not at
  hand."""
  size = VOCABULARY_SIZES[config.data.vocabulary]
  if size is not None:
    return size
  tokenizer = config.data.tokenizer
  return _tokenizer_size(tokenizer) if tokenizer and os.path.isfile(tokenizer) else None


@functools.lru_cache(maxsize=8)
def _tokenizer_size(path: str) -> int:
  from llada_jax.data.hf_tokenizer import CONFIG_IDS, HFTokenizer  # pylint: disable=g-import-not-at-top

  return HFTokenizer(path, dict.fromkeys(CONFIG_IDS, -1)).vocab_size


def mask_is_a_token(config: ml_collections.ConfigDict) -> bool:
  """Whether tokens.mask_id is one of the vocabulary's real tokens (`real_token_count`; without
  the tokenizer at hand: any row but the last, which is taken as an appended mask row), rather
  than a row of its own (the shipped vocabularies' mask, an imported Llama's appended row)."""
  count = real_token_count(config)
  return config.tokens.mask_id < (config.model.vocab_size - 1 if count is None else count)
