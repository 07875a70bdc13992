"""The LLaDA tokenizer (tokenizer.json), the chat template, and `llada-chat` over a tiny model."""

import pathlib
import subprocess
import sys

import pytest

from conftest import cli_env, make_tiny_config
from hf_fixtures import hf_tensors, write_folder
from llada_jax.data.corpora import split_text
from llada_jax.data.hf_tokenizer import (
    SPECIAL_TOKENS,
    ChatMessage,
    HFTokenizer,
    chat_prompt_ids,
    render_chat,
)
from llada_jax.errors import CheckpointError, ConfigError

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
      vocab_size=400,
      special_tokens=list(SPECIAL_TOKENS.values()),
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tokenizer.train_from_iterator([split_text("tinyshakespeare")["train"][:200_000]], trainer)
  tokenizer.save(str(folder / "tokenizer.json"))
  loaded = HFTokenizer(folder)
  config = make_tiny_config()
  config.model.update(dict(vocab_size=416, max_sequence_length=128))
  config.tokens.update(
      dict(
          mask_id=loaded.special["mask_id"],
          eos_id=loaded.special["eos_id"],
          pad_id=loaded.special["eos_id"],
      )
  )
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
  messages = [
      ChatMessage("user", " Hi there "),
      ChatMessage("assistant", "Hello."),
      ChatMessage("user", "Who are you?"),
  ]
  assert render_chat(messages) == (
      "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n"
  )
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
  env = cli_env()
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "llada_jax.chat",
          f"--checkpoint={hf_folder}",
          "--gen_length=16",
          "--steps=16",
          "--block_length=8",
      ],
      input="Hello there\nHow are you?\n",
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  replies = [line for line in result.stdout.splitlines() if line.startswith("assistant:")]
  assert len(replies) == 2


def test_the_second_turn_prompt_holds_the_first_question_and_answer(hf_folder, monkeypatch):
  """`llada-chat` over two scripted turns with the reverse process replaced by a fixed answer: the
  second prompt, decoded by the `tokenizers` library itself, is the whole conversation in the
  LLaDA-Instruct (Llama 3) layout written out here, first question and first answer included."""
  import io  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  from llada_jax import chat  # pylint: disable=g-import-not-at-top
  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top

  tokenizer = tokenizers.Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
  eot, eos = tokenizer.token_to_id("<|eot_id|>"), tokenizer.token_to_id("<|endoftext|>")
  answers = ["I am a tiny model.", "Still tiny."]
  prompts = []

  def fake_generate(model, params, prompt, *args, **kwargs):  # -> prompt + answer
    del model, params, args, kwargs
    prompt = np.asarray(prompt)
    prompts.append(prompt[0].tolist())
    answer = tokenizer.encode(answers[len(prompts) - 1], add_special_tokens=False).ids + [eot]
    assert len(answer) <= 16  # --gen_length
    answer += [eos] * (16 - len(answer))
    return np.concatenate([prompt, np.asarray([answer], prompt.dtype)], axis=1)

  monkeypatch.setattr(MaskedDiffusionLM, "generate", fake_generate)  # chat samples through it
  monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nHow are you?\n"))
  flags.FLAGS(
      [
          "llada-chat",
          f"--checkpoint={hf_folder}",
          "--gen_length=16",
          "--steps=16",
          "--block_length=8",
      ]
  )
  try:
    chat._chat([])  # pylint: disable=protected-access
  finally:
    flags.FLAGS.unparse_flags()
  assert len(prompts) == 2
  header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
  first = f"<|startoftext|>{header('user')}Hello there<|eot_id|>{header('assistant')}"
  assert tokenizer.decode(prompts[0], skip_special_tokens=False) == first
  assert tokenizer.decode(prompts[1], skip_special_tokens=False) == (
      f"{first}I am a tiny model.<|eot_id|>{header('user')}How are you?<|eot_id|>"
      f"{header('assistant')}"
  )


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
  env = cli_env()
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "llada_jax.sample",
          f"--checkpoint={hf_folder}",
          "--prompt=ROMEO:",
          "--gen_length=8",
          "--steps=8",
          "--block_length=8",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "=== prompt: 'ROMEO:'" in result.stdout


def test_import_takes_the_end_of_turn_id_from_the_tokenizer(hf_folder, tmp_path):
  """The official config.json names no EoT; the folder's tokenizer.json does (once it was lost,
  so chat and GSM8K kept the text after the end of turn)."""
  import json  # pylint: disable=g-import-not-at-top

  from llada_jax.interop.hf_checkpoint import read_hf_config  # pylint: disable=g-import-not-at-top

  special = HFTokenizer(hf_folder).special
  config = read_hf_config(hf_folder)
  assert (config.tokens.eot_id, config.tokens.bos_id) == (special["eot_id"], special["bos_id"])
  assert (config.tokens.mask_id, config.tokens.eos_id) == (special["mask_id"], special["eos_id"])
  bad = tmp_path / "bad"
  bad.mkdir()
  hf = json.loads((hf_folder / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps(dict(hf, mask_token_id=special["mask_id"] + 1)))
  (bad / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
  with pytest.raises(CheckpointError, match="mask_token_id=.* tokenizer.json has"):
    read_hf_config(bad)


def test_a_stored_config_without_end_of_turn_gets_the_tokenizers(hf_folder):
  """Workdirs converted before the fix hold eot_id = -1: the codec fills it from the tokenizer."""
  from llada_jax.data.codec import text_codec  # pylint: disable=g-import-not-at-top
  from llada_jax.interop.hf_checkpoint import read_hf_config  # pylint: disable=g-import-not-at-top

  config = read_hf_config(hf_folder)
  config.tokens.eot_id = -1
  text_codec(config)
  assert config.tokens.eot_id == HFTokenizer(hf_folder).special["eot_id"]


@pytest.mark.parametrize("vocabulary", ["byte", "spm8k", "llada_hf"])
def test_hf_export_keeps_the_vocabulary(hf_folder, tmp_path, vocabulary):
  """to-hf then from-hf gives back the vocabulary (and tokenizer.json for llada_hf): once a byte
  model came back labelled llada_hf with no tokenizer."""
  import jax  # pylint: disable=g-import-not-at-top

  from llada_jax.data.codec import text_codec  # pylint: disable=g-import-not-at-top
  from llada_jax.interop.hf_checkpoint import (  # pylint: disable=g-import-not-at-top
      load_hf,
      read_hf_config,
      save_hf,
  )

  if vocabulary == "llada_hf":
    config, params = load_hf(hf_folder)
  else:
    config = make_tiny_config()
    config.data.vocabulary = vocabulary
    if vocabulary == "spm8k":
      config.model.vocab_size, config.tokens.mask_id = 8001, 8000
    from llada_jax.model import ModelConfig, Transformer  # pylint: disable=g-import-not-at-top
    import flax.linen as nn  # pylint: disable=g-import-not-at-top

    params = nn.meta.unbox(
        Transformer(ModelConfig.from_config(config)).init(
            jax.random.PRNGKey(0), jax.numpy.zeros((1, 4), jax.numpy.int32)
        )
    )["params"]
  save_hf(config, params, tmp_path / "out", dtype="float32")
  back = read_hf_config(tmp_path / "out")
  assert back.data.vocabulary == vocabulary
  assert (tmp_path / "out" / "tokenizer.json").is_file() == (vocabulary == "llada_hf")
  assert back.tokens.to_dict() == config.tokens.to_dict()
  text = "ROMEO: but soft"
  assert text_codec(back).decode(text_codec(back).encode(text)) == text
