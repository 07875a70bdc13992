"""Text codecs without seqio, against the seqio vocabularies the training pipeline uses."""

import pytest

from conftest import make_tiny_config
from llada_jax.data.codec import ByteCodec, chat_prompt, text_codec
from llada_jax.data.hf_tokenizer import ChatMessage
from llada_jax.data.vocab import vocabulary_by_name

TEXTS = ["ROMEO:\nBut, soft! what light", "naïve café — 東京 🙂", "", "  spaces  \t\n"]


@pytest.mark.parametrize("vocabulary", ["byte", "spm8k"])
def test_codec_ids_and_text_equal_seqios(vocabulary):
  config = make_tiny_config()
  config.data.vocabulary = vocabulary
  if vocabulary == "spm8k":
    config.model.vocab_size, config.tokens.mask_id = 8001, 8000
  codec, seqio_vocab = text_codec(config), vocabulary_by_name(vocabulary)
  for text in TEXTS:
    ids = codec.encode(text)
    assert ids == list(seqio_vocab.encode(text))
    assert codec.decode(ids) == seqio_vocab.decode(ids) == text
  noisy = codec.encode("ab") + [0, 1, config.tokens.mask_id] + codec.encode("cd")  # pad, EOS
  assert codec.decode(noisy) == "abcd"


def test_plain_chat_transcript_for_vocabularies_without_a_template():
  ids, stops = chat_prompt(
      ByteCodec(),
      [
          ChatMessage("user", " Hi "),
          ChatMessage("assistant", "Hello."),
          ChatMessage("user", "Who?"),
      ],
  )
  assert ByteCodec().decode(ids) == "User: Hi\nAssistant: Hello.\nUser: Who?\nAssistant:"
  assert stops == ("\nUser:",)
