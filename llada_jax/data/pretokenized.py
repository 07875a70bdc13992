"""Pre-tokenized corpora: TFRecord shards of token ids plus a manifest, and a seqio source for them.

The production input path for corpora too large to tokenize on every training host: tokenize once
(`llada-preprocess`), then every host reads its share of the shards. Each shard holds one
tf.train.Example per document with an int64 list feature `targets` (no EOS; the task adds it).
Documents go to shards round-robin by their index over all inputs, so the shards do not depend on
the number of tokenizer processes. All file access goes through tf.io.gfile: `gs://` paths work.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import uuid
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping

from llada_jax.errors import ConfigError

if TYPE_CHECKING:
  import seqio
  import tensorflow as tf

FORMAT = "llada_jax.pretokenized.v1"
MANIFEST = "manifest.json"
ERROR_MODES = ("raise", "skip")
SKIP_REASONS = ("empty", "undecodable", "missing_field")
_BATCH_CHARS = 1 << 18  # text per tokenizer task
_TASKS_PER_WORKER = 4  # tasks in flight per process: bounds memory on inputs of any size


def _tensorflow():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf


@dataclasses.dataclass(frozen=True)
class VocabularySpec:
  """A vocabulary by its data.vocabulary name (and tokenizer.json for "llada_hf"): picklable, so
  tokenizer processes rebuild it instead of receiving it."""

  name: str
  tokenizer: str | None = None

  def build(self) -> seqio.Vocabulary:
    """The seqio Vocabulary this spec names; ConfigError for an unknown name or a missing file."""
    from llada_jax.data.vocab import vocabulary_by_name  # pylint: disable=g-import-not-at-top

    return vocabulary_by_name(self.name, self.tokenizer or "")


def shard_name(index: int, num_shards: int) -> str:
  """File name of shard `index` of `num_shards`."""
  return f"data-{index:05d}-of-{num_shards:05d}.tfrecord"


class _Rejections:
  """Skipped documents by reason; with errors="raise" a bad (not an empty) one is a ConfigError."""

  def __init__(self, errors: str):
    self.errors = errors
    self.counts = dict.fromkeys(SKIP_REASONS, 0)

  def reject(self, reason: str, message: str) -> None:
    if self.errors == "raise":
      raise ConfigError(f"{message} (errors='skip' skips such documents)")
    self.counts[reason] += 1

  def empty(self) -> None:
    self.counts["empty"] += 1


def _paragraphs(path: str) -> Iterator[tuple[int, bytes]]:
  """(byte offset, paragraph) of a text file; a paragraph keeps its trailing blank lines, so the
  paragraphs concatenate to the file."""
  tf = _tensorflow()
  offset, lines = 0, []
  with tf.io.gfile.GFile(path, "rb") as f:
    for line in f:
      if len(lines) > 1 and lines[-1] == b"\n" and line != b"\n":
        paragraph = b"".join(lines)
        yield offset, paragraph
        offset, lines = offset + len(paragraph), []
      lines.append(line)
  if lines:
    yield offset, b"".join(lines)


def _undecodable(where: str, offset: int) -> str:
  return f"{where}: undecodable byte at offset {offset} (expected UTF-8 text)"


def _text_documents(path: str, rejections: _Rejections) -> Iterator[str]:
  for offset, paragraph in _paragraphs(path):
    try:
      yield paragraph.decode("utf-8")
    except UnicodeDecodeError as e:
      rejections.reject("undecodable", _undecodable(path, offset + e.start))


def _jsonl_documents(path: str, text_field: str, rejections: _Rejections) -> Iterator[str]:
  tf = _tensorflow()
  next_offset = 0
  with tf.io.gfile.GFile(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      where, offset, next_offset = f"{path}:{number}", next_offset, next_offset + len(line)
      if not line.strip():
        rejections.empty()
        continue
      try:
        record = json.loads(line.decode("utf-8"))
      except UnicodeDecodeError as e:
        rejections.reject("undecodable", _undecodable(where, offset + e.start))
        continue
      except json.JSONDecodeError as e:
        rejections.reject("undecodable", f"{where}: not a JSON object ({e.msg})")
        continue
      text = record.get(text_field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        rejections.reject("missing_field", f"{where}: no string field {text_field!r}")
        continue
      yield text


def _documents(path: str, text_field: str, rejections: _Rejections) -> Iterator[str]:
  """The non-blank documents of one input file, in order; bad ones go to `rejections`."""
  if path.endswith(".txt"):
    documents = _text_documents(path, rejections)
  else:
    documents = _jsonl_documents(path, text_field, rejections)
  count = 0
  for text in documents:
    if text.strip():
      count += 1
      yield text
    else:
      rejections.empty()
  if not count:
    raise ConfigError(f"{path} holds no documents (skipped: {rejections.counts})")


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
  batch, size = [], 0
  for text in texts:
    batch.append(text)
    size += len(text)
    if size >= _BATCH_CHARS:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


@functools.lru_cache(maxsize=1)
def _cached_vocabulary(spec: VocabularySpec):
  return spec.build()


def _encode_batch(spec: VocabularySpec, texts: list[str]) -> list[tuple[bytes, int]]:
  """(serialized tf.train.Example, token count) per text: the work of one tokenizer process."""
  tf = _tensorflow()
  vocabulary = _cached_vocabulary(spec)
  examples = []
  for text in texts:
    ids = vocabulary.encode(text)
    feature = tf.train.Feature(int64_list=tf.train.Int64List(value=ids))
    example = tf.train.Example(features=tf.train.Features(feature={"targets": feature}))
    examples.append((example.SerializeToString(), len(ids)))
  return examples


def _ordered_map(fn: Callable, items: Iterable, num_workers: int) -> Iterator:
  """fn over items in order, in num_workers spawned processes with a bounded number in flight."""
  if num_workers == 1:
    yield from map(fn, items)
    return
  with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.apply_async(fn, (item,)))
      if len(pending) >= num_workers * _TASKS_PER_WORKER:
        yield pending.popleft().get()
    while pending:
      yield pending.popleft().get()


def _temporary_name(path: str) -> str:
  """A name unique to this run next to path, so that concurrent runs cannot mix their files."""
  return f"{path}.tmp-{uuid.uuid4().hex}"


class _ShardWriter:
  """num_shards TFRecord files written under temporary names, renamed into place on commit."""

  def __init__(self, output_dir: str, num_shards: int):
    tf = _tensorflow()
    self._gfile = tf.io.gfile
    self.paths = [os.path.join(output_dir, shard_name(i, num_shards)) for i in range(num_shards)]
    self._temporary = [_temporary_name(path) for path in self.paths]
    self._writers = [tf.io.TFRecordWriter(temporary) for temporary in self._temporary]
    self.documents = [0] * num_shards
    self.tokens = [0] * num_shards
    self._next = 0

  def write(self, example: bytes, num_tokens: int) -> None:
    shard = self._next
    self._writers[shard].write(example)
    self.documents[shard] += 1
    self.tokens[shard] += num_tokens
    self._next = (shard + 1) % len(self.paths)

  def commit(self) -> None:
    for writer, temporary, path in zip(self._writers, self._temporary, self.paths):
      writer.close()
      self._gfile.rename(temporary, path, overwrite=True)

  def abort(self) -> None:
    for writer, temporary in zip(self._writers, self._temporary):
      writer.close()
      if self._gfile.exists(temporary):
        self._gfile.remove(temporary)


def _check_inputs(input_files: list[str], num_shards: int, num_workers: int, errors: str) -> None:
  tf = _tensorflow()
  if not input_files:
    raise ConfigError("no input files: expected .txt or .jsonl files")
  for path in input_files:
    if not path.endswith((".txt", ".jsonl")):
      raise ConfigError(f"input {path} is not allowed: expected a .txt or .jsonl file")
    if not tf.io.gfile.exists(path):
      raise ConfigError(f"input file {path} does not exist")
  if num_shards < 1:
    raise ConfigError(f"num_shards={num_shards} is not allowed: expected at least 1")
  if num_workers < 1:
    raise ConfigError(f"num_workers={num_workers} is not allowed: expected at least 1")
  if errors not in ERROR_MODES:
    raise ConfigError(f"errors={errors!r} is not allowed: expected one of {ERROR_MODES}")


def write_shards(
    input_files: list[str],
    output_dir: str,
    vocabulary: VocabularySpec,
    *,
    num_shards: int,
    text_field: str = "text",
    num_workers: int = 2,
    errors: str = "raise",
) -> dict:
  """Tokenizes .txt (a document per paragraph) and .jsonl (per line's text_field) files into
  num_shards TFRecord shards plus manifest.json in output_dir; returns the manifest."""
  _check_inputs(input_files, num_shards, num_workers, errors)
  tf = _tensorflow()
  vocab_size = vocabulary.build().vocab_size
  rejections = _Rejections(errors)
  texts = (text for path in input_files for text in _documents(path, text_field, rejections))
  tf.io.gfile.makedirs(output_dir)
  shards = _ShardWriter(output_dir, num_shards)
  results = _ordered_map(functools.partial(_encode_batch, vocabulary), _batches(texts), num_workers)
  try:
    with contextlib.closing(results):
      for examples in results:
        for example, num_tokens in examples:
          shards.write(example, num_tokens)
  except BaseException:
    shards.abort()
    raise
  shards.commit()
  manifest = {
      "format": FORMAT,
      "vocabulary": vocabulary.name,
      "vocab_size": vocab_size,
      "tokenizer": vocabulary.tokenizer,
      "num_shards": num_shards,
      "files": [
          {"path": os.path.basename(path), "documents": documents, "tokens": tokens}
          for path, documents, tokens in zip(shards.paths, shards.documents, shards.tokens)
      ],
      "documents": sum(shards.documents),
      "tokens": sum(shards.tokens),
      "sources": list(input_files),
      "skipped": rejections.counts,
  }
  path = os.path.join(output_dir, MANIFEST)
  temporary = _temporary_name(path)
  with tf.io.gfile.GFile(temporary, "w") as f:
    f.write(json.dumps(manifest, indent=2) + "\n")
  tf.io.gfile.rename(temporary, path, overwrite=True)
  return manifest


def read_manifest(directory: str) -> dict:
  """The manifest of a directory written by write_shards; ConfigError if missing or not one."""
  tf = _tensorflow()
  path = os.path.join(directory, MANIFEST)
  if not tf.io.gfile.exists(path):
    raise ConfigError(f"{directory} holds no {MANIFEST}: write the shards with llada-preprocess")
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      manifest = json.loads(f.read())
    except ValueError as e:
      raise ConfigError(f"{path} is not valid JSON: {e}") from None
  found = manifest.get("format") if isinstance(manifest, dict) else None
  if found != FORMAT:
    raise ConfigError(f"{path} has format {found!r}; expected {FORMAT!r}")
  missing = [
      key for key in ("vocabulary", "vocab_size", "files", "documents") if key not in manifest
  ]
  if missing:
    raise ConfigError(f"{path} lacks the fields {missing}")
  return manifest


def check_vocabulary(manifest: dict, vocabulary_name: str, vocab_size: int) -> None:
  """Raises ConfigError when the shards were tokenized with another vocabulary than the config's
  (vocab_size: the seqio vocabulary's, not the model's padded table)."""
  if (manifest["vocabulary"], manifest["vocab_size"]) != (vocabulary_name, vocab_size):
    raise ConfigError(
        f"data.vocabulary={vocabulary_name!r} ({vocab_size} ids) is not allowed: the shards were "
        f"tokenized with {manifest['vocabulary']!r} ({manifest['vocab_size']} ids); use that "
        "vocabulary or rerun llada-preprocess"
    )


def pretokenized_source(directories: str | Mapping[str, str]) -> seqio.DataSource:
  """A seqio.TFExampleDataSource over the shards of each split's directory (a string: "train").

  Its `targets` are sparse int64; put `densify` first among the task's preprocessors.
  """
  import seqio  # pylint: disable=g-import-not-at-top

  tf = _tensorflow()

  if isinstance(directories, str):
    directories = {"train": directories}
  manifests = {split: read_manifest(directory) for split, directory in directories.items()}
  vocabularies = {(m["vocabulary"], m["vocab_size"]) for m in manifests.values()}
  if len(vocabularies) > 1:
    raise ConfigError(
        f"the splits {dict(directories)} were tokenized with different vocabularies: "
        f"{sorted(vocabularies)}"
    )
  files = {}
  for split, directory in directories.items():
    names = [entry["path"] for entry in manifests[split]["files"]]
    missing = sorted(set(names) - set(tf.io.gfile.listdir(directory)))
    if missing:
      raise ConfigError(f"{directory} lacks shards listed in its {MANIFEST}: {missing}")
    files[split] = [os.path.join(directory, name) for name in names]
  return seqio.TFExampleDataSource(
      split_to_filepattern=files,
      feature_description={"targets": tf.io.VarLenFeature(tf.int64)},
      num_input_examples={split: m["documents"] for split, m in manifests.items()},
  )


def densify(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """seqio preprocessor: the sparse int64 `targets` of pretokenized_source as dense int32."""
  tf = _tensorflow()
  return dataset.map(
      lambda ex: {**ex, "targets": tf.cast(tf.sparse.to_dense(ex["targets"]), tf.int32)},
      num_parallel_calls=tf.data.AUTOTUNE,
  )
