"""The LLaDA tokenizer (tokenizer.json), the chat template, and `llada-chat` over a tiny model."""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import make_tiny_config
from hf_fixtures import hf_tensors, write_folder
from llada_jax.data.corpora import split_text
from llada_jax.data.hf_tokenizer import (SPECIAL_TOKENS, ChatMessage, HFTokenizer,
                                         chat_prompt_ids, render_chat)
from llada_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> pathlib.Path:
  """A tiny HF folder: BPE tokenizer trained on the bundled corpus, random model weights."""
  import tokenizers

  folder = tmp_path_factory.mktemp("llada")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=list(SPECIAL_TOKENS.values()),
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator([split_text("tinyshakespeare")["train"][:200_000]], trainer)
  tokenizer.save(str(folder / "tokenizer.json"))
  loaded = HFTokenizer(folder)
  config = make_tiny_config()
  config.model.update(dict(vocab_size=416, max_sequence_length=128))
  config.tokens.update(dict(mask_id=loaded.special["mask_id"], eos_id=loaded.special["eos_id"],
                            pad_id=loaded.special["eos_id"]))
  write_folder(folder, config, hf_tensors(config))
  return folder


def test_special_tokens_and_round_trip(hf_folder):
  tokenizer = HFTokenizer(hf_folder)
  assert set(tokenizer.special) == set(SPECIAL_TOKENS)
  assert len(set(tokenizer.special.values())) == len(SPECIAL_TOKENS)
  text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text and len(ids) < len(text)
  assert tokenizer.encode("<|eot_id|>") == [tokenizer.special["eot_id"]]


def test_chat_template_is_the_llama3_layout(hf_folder):
  messages = [ChatMessage("user", " Hi there "), ChatMessage("assistant", "Hello."),
              ChatMessage("user", "Who are you?")]
  assert render_chat(messages) == (
      "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n")
  tokenizer = HFTokenizer(hf_folder)
  ids = chat_prompt_ids(tokenizer, messages[:1])
  special = tokenizer.special
  assert ids[0] == special["bos_id"] and ids[1] == special["header_start_id"]
  assert ids.count(special["eot_id"]) == 1 and ids.count(special["header_end_id"]) == 2


def test_config_ids_must_match_the_tokenizer(hf_folder):
  tokenizer = HFTokenizer(hf_folder)
  config = make_tiny_config()
  with pytest.raises(ConfigError, match="tokens.mask_id=259"):
    tokenizer.check_config(config)


def test_chat_answers_a_scripted_two_turn_conversation(hf_folder):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "llada_jax.chat", f"--checkpoint={hf_folder}", "--gen_length=16",
       "--steps=16", "--block_length=8"],
      input="Hello there\nHow are you?\n", cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  replies = [line for line in result.stdout.splitlines() if line.startswith("assistant:")]
  assert len(replies) == 2


def test_seqio_vocabulary_over_tokenizer_json(hf_folder):
  import tensorflow as tf

  from llada_jax.data.vocab import get_vocabulary

  config = make_tiny_config()
  config.data.vocabulary = "llada_hf"
  with pytest.raises(ConfigError, match="needs the path of the model.s tokenizer.json"):
    get_vocabulary(config)
  config.data.tokenizer = str(hf_folder / "tokenizer.json")
  special = HFTokenizer(config.data.tokenizer).special
  config.tokens.mask_id, config.tokens.eos_id = special["mask_id"], special["eos_id"]
  config.model.vocab_size = 400
  vocab = get_vocabulary(config)
  text = "KING RICHARD III:\nNow is the winter"
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text
  assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
  assert vocab.eos_id == vocab.pad_id == HFTokenizer(hf_folder).special["eos_id"]


def test_sample_text_prompts_through_the_hf_tokenizer(hf_folder):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "llada_jax.sample", f"--checkpoint={hf_folder}", "--prompt=ROMEO:",
       "--gen_length=8", "--steps=8", "--block_length=8"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "=== prompt: 'ROMEO:'" in result.stdout
