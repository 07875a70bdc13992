"""Random-access training streams: example i of a data shard without reading examples 0..i-1.

A shard's epoch is a fixed sequence of n rows (the seqio task's rows of seqio shard (s, S), in
order). Example i of the endless stream is in epoch e = i // n at position p = i % n; epoch e
visits the epoch's windows of W = data.shuffle_buffer consecutive rows in a seeded order, and the
rows of each window in a seeded order (the seeds: data seed, S, s, e and the window). Resuming at
i therefore loads one window: its cost does not grow with the examples consumed.

Rows come from memory (registry tasks whose records are in memory: one epoch of the shard's seqio
rows, built once) or, for `llada-preprocess` shards with an index, from the token stream read at
row offsets (chunk layout). A mixture draws blocks of W rows, a fixed number from each task
(largest remainder of W * rate), in a seeded order per block. Tasks without random access (seqio
tasks registered elsewhere, shards written without an index, packed pre-tokenized shards) get no
stream here; the pipeline then skips the consumed examples (`stream_for` returns None).
"""

from __future__ import annotations

import functools
from typing import Iterator, Protocol, Sequence

import ml_collections
import numpy as np

from llada_jax.errors import ConfigError

Rows = dict[str, np.ndarray]
_CHUNK = 1024  # rows per element handed to tf.data


class RowSource(Protocol):
  """A shard's epoch of rows, readable at any offset."""

  num_rows: int

  def read(self, start: int, stop: int) -> Rows:
    """Rows [start, stop) of the epoch: every feature with a leading axis of stop - start."""


class MemoryRows:
  """Rows held in memory: every feature [num_rows, ...]."""

  def __init__(self, rows: Rows):
    self._rows = rows
    self.num_rows = len(next(iter(rows.values())))

  def read(self, start: int, stop: int) -> Rows:
    return {name: value[start:stop] for name, value in self._rows.items()}


class ChunkedTokens:
  """Rows of `length` consecutive tokens of a TokenReader's stream (the last partial row dropped),
  as the chunk layout cuts them."""

  def __init__(self, reader, length: int):
    self._reader = reader
    self._length = length
    self.num_rows = reader.num_tokens // length

  def read(self, start: int, stop: int) -> Rows:
    tokens = self._reader.read(start * self._length, stop * self._length)
    return {"targets": tokens.reshape(stop - start, self._length)}


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng([int(k) % 2**63 for k in key])


class Stream(Protocol):
  """An endless stream of rows with random access to its start."""

  def chunks(self, first: int) -> Iterator[Rows]:
    """Examples first, first + 1, ... in consecutive pieces (each feature [piece, ...]); nothing
    when the epoch is empty."""


class WindowedStream:
  """Epochs of `rows` in seeded window order, each window's rows in seeded order (module doc)."""

  def __init__(self, rows: RowSource, window: int, key: Sequence[int]):
    self._rows = rows
    self._window = window
    self._key = tuple(key)

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(windows in visiting order, their first positions in the epoch, with the end appended)."""
    n, w = self._rows.num_rows, self._window
    order = _rng(*self._key, epoch).permutation(-(-n // w))
    return order, np.concatenate([[0], np.cumsum(np.minimum(w, n - order * w))])

  def chunks(self, first: int) -> Iterator[Rows]:
    """The stream's rows from example `first` on, one window's remainder at a time."""
    n = self._rows.num_rows
    if n == 0:
      return
    epoch, position = divmod(first, n)
    while True:
      order, starts = self._epoch(epoch)
      rank = int(np.searchsorted(starts, position, side="right")) - 1
      window, size = int(order[rank]), int(starts[rank + 1] - starts[rank])
      rows = self._rows.read(window * self._window, window * self._window + size)
      permutation = _rng(*self._key, epoch, window).permutation(size)
      for at in range(position - int(starts[rank]), size, _CHUNK):
        picked = permutation[at : at + _CHUNK]
        yield {name: value[picked] for name, value in rows.items()}
      epoch, position = divmod(int(starts[rank + 1]) + epoch * n, n)


class MixedStream:
  """Blocks of `block` rows: a fixed count from each stream per block, in a seeded order."""

  def __init__(
      self,
      streams: Sequence[Stream],
      rates: Sequence[float],
      block: int,
      key: Sequence[int],
      names: Sequence[str],
  ):
    quotas = np.asarray(rates, np.float64) / sum(rates) * block
    counts = np.floor(quotas).astype(np.int64)
    counts[np.argsort(counts - quotas, kind="stable")[: block - counts.sum()]] += 1
    for name, count in zip(names, counts):
      if count == 0:
        raise ConfigError(
            f"data.shuffle_buffer={block} is not allowed for this mixture: task "
            f"{name!r} would get none of the {block} rows of a block; raise it"
        )
    self._streams = streams
    self._counts = counts
    self._block = block
    self._key = tuple(key)

  def _order(self, block: int) -> np.ndarray:
    tasks = np.repeat(np.arange(len(self._counts)), self._counts)
    return _rng(*self._key, block).permutation(tasks)

  def chunks(self, first: int) -> Iterator[Rows]:
    """The mixture's rows from example `first` on, one block's remainder at a time."""
    block, position = divmod(first, self._block)
    order = self._order(block)
    sources = [
        _Taker(stream.chunks(block * count + int(np.sum(order[:position] == t))))
        for t, (stream, count) in enumerate(zip(self._streams, self._counts))
    ]
    while True:
      for begin in range(position, self._block, _CHUNK):
        picked = order[begin : begin + _CHUNK]
        out: Rows = {}
        for t, source in enumerate(sources):
          where = picked == t
          if where.any():
            for name, value in source.take(int(where.sum())).items():
              out.setdefault(name, np.empty((len(picked), *value.shape[1:]), value.dtype))
              out[name][where] = value
        yield out
      block, position = block + 1, 0
      order = self._order(block)


class _Taker:
  """Any number (> 0) of the next rows of a stream of chunks."""

  def __init__(self, chunks: Iterator[Rows]):
    self._chunks = chunks
    self._rest: Rows = {}
    self._left = 0

  def take(self, count: int) -> Rows:
    pieces = []
    while count > 0:
      if self._left == 0:
        self._rest = next(self._chunks)
        self._left = len(next(iter(self._rest.values())))
      size = min(count, self._left)
      pieces.append({name: value[:size] for name, value in self._rest.items()})
      self._rest = {name: value[size:] for name, value in self._rest.items()}
      self._left -= size
      count -= size
    return {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}


_TASK, _MIXTURE = 0, 1


def stream_for(
    config: ml_collections.ConfigDict, vocabulary, shard: int, num_shards: int
) -> Stream | None:
  """The random-access training stream of `shard` of `num_shards`, or None where the task has no
  random access (see the module docstring)."""
  from llada_jax.data import registry  # pylint: disable=g-import-not-at-top

  spec = registry.lookup(config.data.task)
  if isinstance(spec, registry.MixtureSpec):
    names = [task for task, _ in spec.rates]
    specs = [registry.lookup(task) for task in names]
  else:
    names, specs = [config.data.task], [spec]
  sources = [_source(config, vocabulary, s, shard, num_shards) for s in specs]
  if any(source is None for source in sources):
    return None
  key = (config.seed, num_shards, shard)
  streams = [
      WindowedStream(source, config.data.shuffle_buffer, (*key, _TASK, number))
      for number, source in enumerate(sources)
  ]
  if not isinstance(spec, registry.MixtureSpec):
    return streams[0]
  for name, source in zip(names, sources):
    if source.num_rows == 0:
      raise ConfigError(
          f"mixture {spec.name!r}: task {name!r} gives data shard {shard} of "
          f"{num_shards} no row of {config.data.sequence_length} tokens"
      )
  return MixedStream(
      streams, [rate for _, rate in spec.rates], config.data.shuffle_buffer, (*key, _MIXTURE), names
  )


def _source(
    config: ml_collections.ConfigDict, vocabulary, spec, shard: int, num_shards: int
) -> RowSource | None:
  """The rows of one registered task's shard: pre-tokenized shards read through their index, or
  the task's seqio rows held in memory; None without random access."""
  from llada_jax.data import pretokenized, registry  # pylint: disable=g-import-not-at-top

  if spec is None or config.data.use_cached:
    return None
  length = config.data.sequence_length
  if spec.shard_dirs:
    directory = dict(spec.shard_dirs)["train"]
    manifest = pretokenized.read_manifest(directory)
    files = len(manifest["files"])
    if config.data.packing != "chunk" or not pretokenized.has_index(manifest) or files < num_shards:
      return None
    reader = pretokenized.TokenReader(
        directory,
        manifest,
        range(shard, files, num_shards),
        vocabulary.eos_id if spec.append_eos else None,
    )
    return ChunkedTokens(reader, length)
  provider = registry.seqio_provider(
      spec.name, config.data.vocabulary, vocabulary, registry.layout_of(config)
  )
  return MemoryRows(_epoch_rows(provider, length, shard, num_shards))


@functools.lru_cache(maxsize=8)
def _epoch_rows(provider, length: int, shard: int, num_shards: int) -> Rows:
  """One epoch of the seqio task's train rows of shard (shard, num_shards), in order, in memory."""
  import seqio  # pylint: disable=g-import-not-at-top

  # Every layout of the registry's tasks gives rows of exactly `length`: seqio's trim (5x the
  # time of the rest here) would not change them.
  ds = provider.get_dataset(
      sequence_length={"targets": length},
      split="train",
      shuffle=False,
      shard_info=seqio.ShardInfo(shard, num_shards),
      num_epochs=1,
      trim_output_features=False,
  )
  parts = list(ds.batch(16 * _CHUNK).as_numpy_iterator())
  if not parts:
    return {"targets": np.zeros([0, length], np.int32)}
  return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
