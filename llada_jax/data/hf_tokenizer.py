"""The official LLaDA tokenizer from its `tokenizer.json` (via the `tokenizers` package) and the
LLaDA-Instruct chat template (Llama-3 style headers), implemented here without Jinja.

Works without seqio or TensorFlow; `seqio_vocabulary` wraps it for SeqIO pipelines.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import ml_collections

from llada_jax.errors import CheckpointError, ConfigError

SPECIAL_TOKENS = {
    "bos_id": "<|startoftext|>",
    "eos_id": "<|endoftext|>",
    "mask_id": "<|mdm_mask|>",
    "eot_id": "<|eot_id|>",
    "header_start_id": "<|start_header_id|>",
    "header_end_id": "<|end_header_id|>",
}


@dataclasses.dataclass(frozen=True)
class ChatMessage:
  role: str  # "system", "user" or "assistant"
  content: str


class HFTokenizer:
  """A tokenizer.json with LLaDA's special tokens looked up by their text."""

  def __init__(self, path: str | pathlib.Path):
    import tokenizers  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises plain Exceptions for unreadable files
      raise CheckpointError(f"cannot read tokenizer {file}: {e}") from None
    self.special = {}
    for name, text in SPECIAL_TOKENS.items():
      token_id = self._tokenizer.token_to_id(text)
      if token_id is None and name in ("eos_id", "mask_id"):
        raise CheckpointError(f"tokenizer {file} has no {text} token ({name})")
      self.special[name] = -1 if token_id is None else token_id

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    """Token ids of text; special-token strings inside it map to their ids."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def check_config(self, config: ml_collections.ConfigDict) -> None:
    """Checks the config's special ids against the tokenizer's and fills those the config lacks.

    tokens.mask_id and eos_id must be the tokenizer's; bos_id and eot_id must be the tokenizer's
    or -1, and a -1 takes the tokenizer's id (configs imported from an official config.json, which
    names no end-of-turn token, had -1). The model must cover the tokenizer's vocabulary.

    Raises:
      ConfigError: an id differs from the tokenizer's, or the model's vocabulary is smaller.
    """
    for name in ("mask_id", "eos_id", "bos_id", "eot_id"):
      mine, theirs = config.tokens[name], self.special[name]
      if name in ("bos_id", "eot_id") and mine == -1:
        config.tokens[name] = theirs if theirs < config.model.vocab_size else -1
      elif mine != theirs:
        raise ConfigError(
            f"tokens.{name}={mine} is not allowed: the tokenizer has "
            f"{SPECIAL_TOKENS[name]} = {theirs}"
        )
    if self.vocab_size > config.model.vocab_size:
      raise ConfigError(
          f"model.vocab_size={config.model.vocab_size} is not allowed: the "
          f"tokenizer has {self.vocab_size} tokens"
      )


def render_chat(
    messages: Sequence[ChatMessage],
    add_generation_prompt: bool = True,
    bos: str = SPECIAL_TOKENS["bos_id"],
) -> str:
  """The LLaDA-Instruct chat template: BOS, then per message
  <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>, then the assistant header."""
  parts = [bos]
  for message in messages:
    parts.append(
        f"<|start_header_id|>{message.role}<|end_header_id|>\n\n"
        f"{message.content.strip()}<|eot_id|>"
    )
  if add_generation_prompt:
    parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
  return "".join(parts)


def chat_prompt_ids(tokenizer: HFTokenizer, messages: Sequence[ChatMessage]) -> list[int]:
  """Token ids of the chat template for `messages`, ready for the assistant's answer."""
  return tokenizer.encode(render_chat(messages))


def seqio_vocabulary(path: str | pathlib.Path):
  """A seqio.Vocabulary over a tokenizer.json, for SeqIO tasks (pad = EOS, as LLaDA pads)."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tokenizer = HFTokenizer(path)

  class TokenizerJsonVocabulary(seqio.Vocabulary):  # pylint: disable=abstract-method  # no BOS
    """seqio view of HFTokenizer; the TF ops call back into the Rust tokenizer."""

    def __init__(self):
      super().__init__(extra_ids=0)
      self.tokenizer = tokenizer

    @property
    def pad_id(self) -> int:
      return tokenizer.special["eos_id"]

    @property
    def eos_id(self) -> int:
      return tokenizer.special["eos_id"]

    @property
    def unk_id(self) -> None:
      return None

    @property
    def _base_vocab_size(self) -> int:
      return tokenizer.vocab_size

    def _encode(self, s: str) -> list[int]:
      return tokenizer.encode(s)

    def _decode(self, ids: Sequence[int]) -> str:
      return tokenizer.decode([i for i in ids if i >= 0])

    def _encode_tf(self, s):
      ids = tf.py_function(
          lambda t: tf.constant(tokenizer.encode(t.numpy().decode()), tf.int32), [s], tf.int32
      )
      return tf.ensure_shape(ids, [None])

    def _decode_tf(self, ids):
      return tf.py_function(
          lambda t: tf.constant(tokenizer.decode(t.numpy().tolist())), [ids], tf.string
      )

    def __eq__(self, other) -> bool:
      return isinstance(other, TokenizerJsonVocabulary) and other.tokenizer is tokenizer

  return TokenizerJsonVocabulary()
