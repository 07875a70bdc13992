"""The tokenizer of a converted Llama/Mistral folder (vocabulary "hf"): it travels with the workdir,
its special ids are the config's, the appended mask row decodes to nothing, Llama 3's chat tokens
give the chat template, and bad tokenizers give one-line errors."""

import json
import shutil

import numpy as np
import pytest

from llada_jax.data.codec import chat_prompt, has_chat_template, text_codec
from llada_jax.data.hf_tokenizer import ChatMessage
from llada_jax.errors import CheckpointError, ConfigError
from llada_jax.interop.llama import read_llama_config
from test_llama_import import (
    VOCAB,
    llama_config_json,
    llama_tensors,
    write_llama,
    write_tokenizer,
)

TEXT = "the cat sat on the mat"


def llama_folder(path, chat: bool = True, **changes):
  """A tiny Llama folder with its tokenizer.json (bos <s> = 1, eos </s> = 2, as config.json)."""
  folder = write_llama(path, llama_config_json(False, **changes), llama_tensors(False))
  write_tokenizer(folder, chat=chat)
  return folder


def test_converted_workdir_keeps_and_uses_the_tokenizer(tmp_path):
  from llada_jax.interop.workdir import from_hf  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling.text import sample  # pylint: disable=g-import-not-at-top

  folder = llama_folder(tmp_path / "llama")
  workdir = tmp_path / "work"
  from_hf(str(folder), str(workdir), "float32")
  shutil.rmtree(folder)  # the workdir decodes on its own
  assert (workdir / "tokenizer.json").is_file()
  config, params = load_model(str(workdir))
  assert (config.data.vocabulary, config.tokens.mask_id) == ("hf", VOCAB)
  # The stored config has Llama 3's <|eot_id|> as its end of turn (chat, EoT ending).
  assert (config.tokens.bos_id, config.tokens.eos_id, config.tokens.eot_id) == (1, 2, 5)
  codec = text_codec(config)
  assert (codec.special["bos_id"], codec.special["eos_id"], codec.special["eot_id"]) == (1, 2, 5)
  ids = codec.encode(TEXT)
  assert ids and max(ids) < codec.vocab_size < VOCAB
  # The appended mask row, the embedding's rows beyond the tokenizer and -1 decode to nothing.
  assert codec.decode([VOCAB, -1] + ids + [VOCAB, VOCAB - 1]) == TEXT
  assert has_chat_template(codec)
  prompt, stops = chat_prompt(codec, [ChatMessage("user", "who are you?")])
  assert prompt[:2] == [1, 3] and prompt.count(5) == 1 and stops == ()
  out = sample(config, params, texts=[TEXT], steps=4, gen_length=4, block_length=4)
  assert out["prompt"] == [TEXT] and isinstance(out["text"][0], str)
  assert all(0 <= i < VOCAB + 1 for i in out["tokens"][0])


def test_hf_folder_loads_with_its_tokenizer_and_without_chat_tokens(tmp_path):
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top

  folder = llama_folder(tmp_path / "mistral", chat=False, model_type="mistral")
  config, _ = load_model(str(folder))
  assert config.data.vocabulary == "hf" and config.tokens.eot_id == -1
  codec = text_codec(config)
  assert codec.decode(codec.encode(TEXT)) == TEXT and not has_chat_template(codec)
  assert chat_prompt(codec, [ChatMessage("user", "hi")])[1] == ("\nUser:",)
  # A folder without tokenizer.json: vocabulary "hf" all the same, --tokenizer gives it one.
  bare = write_llama(tmp_path / "bare", llama_config_json(False), llama_tensors(False))
  config, _ = load_model(str(bare))
  assert (config.data.vocabulary, config.data.tokenizer) == ("hf", "")
  with pytest.raises(ConfigError, match="data.vocabulary='hf' needs the model's tokenizer.json"):
    text_codec(config)
  config, _ = load_model(str(bare), tokenizer=str(folder / "tokenizer.json"))
  assert config.data.vocabulary == "hf"
  assert text_codec(config).decode(text_codec(config).encode(TEXT)) == TEXT


def test_special_ids_come_from_the_first_file_that_names_them(tmp_path):
  folder = llama_folder(tmp_path / "a")
  hf = json.loads((folder / "config.json").read_text())
  del hf["bos_token_id"], hf["eos_token_id"]
  (folder / "config.json").write_text(json.dumps(hf))
  (folder / "tokenizer_config.json").write_text(
      json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
  )
  config = read_llama_config(folder)
  assert (config.tokens.bos_id, config.tokens.eos_id) == (1, 2)
  # A tokenizer_config.json naming another EOS than config.json's changes it, not the import.
  (folder / "tokenizer_config.json").write_text(
      json.dumps({"bos_token": {"content": "<|eot_id|>"}, "eos_token": "<|eot_id|>"})
  )
  config = read_llama_config(folder)
  assert (config.tokens.bos_id, config.tokens.eos_id, config.tokens.eot_id) == (5, 5, 5)
  (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
  config = read_llama_config(folder)  # generation_config.json comes before tokenizer_config.json
  assert (config.tokens.bos_id, config.tokens.eos_id) == (5, 2)
  (folder / "config.json").write_text(json.dumps(dict(hf, eos_token_id=1)))
  with pytest.raises(CheckpointError) as info:
    read_llama_config(folder)
  message = str(info.value)
  assert "generation_config.json names eos_token_id=[2, 4] but the model's is 1" in message
  assert "\n" not in message


def _one_line(error_type, function, *args) -> str:
  with pytest.raises(error_type) as info:
    function(*args)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def test_bad_tokenizers_give_one_line_errors(tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top

  big = llama_folder(tmp_path / "big")
  tokenizer = tokenizers.Tokenizer.from_file(str(big / "tokenizer.json"))
  tokenizer.add_tokens([f"extra{i}" for i in range(VOCAB)])
  tokenizer.save(str(big / "tokenizer.json"))
  size = tokenizer.get_vocab_size()
  message = _one_line(CheckpointError, read_llama_config, big)
  assert f"has {size} tokens, more than {big / 'config.json'}'s vocab_size={VOCAB}" in message

  broken = llama_folder(tmp_path / "broken")
  (broken / "tokenizer.json").write_text("{not json")
  message = _one_line(CheckpointError, read_llama_config, broken)
  assert message.startswith(f"cannot read tokenizer {broken / 'tokenizer.json'}: ")
  assert message.endswith("(expected a HuggingFace tokenizer.json)")

  folder = llama_folder(tmp_path / "ok")
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
  assert "eos_token='<|im_end|>' is not a token of tokenizer.json" in _one_line(
      CheckpointError, read_llama_config, folder
  )
  (folder / "tokenizer_config.json").unlink()

  config = read_llama_config(folder)
  config.tokens.eos_id = 90  # a row of the embedding the tokenizer does not have
  assert "tokens.eos_id=90 is not allowed: expected an id of the tokenizer's 80 tokens" in (
      _one_line(ConfigError, text_codec, config)
  )
  config = read_llama_config(folder)
  config.model.vocab_size, config.tokens.mask_id = 60, 59
  assert "model.vocab_size=60 is not allowed: the tokenizer has 80 tokens" in _one_line(
      ConfigError, text_codec, config
  )
  config = read_llama_config(folder)
  config.data.tokenizer = str(tmp_path / "missing.json")
  assert "data.vocabulary='hf' needs the model's tokenizer.json" in _one_line(
      ConfigError, text_codec, config
  )


def test_an_existing_mask_token_is_kept_and_decodes_as_a_special_token(tmp_path):
  """--mask_id=<an existing id>: no row is appended; the tokenizer's special token decodes to
  nothing (skip_special_tokens)."""
  config = read_llama_config(llama_folder(tmp_path / "llama"), mask_id=0)  # <unk>
  assert (config.model.vocab_size, config.tokens.mask_id) == (VOCAB, 0)
  codec = text_codec(config)
  assert codec.special["mask_id"] == 0
  assert codec.decode([0] + codec.encode(TEXT) + [0]) == TEXT
  assert np.array_equal(
      codec.encode(TEXT), text_codec(read_llama_config(tmp_path / "llama")).encode(TEXT)
  )


def test_a_converted_workdir_exported_to_hf_keeps_its_tokenizer(tmp_path):
  """to-hf of an "hf"-vocabulary workdir (the causal model: a Llama folder again) writes
  tokenizer.json, and the export reads back with it and the same special ids (config.json's and
  the tokenizer's <|eot_id|>: no LLaDA token is looked up)."""
  from llada_jax.interop.workdir import from_hf, to_hf  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "work"
  from_hf(str(llama_folder(tmp_path / "llama")), str(workdir), "float32")
  to_hf(str(workdir), str(tmp_path / "export"), "float32", "5GB")
  assert (tmp_path / "export" / "tokenizer.json").is_file()
  config = read_llama_config(tmp_path / "export")
  assert config.data.vocabulary == "hf" and config.data.tokenizer.endswith("tokenizer.json")
  assert config.tokens.to_dict() == read_llama_config(tmp_path / "llama").tokens.to_dict()
  assert text_codec(config).decode(text_codec(config).encode(TEXT)) == TEXT
