"""The SentencePiece vocabulary shipped with the package (trained by `llada_jax.data.train_spm`).

Ids follow seqio: pad 0, EOS 1, UNK 2, no BOS; byte fallback makes every text encodable.
"""

from __future__ import annotations

import pathlib

from llada_jax.errors import ConfigError

SPM8K_PATH = pathlib.Path(__file__).parent / "vocabularies" / "spm8k" / "spm.model"
SPM8K_SIZE = 8000


def spm_vocabulary(path: str | pathlib.Path = SPM8K_PATH):
  """The seqio.SentencePieceVocabulary of a model file; seqio is imported only here, on use."""
  if not pathlib.Path(path).is_file():
    raise ConfigError(f"{str(path)!r} names no SentencePiece model file")
  import seqio  # pylint: disable=g-import-not-at-top

  return seqio.SentencePieceVocabulary(str(path))
