"""Pre-tokenized shards: write_shards, the manifest, the seqio source that reads them, the CLI."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import seqio
import tensorflow as tf

from llada_jax.data.corpora import corpus_path
from llada_jax.data.pretokenized import (
    VocabularySpec,
    check_vocabulary,
    densify,
    pretokenized_source,
    read_manifest,
    shard_name,
    write_shards,
)
from llada_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
BYTE = VocabularySpec("byte")
NUM_SHARDS = 4


def _paragraphs(text: str) -> list[str]:
  """Reference split: each paragraph with all of its trailing newlines."""
  return re.split(r"(?<=\n\n)(?=[^\n])", text)


def _decode(ids: np.ndarray) -> str:
  return bytes((ids - 3).astype(np.uint8).tolist()).decode("utf-8")


def _read_shard(directory: str, index: int, num_shards: int) -> list[np.ndarray]:
  """The documents of one shard, read through the seqio source the way one of num_shards hosts
  would read them."""
  ds = pretokenized_source(directory).get_dataset(
      "train", shuffle=False, shard_info=seqio.ShardInfo(index, num_shards)
  )
  return [ex["targets"] for ex in densify(ds).as_numpy_iterator()]


def _read_all(directory: str, num_shards: int) -> list[np.ndarray]:
  """Every document in its original order (shards hold documents round-robin)."""
  shards = [_read_shard(directory, i, num_shards) for i in range(num_shards)]
  total = sum(len(s) for s in shards)
  return [shards[i % num_shards][i // num_shards] for i in range(total)]


def _files(directory: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> tuple[pathlib.Path, dict]:
  out = tmp_path_factory.mktemp("shakespeare")
  manifest = write_shards(
      [str(corpus_path("tinyshakespeare"))], str(out), BYTE, num_shards=NUM_SHARDS, num_workers=2
  )
  return out, manifest


def test_shards_read_back_as_the_tokenized_paragraphs(shakespeare):
  out, manifest = shakespeare
  text = corpus_path("tinyshakespeare").read_text(encoding="utf-8")
  expected = _paragraphs(text)
  docs = _read_all(str(out), NUM_SHARDS)
  assert all(d.dtype == np.int32 for d in docs)
  assert [_decode(d) for d in docs] == expected
  assert "".join(_decode(d) for d in docs) == text
  assert manifest == read_manifest(str(out))
  assert manifest["documents"] == len(expected)
  assert manifest["tokens"] == sum(len(d) for d in docs) == len(text.encode("utf-8"))
  for i, entry in enumerate(manifest["files"]):
    assert entry["path"] == f"data-{i:05d}-of-{NUM_SHARDS:05d}.tfrecord"
    assert entry["documents"] == len(docs[i::NUM_SHARDS])
    assert entry["tokens"] == sum(len(d) for d in docs[i::NUM_SHARDS])
  assert manifest["vocabulary"] == "byte" and manifest["vocab_size"] == 259
  assert manifest["skipped"] == {"empty": 0, "undecodable": 0, "missing_field": 0}
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [e[k] for e in manifest["files"] for k in ("path", "index")] + ["manifest.json"]
  )


def test_source_feeds_a_seqio_task(shakespeare):
  out, manifest = shakespeare
  name = "test_preprocess_pretokenized"
  task = seqio.TaskRegistry.add(
      name,
      source=pretokenized_source({"train": str(out), "validation": str(out)}),
      preprocessors=[densify],
      output_features={
          "targets": seqio.Feature(seqio.ByteVocabulary(), add_eos=False, dtype=tf.int32)
      },
  )
  try:
    assert task.num_input_examples("validation") == manifest["documents"]
    ds = task.get_dataset(sequence_length=None, split="validation", shuffle=False)
    assert sum(1 for _ in ds.as_numpy_iterator()) == manifest["documents"]
  finally:
    seqio.TaskRegistry.remove(name)


def test_shards_do_not_depend_on_the_number_of_workers(shakespeare, tmp_path):
  out, _ = shakespeare
  write_shards(
      [str(corpus_path("tinyshakespeare"))],
      str(tmp_path),
      BYTE,
      num_shards=NUM_SHARDS,
      num_workers=1,
  )
  assert _files(tmp_path) == _files(out)


def test_jsonl_field_and_documents_across_files(tmp_path):
  jsonl = tmp_path / "a.jsonl"
  records = [
      {"body": "héllo\n", "id": 1},
      {"body": ""},
      None,
      {"body": "line\u2028sep"},
      {"body": "  \n"},
      {"body": "world", "text": "not this"},
  ]
  jsonl.write_text(
      "".join("\n" if r is None else json.dumps(r, ensure_ascii=False) + "\n" for r in records),
      encoding="utf-8",
  )
  txt = tmp_path / "b.txt"
  txt.write_text("one\n\ntwo\n", encoding="utf-8")
  out = tmp_path / "out"
  manifest = write_shards(
      [str(jsonl), str(txt)], str(out), BYTE, num_shards=3, text_field="body", num_workers=1
  )
  docs = [_decode(d) for d in _read_all(str(out), 3)]
  assert docs == ["héllo\n", "line\u2028sep", "world", "one\n\n", "two\n"]
  assert manifest["skipped"] == {"empty": 3, "undecodable": 0, "missing_field": 0}
  assert manifest["documents"] == 5 and [f["documents"] for f in manifest["files"]] == [2, 2, 1]
  assert manifest["sources"] == [str(jsonl), str(txt)]


def _write(path: pathlib.Path, data: bytes) -> str:
  path.write_bytes(data)
  return str(path)


BAD_TEXT = b"first para\n\nsecond \xff para\n\nthird\n"


@pytest.mark.parametrize(
    "name,data,message",
    [
        ("nope.txt", None, "input file {path} does not exist"),
        ("empty.txt", b"", "{path} holds no documents"),
        ("blank.txt", b"\n\n \n\n", "{path} holds no documents"),
        ("bad.txt", BAD_TEXT, "{path}: undecodable byte at offset 19 (expected UTF-8 text)"),
        ("notjson.jsonl", b'{"text": "a"}\n{"text": \n', "{path}:2: not a JSON object"),
        ("nofield.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', "{path}:3: no string field 'text'"),
        ("number.jsonl", b'{"text": 5}\n', "{path}:1: no string field 'text'"),
        ("notobject.jsonl", b'["text"]\n', "{path}:1: no string field 'text'"),
        (
            "bad.jsonl",
            b'{"text": "a"}\n{"text": "\xc3"}\n',
            "{path}:2: undecodable byte at offset 24 (expected UTF-8 text)",
        ),
        ("corpus.csv", b"a,b\n", "input {path} is not allowed"),
    ],
)
def test_bad_input_is_a_config_error_naming_the_place(tmp_path, name, data, message):
  path = str(tmp_path / name) if data is None else _write(tmp_path / name, data)
  out = tmp_path / "out"
  with pytest.raises(ConfigError, match=re.escape(message.format(path=path))):
    write_shards([path], str(out), BYTE, num_shards=2, num_workers=1)
  assert not out.exists() or not list(out.iterdir())  # no shard or temporary file is left


def test_bad_input_after_good_documents_stops_the_workers_and_cleans_up(tmp_path):
  bad = _write(tmp_path / "bad.jsonl", b'{"text": "a"}\n{"text": \n')
  out = tmp_path / "out"
  with pytest.raises(ConfigError, match=re.escape(f"{bad}:2: not a JSON object")):
    write_shards(
        [str(corpus_path("tinyshakespeare")), bad], str(out), BYTE, num_shards=2, num_workers=2
    )
  assert not list(out.iterdir())


def test_skip_counts_bad_documents(tmp_path):
  text = _write(tmp_path / "bad.txt", BAD_TEXT)
  jsonl = _write(
      tmp_path / "bad.jsonl",
      b'{"text": "a"}\nnot json\n{"body": "b"}\n{"text": "\xff"}\n{"text": ""}\n',
  )
  manifest = write_shards(
      [text, jsonl], str(tmp_path / "out"), BYTE, num_shards=2, num_workers=1, errors="skip"
  )
  docs = [_decode(d) for d in _read_all(str(tmp_path / "out"), 2)]
  assert docs == ["first para\n\n", "third\n", "a"]
  assert manifest["skipped"] == {"empty": 1, "undecodable": 3, "missing_field": 1}


def test_manifest_and_vocabulary_checks(shakespeare, tmp_path):
  out, manifest = shakespeare
  check_vocabulary(manifest, "byte", 259)
  with pytest.raises(ConfigError, match="tokenized with 'byte'"):
    check_vocabulary(manifest, "llada_hf", 126464)
  with pytest.raises(ConfigError, match="holds no manifest.json"):
    read_manifest(str(tmp_path))
  (tmp_path / "manifest.json").write_text("{", encoding="utf-8")
  with pytest.raises(ConfigError, match="is not valid JSON"):
    read_manifest(str(tmp_path))
  (tmp_path / "manifest.json").write_text('{"format": "v0"}', encoding="utf-8")
  with pytest.raises(ConfigError, match="has format 'v0'"):
    read_manifest(str(tmp_path))
  (tmp_path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
  with pytest.raises(ConfigError, match="lacks shards listed"):
    pretokenized_source(str(tmp_path))
  with pytest.raises(ConfigError, match="needs the path of the model.s tokenizer.json"):
    VocabularySpec("llada_hf", str(tmp_path / "tokenizer.json")).build()


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run(
      [sys.executable, "-m", "llada_jax.preprocess", *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )


def test_cli_missing_input_is_one_line_error(tmp_path):
  result = _cli(f"--input={tmp_path / 'nope.txt'}", f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: input file {tmp_path / 'nope.txt'} does not exist"]


def _tokenizer_json(folder: pathlib.Path, text: str) -> str:
  """A tiny byte-level BPE tokenizer.json with LLaDA's special tokens."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  from llada_jax.data.hf_tokenizer import SPECIAL_TOKENS  # pylint: disable=g-import-not-at-top

  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  tokenizer.train_from_iterator(
      [text],
      tokenizers.trainers.BpeTrainer(
          vocab_size=300,
          special_tokens=list(SPECIAL_TOKENS.values()),
          initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      ),
  )
  tokenizer.save(str(folder / "tokenizer.json"))
  return str(folder / "tokenizer.json")


@pytest.mark.slow  # test_shards_do_not_depend_on_the_number_of_workers runs in make test
def test_cli_tokenizes_with_a_tokenizer_json_in_workers(tmp_path):
  text = "".join(f"paragraph {i}: ROMEO and JULIET.\n\n" for i in range(50))
  (tmp_path / "in.txt").write_text(text, encoding="utf-8")
  tokenizer = _tokenizer_json(tmp_path, text)
  out = tmp_path / "out"
  result = _cli(
      f"--input={tmp_path / 'in.txt'}",
      f"--output_dir={out}",
      f"--vocabulary={tokenizer}",
      "--num_shards=2",
      "--num_workers=2",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  manifest = read_manifest(str(out))
  assert f"wrote 2 shards to {out}: 50 documents, {manifest['tokens']:,} tokens (llada_hf)" in (
      result.stdout
  )
  assert (manifest["vocabulary"], manifest["tokenizer"]) == ("llada_hf", tokenizer)
  vocabulary = VocabularySpec("llada_hf", tokenizer).build()
  assert manifest["vocab_size"] == vocabulary.vocab_size
  docs = _read_all(str(out), 2)
  assert [vocabulary.decode(d.tolist()) for d in docs] == _paragraphs(text)


def test_cli_tokenizes_with_a_llama_tokenizer_json_and_its_folders_special_ids(tmp_path):
  """Any model's tokenizer.json works, not only LLaDA's: a Llama folder's tokenizer (no
  <|endoftext|>, no <|mdm_mask|>) gives vocabulary "hf" (what train.init_from of that folder
  trains with), its BOS/EOS read from the folder's config.json, as the import reads them."""
  # pylint: disable-next=g-import-not-at-top
  from test_llama_import import SENTENCES, llama_config_json, write_tokenizer

  folder = tmp_path / "llama"
  tokenizer = str(write_tokenizer(folder))
  (folder / "config.json").write_text(json.dumps(llama_config_json(False)), encoding="utf-8")
  text = "".join(f"{sentence}\n\n" for sentence in SENTENCES * 2)
  (tmp_path / "in.txt").write_text(text, encoding="utf-8")
  out = tmp_path / "out"
  result = _cli(
      f"--input={tmp_path / 'in.txt'}",
      f"--output_dir={out}",
      f"--vocabulary={tokenizer}",
      "--num_shards=2",
      "--num_workers=1",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  manifest = read_manifest(str(out))
  assert (manifest["vocabulary"], manifest["tokenizer"]) == ("hf", tokenizer)
  assert manifest["special_ids"] == {"bos_id": 1, "eos_id": 2, "mask_id": -1}
  vocabulary = VocabularySpec("hf", tokenizer, (("bos_id", 1), ("eos_id", 2), ("mask_id", -1)))
  vocabulary = vocabulary.build()
  check_vocabulary(manifest, "hf", vocabulary.vocab_size)  # what a config of that folder has
  docs = _read_all(str(out), 2)
  assert [vocabulary.decode(d.tolist()) for d in docs] == SENTENCES * 2  # Metaspace: no "\n"


def test_fewer_documents_than_shards_is_refused_naming_the_empty_shard(tmp_path):
  """An empty shard would give its training host no batch: refused at preprocessing, in one line
  naming the shard and why, and no file is left."""
  path = _write(tmp_path / "three.txt", b"one\n\ntwo\n\nthree\n")
  out = tmp_path / "out"
  message = (
      f"shard {out / shard_name(3, 4)} would hold no document: the inputs hold 3 documents "
      "for num_shards=4 (documents go to shards round-robin); expected num_shards <= 3"
  )
  with pytest.raises(ConfigError, match=re.escape(message)):
    write_shards([path], str(out), BYTE, num_shards=4, num_workers=1)
  assert not list(out.iterdir())
