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
import io
import json
import multiprocessing
import os
import pathlib
import struct
import uuid
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

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
INDEX_EVERY = 1024  # documents between two entries of a shard's index
_RECORD_FRAMING = 16  # TFRecord bytes around each record: length, its CRC, the data's CRC


def _tensorflow():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf


@dataclasses.dataclass(frozen=True)
class VocabularySpec:
  """A vocabulary by its data.vocabulary name (and tokenizer.json for "llada_hf" and "hf", and for
  "hf" its special ids, (name, id) pairs of hf_tokenizer.CONFIG_IDS): picklable, so tokenizer
  processes rebuild it instead of receiving it."""

  name: str
  tokenizer: str | None = None
  ids: tuple[tuple[str, int], ...] | None = None

  def build(self) -> seqio.Vocabulary:
    """The seqio Vocabulary this spec names; ConfigError for an unknown name or a missing file."""
    from llada_jax.data.vocab import vocabulary_by_name  # pylint: disable=g-import-not-at-top

    ids = None if self.ids is None else dict(self.ids)
    return vocabulary_by_name(self.name, self.tokenizer or "", ids)

  @classmethod
  def of_tokenizer(cls, path: str) -> VocabularySpec:
    """The spec of any model's tokenizer.json: "llada_hf" for LLaDA's (it names EOS and the mask
    by their text), else "hf" (what `train.init_from` of that model's folder trains with), its BOS
    and EOS those the files beside it name (config.json, generation_config.json,
    tokenizer_config.json: read as the Llama import reads them; -1 where none does) and no mask id
    (a converted model's mask is a row its import appends). The shards hold no special id: these
    are recorded in the manifest, not written.

    Raises:
      ConfigError: no such file. CheckpointError: an unreadable tokenizer or config file.
    """
    # pylint: disable=g-import-not-at-top
    from llada_jax.data.hf_tokenizer import CONFIG_IDS, SPECIAL_TOKENS, HFTokenizer
    from llada_jax.interop.llama import _named_special_ids

    # pylint: enable=g-import-not-at-top
    if not os.path.isfile(path):
      raise ConfigError(
          f"--vocabulary={path} is not allowed: expected byte, spm8k or the path "
          "of a tokenizer.json, and no such file exists"
      )
    texts = HFTokenizer(path, dict.fromkeys(CONFIG_IDS, -1))
    if all(texts.token_id(SPECIAL_TOKENS[name]) != -1 for name in ("eos_id", "mask_id")):
      return cls("llada_hf", path)
    named = _named_special_ids(pathlib.Path(path).parent, texts)
    ids = {name: -1 for name in CONFIG_IDS}
    for field, found in named.items():
      if found and found[0][1]:
        ids[field.replace("_token", "")] = found[0][1][0]  # bos_token_id -> bos_id
    return cls("hf", path, tuple(ids.items()))


def shard_name(index: int, num_shards: int) -> str:
  """File name of shard `index` of `num_shards`."""
  return f"data-{index:05d}-of-{num_shards:05d}.tfrecord"


def index_name(shard_file: str) -> str:
  """File name of a shard's index: int64 [ceil(documents / INDEX_EVERY), 2], row j holding the byte
  offset of document j * INDEX_EVERY in the shard and the number of tokens before it."""
  return shard_file.removesuffix(".tfrecord") + ".index.npy"


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
  """The `text_field` of every line of a JSONL file; bad lines are counted in `rejections`."""
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


def encode_example(ids: Sequence[int]) -> tuple[bytes, int]:
  """(serialized tf.train.Example with int64 `targets`, token count) of one document's ids."""
  tf = _tensorflow()
  feature = tf.train.Feature(int64_list=tf.train.Int64List(value=ids))
  example = tf.train.Example(features=tf.train.Features(feature={"targets": feature}))
  return example.SerializeToString(), len(ids)


def _encode_batch(spec: VocabularySpec, texts: list[str]) -> list[tuple[bytes, int]]:
  """(serialized tf.train.Example, token count) per text: the work of one tokenizer process."""
  vocabulary = _cached_vocabulary(spec)
  return [encode_example(vocabulary.encode(text)) for text in texts]


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
    self._bytes = [0] * num_shards
    self._index: list[list[tuple[int, int]]] = [[] for _ in range(num_shards)]
    self._next = 0

  def write(self, example: bytes, num_tokens: int) -> None:
    shard = self._next
    self._writers[shard].write(example)
    if self.documents[shard] % INDEX_EVERY == 0:
      self._index[shard].append((self._bytes[shard], self.tokens[shard]))
    self.documents[shard] += 1
    self.tokens[shard] += num_tokens
    self._bytes[shard] += len(example) + _RECORD_FRAMING
    self._next = (shard + 1) % len(self.paths)

  def commit(self) -> None:
    """Writes each shard's index, then renames the shards into place."""
    for path, entries in zip(self.paths, self._index):
      buffer = io.BytesIO()
      np.save(buffer, np.array(entries, np.int64).reshape(-1, 2))
      temporary = _temporary_name(index_name(path))
      with self._gfile.GFile(temporary, "wb") as f:
        f.write(buffer.getvalue())
      self._gfile.rename(temporary, index_name(path), overwrite=True)
    for writer, temporary, path in zip(self._writers, self._temporary, self.paths):
      writer.close()
      self._gfile.rename(temporary, path, overwrite=True)

  def abort(self) -> None:
    for writer, temporary in zip(self._writers, self._temporary):
      writer.close()
      if self._gfile.exists(temporary):
        self._gfile.remove(temporary)


def _check_no_empty_shard(shards: _ShardWriter) -> None:
  """ConfigError (one line) naming the first shard that would hold no document: its training
  host would read no batch."""
  if 0 in shards.documents:
    total = sum(shards.documents)
    raise ConfigError(
        f"shard {shards.paths[shards.documents.index(0)]} would hold no document: the inputs "
        f"hold {total} documents for num_shards={len(shards.paths)} (documents go to shards "
        f"round-robin); expected num_shards <= {total}"
    )


def _check_inputs(input_files: list[str], num_shards: int, num_workers: int, errors: str) -> None:
  """ConfigError (one line) for missing inputs or bad shard/worker/error-mode settings."""
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
  rejections = _Rejections(errors)
  texts = (text for path in input_files for text in _documents(path, text_field, rejections))
  results = _ordered_map(functools.partial(_encode_batch, vocabulary), _batches(texts), num_workers)
  with contextlib.closing(results):
    examples = (example for batch in results for example in batch)
    return write_examples(
        examples,
        output_dir,
        vocabulary,
        num_shards=num_shards,
        sources=input_files,
        skipped=rejections.counts,
    )


def write_examples(
    examples: Iterable[tuple[bytes, int]],
    output_dir: str,
    vocabulary: VocabularySpec,
    *,
    num_shards: int,
    sources: Sequence[str] = (),
    skipped: Mapping[str, int] | None = None,
) -> dict:
  """Writes (serialized tf.train.Example, token count) pairs, documents in order, round-robin into
  num_shards shards with their indexes, then manifest.json; returns the manifest."""
  tf = _tensorflow()
  vocab_size = vocabulary.build().vocab_size
  tf.io.gfile.makedirs(output_dir)
  shards = _ShardWriter(output_dir, num_shards)
  try:
    for example, num_tokens in examples:
      shards.write(example, num_tokens)
    _check_no_empty_shard(shards)
  except BaseException:
    shards.abort()
    raise
  shards.commit()
  manifest = {
      "format": FORMAT,
      "vocabulary": vocabulary.name,
      "vocab_size": vocab_size,
      "tokenizer": vocabulary.tokenizer,
      **({} if vocabulary.ids is None else {"special_ids": dict(vocabulary.ids)}),
      "num_shards": num_shards,
      "index_every": INDEX_EVERY,
      "files": [
          {
              "path": os.path.basename(path),
              "documents": documents,
              "tokens": tokens,
              "index": os.path.basename(index_name(path)),
          }
          for path, documents, tokens in zip(shards.paths, shards.documents, shards.tokens)
      ],
      "documents": sum(shards.documents),
      "tokens": sum(shards.tokens),
      "sources": list(sources),
      "skipped": dict(skipped or dict.fromkeys(SKIP_REASONS, 0)),
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


def has_index(manifest: dict) -> bool:
  """Whether every shard of a manifest has an index (shards written before indexes existed have
  none: training on them resumes by reading from the start)."""
  return "index_every" in manifest and all("index" in entry for entry in manifest["files"])


class TokenReader:
  """Random access to the token stream of some shard files of one directory: their documents in
  file order, each followed by `eos_id` (None: nothing), through the shards' indexes.

  `read(start, stop)` reads from the index entry at or before `start` (at most INDEX_EVERY
  documents early) in one contiguous read per file, so its cost does not depend on `start`.
  """

  def __init__(self, directory: str, manifest: dict, files: Sequence[int], eos_id: int | None):
    tf = _tensorflow()
    self._gfile = tf.io.gfile
    self._eos = eos_id
    self._every = manifest["index_every"]
    self._paths, self._entries = [], []
    lengths = []
    for number in files:
      entry = manifest["files"][number]
      with tf.io.gfile.GFile(os.path.join(directory, entry["index"]), "rb") as f:
        index = np.load(io.BytesIO(f.read()))
      separators = 0 if eos_id is None else np.arange(len(index), dtype=np.int64) * self._every
      self._paths.append(os.path.join(directory, entry["path"]))
      self._entries.append((index[:, 0], index[:, 1] + separators))
      lengths.append(entry["tokens"] + (0 if eos_id is None else entry["documents"]))
    self._starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

  @property
  def num_tokens(self) -> int:
    return int(self._starts[-1])

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the stream, int32 [stop - start]."""
    parts = []
    for number, path in enumerate(self._paths):
      begin, end = self._starts[number], self._starts[number + 1]
      if stop > begin and start < end:
        parts.append(
            self._read_file(number, path, max(start, begin) - begin, min(stop, end) - begin)
        )
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)

  def _read_file(self, number: int, path: str, start: int, stop: int) -> np.ndarray:
    offsets, positions = self._entries[number]
    first = np.searchsorted(positions, start, side="right") - 1
    last = np.searchsorted(positions, stop, side="left")
    with self._gfile.GFile(path, "rb") as f:
      f.seek(int(offsets[first]))
      data = f.read(int(offsets[last] - offsets[first])) if last < len(offsets) else f.read()
    tokens = np.concatenate(_document_tokens(data, self._eos))
    skip = start - positions[first]
    return tokens[skip : skip + stop - start]


def _document_tokens(data: bytes, eos_id: int | None) -> list[np.ndarray]:
  """The `targets` of every TFRecord in `data` (int32), each followed by eos_id unless None."""
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top,no-name-in-module

  out, at = [], 0
  while at < len(data):
    (length,) = struct.unpack_from("<Q", data, at)
    example = example_pb2.Example.FromString(data[at + 12 : at + 12 + length])
    out.append(np.array(example.features.feature["targets"].int64_list.value, np.int32))
    if eos_id is not None:
      out.append(np.array([eos_id], np.int32))
    at += length + _RECORD_FRAMING
  return out
