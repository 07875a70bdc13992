"""A model's `tokenizer.json` (via the `tokenizers` package) and the LLaDA-Instruct chat template
(Llama-3 style headers), implemented here without Jinja.

Two vocabularies read a tokenizer.json. "llada_hf": the official LLaDA tokenizer, whose special
tokens are found by their text (SPECIAL_TOKENS). "hf": any other model's, such as a converted
Llama/Mistral one (interop/llama.py): BOS, EOS and the mask id are the config's (`CONFIG_IDS`;
the import takes them from the model's config files, and a converted model's mask is usually the
row appended after the tokenizer's vocabulary), the chat tokens are still found by their text
(Llama 3's <|start_header_id|>, <|end_header_id|>, <|eot_id|> are LLaDA's). Either way decoding
drops ids the tokenizer does not have (that appended mask row) and special tokens.

Works without seqio or TensorFlow; `seqio_vocabulary` wraps it for SeqIO pipelines.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping, Sequence

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
# The special ids a tokenizer.json of vocabulary "hf" takes from config.tokens instead of its text.
CONFIG_IDS = ("bos_id", "eos_id", "mask_id")


@dataclasses.dataclass(frozen=True)
class ChatMessage:
  role: str  # "system", "user" or "assistant"
  content: str


class HFTokenizer:
  """A tokenizer.json and its special ids (`special`: name -> id, -1 for none).

  ids=None (vocabulary "llada_hf"): every special token is looked up by its LLaDA text, EOS and
  the mask token are required. ids (vocabulary "hf", `config_ids`): bos_id, eos_id and mask_id are
  these ids, the chat tokens are looked up by their text.

  Raises:
    CheckpointError: the file cannot be read as a tokenizer.json, or (ids=None) it lacks LLaDA's
      EOS or mask token.
  """

  def __init__(self, path: str | pathlib.Path, ids: Mapping[str, int] | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises plain Exceptions for unreadable files
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"cannot read tokenizer {file}: {first} (expected a HuggingFace tokenizer.json)"
      ) from None
    self.special = {}
    for name, text in SPECIAL_TOKENS.items():
      if ids is not None and name in CONFIG_IDS:
        self.special[name] = int(ids[name])
        continue
      self.special[name] = self.token_id(text)
      if self.special[name] == -1 and ids is None and name in ("eos_id", "mask_id"):
        raise CheckpointError(f"tokenizer {file} has no {text} token ({name})")

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    """Token ids of text; special-token strings inside it map to their ids."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids`; ids outside [0, vocab_size) (a mask row appended after the tokenizer's
    vocabulary, padding rows of the embedding) are dropped, as are special tokens unless
    skip_special_tokens=False."""
    size = self.vocab_size
    kept = [int(i) for i in ids if 0 <= i < size]
    return self._tokenizer.decode(kept, skip_special_tokens=skip_special_tokens)

  def token_text(self, token_id: int) -> str:
    """The text of one token id ("" for -1 or an id the tokenizer does not have)."""
    return (self._tokenizer.id_to_token(token_id) or "") if token_id >= 0 else ""

  def token_id(self, text: str) -> int:
    """The id of one token's text (-1 if the tokenizer has no such token)."""
    token_id = self._tokenizer.token_to_id(text)
    return -1 if token_id is None else token_id

  def check_config(self, config: ml_collections.ConfigDict) -> None:
    """Checks the config's special ids against the tokenizer's and fills those the config lacks.

    tokens.mask_id and eos_id must be the tokenizer's; bos_id and eot_id must be the tokenizer's
    or -1, and a -1 takes the tokenizer's id (configs imported from an official config.json, which
    names no end-of-turn token, had -1). eos_id, pad_id, bos_id and eot_id must be ids of the
    tokenizer (the mask id need not be: a converted model's is an appended row). The model must
    cover the tokenizer's vocabulary.

    Raises:
      ConfigError: an id differs from the tokenizer's or lies outside it, or the model's
        vocabulary is smaller.
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
    for name in ("eos_id", "pad_id", "bos_id", "eot_id"):
      if config.tokens[name] >= self.vocab_size:
        raise ConfigError(
            f"tokens.{name}={config.tokens[name]} is not allowed: expected an id of the "
            f"tokenizer's {self.vocab_size} tokens (or -1 where none is allowed)"
        )
    if self.vocab_size > config.model.vocab_size:
      raise ConfigError(
          f"model.vocab_size={config.model.vocab_size} is not allowed: the "
          f"tokenizer has {self.vocab_size} tokens"
      )


def config_ids(config: ml_collections.ConfigDict) -> dict[str, int] | None:
  """The `ids` of the HFTokenizer of config.data.vocabulary: None for "llada_hf" (LLaDA's
  tokenizer names its own), else config.tokens' CONFIG_IDS."""
  if config.data.vocabulary == "llada_hf":
    return None
  return {name: int(config.tokens[name]) for name in CONFIG_IDS}


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
  """Token ids of the chat template for `messages`, ready for the assistant's answer (starting with
  the tokenizer's BOS: LLaDA's <|startoftext|>, Llama 3's <|begin_of_text|>, none if -1)."""
  bos = tokenizer.token_text(tokenizer.special["bos_id"])
  return tokenizer.encode(render_chat(messages, bos=bos))


def seqio_vocabulary(path: str | pathlib.Path, ids: Mapping[str, int] | None = None):
  """A seqio.Vocabulary over a tokenizer.json (HFTokenizer(path, ids)), for SeqIO tasks (pad =
  EOS, as LLaDA pads)."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tokenizer = HFTokenizer(path, ids)

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
