"""Text in and out for every vocabulary, without seqio or TensorFlow: what the commands that take
or print text (sample, chat, evaluate, lm-eval) use.

"byte" maps byte b to id b + 3 (pad 0, EOS 1, UNK 2), exactly as seqio's ByteVocabulary that the
training pipeline uses; "spm8k" is the shipped SentencePiece model through the sentencepiece
library (seqio wraps the same model, so the ids agree); "llada_hf" and "hf" are the model's
tokenizer.json (data/hf_tokenizer.py: LLaDA's, or any other model's with the config's special ids).
Chat prompts use the LLaDA-Instruct template when the vocabulary has its header tokens, and a
plain "User: ... / Assistant:" transcript otherwise.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Protocol, Sequence

import ml_collections

from llada_jax.config import TOKENIZER_VOCABULARIES
from llada_jax.errors import ConfigError

BYTE_OFFSET = 3  # pad 0, EOS 1, UNK 2
BYTE_IDS = 256 + BYTE_OFFSET
# Where a plain-transcript chat answer ends: the model starts the user's next turn.
PLAIN_CHAT_STOPS = ("\nUser:",)


class Codec(Protocol):
  """encode: text -> ids; decode: ids -> text (ids outside the vocabulary's text are dropped)."""

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class ByteCodec:
  """UTF-8 bytes as ids b + 3; decoding drops non-byte ids and invalid UTF-8 (as seqio does)."""

  def encode(self, text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_IDS)
    return data.decode("utf-8", errors="ignore")


class SentencePieceCodec:
  """A SentencePiece model file (ids as the model assigns them; decoding skips ids beyond it)."""

  def __init__(self, path: str | pathlib.Path):
    import sentencepiece  # pylint: disable=g-import-not-at-top

    if not pathlib.Path(path).is_file():
      raise ConfigError(f"{str(path)!r} names no SentencePiece model file")
    self._model = sentencepiece.SentencePieceProcessor(model_file=str(path))

  def encode(self, text: str) -> list[int]:
    return list(self._model.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    size = self._model.get_piece_size()
    return self._model.decode([int(i) for i in ids if 0 <= i < size])


@functools.lru_cache(maxsize=8)
def _codec(vocabulary: str, tokenizer: str, ids: tuple[tuple[str, int], ...] | None) -> Codec:
  if vocabulary == "byte":
    return ByteCodec()
  if vocabulary == "spm8k":
    from llada_jax.data.spm_vocab import SPM8K_PATH  # pylint: disable=g-import-not-at-top

    return SentencePieceCodec(SPM8K_PATH)
  from llada_jax.data.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top

  return HFTokenizer(tokenizer, None if ids is None else dict(ids))


def text_codec(config: ml_collections.ConfigDict) -> Codec:
  """The codec of config.data.vocabulary; its special ids are checked against config.tokens.

  Raises:
    ConfigError: a "llada_hf" or "hf" config whose data.tokenizer names no file, or a tokenizer
      whose special ids differ from the config's.
    CheckpointError: a tokenizer file that cannot be read.
  """
  vocabulary, tokenizer = config.data.vocabulary, config.data.tokenizer
  if vocabulary not in TOKENIZER_VOCABULARIES:
    codec = _codec(vocabulary, "", None)
  elif not (tokenizer and pathlib.Path(tokenizer).is_file()):
    raise ConfigError(
        f"data.vocabulary={vocabulary!r} needs the model's tokenizer.json, and "
        f"data.tokenizer={tokenizer!r} names no file: pass --tokenizer=PATH"
    )
  else:
    from llada_jax.data.hf_tokenizer import config_ids  # pylint: disable=g-import-not-at-top

    ids = config_ids(config)
    codec = _codec(vocabulary, tokenizer, None if ids is None else tuple(ids.items()))
  if hasattr(codec, "check_config"):
    codec.check_config(config)
  return codec


def has_chat_template(codec: Codec) -> bool:
  """Whether the codec has the LLaDA-Instruct header and end-of-turn tokens."""
  special = getattr(codec, "special", {})
  return all(special.get(name, -1) >= 0 for name in ("eot_id", "header_start_id"))


def chat_prompt(codec: Codec, messages: Sequence) -> tuple[list[int], tuple[str, ...]]:
  """(prompt ids ready for the assistant's answer, stop strings that end the answer's text) for
  `messages` (objects with role and content): the LLaDA-Instruct template where the vocabulary
  has it (its answer ends at EoT), else the plain transcript "User: ...\\nAssistant: ..."."""
  if has_chat_template(codec):
    from llada_jax.data.hf_tokenizer import chat_prompt_ids  # pylint: disable=g-import-not-at-top

    return chat_prompt_ids(codec, messages), ()
  lines = [f"{m.role.capitalize()}: {m.content.strip()}\n" for m in messages]
  return codec.encode("".join(lines) + "Assistant:"), PLAIN_CHAT_STOPS
