"""The shipped SentencePiece vocabulary: byte-exact round trips, seqio ids, compression."""

from __future__ import annotations

import pytest
import tensorflow as tf

from llada_jax.data.corpora import split_text
from llada_jax.data.spm_vocab import SPM8K_PATH, SPM8K_SIZE, spm_vocabulary
from llada_jax.data.train_spm import train_sentencepiece
from llada_jax.errors import ConfigError

_SHAKESPEARE, _GUTENBERG = (split_text(name)["train"] for name in ("tinyshakespeare", "gutenberg"))


def _around(text: str, marker: str, before: int, after: int) -> str:
  index = text.index(marker)
  return text[index - before : index + after]


PASSAGES = [
    _SHAKESPEARE[:700],
    split_text("tinyshakespeare")["validation"][:900],
    _GUTENBERG[:800],
    _around(_GUTENBERG, "\n\n\n\nALICE’S ADVENTURES", 300, 400),
    _around(_GUTENBERG, "\n                          * * * * *\n", 200, 300),
]
ODD_TEXTS = [
    "",
    " ",
    "\n",
    "\n\n\n",
    "  two leading spaces",
    "trailing spaces  \n",
    "a\tb\t\tc\r\n",
    "café, naïve, Ελληνικά, 日本語",
    "emoji 😀👍🏽 and \x00\x7f control bytes",
    "x  y   z",
    "3.14159, 2025",
]


@pytest.fixture(scope="module")
def vocab():
  return spm_vocabulary()


@pytest.mark.parametrize("text", PASSAGES + ODD_TEXTS)
def test_round_trip_is_byte_exact(vocab, text):
  ids = list(vocab.encode(text))
  assert vocab.decode(ids) == text
  tf_ids = vocab.encode_tf(tf.constant(text)).numpy().tolist()
  assert tf_ids == ids
  assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode("utf-8") == text


def test_newlines_are_kept_in_pieces(vocab):
  pieces = vocab.tokenizer.encode("Speak, speak.\n\nAll:\nResolved.", out_type=str)
  assert "".join(pieces).replace("▁", " ") == "Speak, speak.\n\nAll:\nResolved."
  assert ".\n\n" in pieces and ":\n" in pieces


def test_unknown_characters_fall_back_to_bytes(vocab):
  ids = vocab.encode("😀")
  assert len(ids) == 4 and all(vocab.tokenizer.is_byte(i) for i in ids)
  assert vocab.unk_id not in vocab.encode("".join(ODD_TEXTS))


def test_special_ids_follow_seqio(vocab):
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.tokenizer.bos_id() == -1
  assert vocab.vocab_size == SPM8K_SIZE == 8000


def test_compression_on_validation_tails(vocab):
  # Measured with the shipped model: 3.194 (tinyshakespeare) and 3.772 (gutenberg) bytes/token.
  for name, bound in (("tinyshakespeare", 3.1), ("gutenberg", 3.7)):
    tail = split_text(name)["validation"]
    assert len(tail.encode("utf-8")) / len(vocab.encode(tail)) > bound


def test_missing_model_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="names no SentencePiece model"):
    spm_vocabulary(tmp_path / "missing.model")


@pytest.mark.slow
def test_training_reproduces_the_shipped_model(tmp_path):
  path = train_sentencepiece(str(tmp_path / "spm"))
  assert path == tmp_path / "spm.model"
  assert path.read_bytes() == SPM8K_PATH.read_bytes()
