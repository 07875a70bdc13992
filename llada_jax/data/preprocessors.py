"""tf.data preprocessors of the registry's tasks: EOS separators, chunking, packing, SFT layout.

Every function maps a dataset of tokenized examples to another and keeps the stream deterministic
(no random ops), so a task's examples depend only on its source, vocabulary and sequence length.
"""

from __future__ import annotations

import functools
from typing import Callable

import tensorflow as tf

_CHUNK_DOCUMENTS = 256  # documents concatenated and cut at once by `chunk`


def append_eos(dataset: tf.data.Dataset, eos_id: int) -> tf.data.Dataset:
  """Ends every document's `targets` with EOS, the separator LLaDA puts between documents."""
  return dataset.map(
      lambda ex: {**ex, "targets": tf.concat([ex["targets"], [eos_id]], 0)},
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
  )


def chunk(dataset: tf.data.Dataset, length: int) -> tf.data.Dataset:
  """Concatenates the documents and cuts the stream into chunks of exactly `length` tokens.

  LLaDA's pre-training layout: one document flows into the next, attention spans the whole chunk.
  The last partial chunk of the stream (fewer than `length` tokens) is dropped.
  """

  def cut(rest, tokens):  # rest: the tokens left over from earlier documents (< length)
    joined = tf.concat([rest, tokens], 0)
    full = tf.size(joined) // length * length
    return joined[full:], tf.reshape(joined[:full], [-1, length])

  dtype = dataset.element_spec["targets"].dtype
  groups = dataset.map(lambda ex: ex["targets"]).ragged_batch(_CHUNK_DOCUMENTS)
  rows = groups.map(lambda group: group.flat_values).scan(tf.zeros([0], dtype), cut)
  return rows.unbatch().map(lambda c: {"targets": c})


def split_long_documents(dataset: tf.data.Dataset, length: int) -> tf.data.Dataset:
  """Cuts documents longer than `length` into consecutive pieces, so packing loses no token."""

  def pieces(ex):
    tokens = ex["targets"]
    n = tf.size(tokens, out_type=tf.int64)
    rows = tf.maximum((n + length - 1) // length, 1)
    sizes = tf.concat(
        [tf.fill([rows - 1], tf.constant(length, tf.int64)), [n - (rows - 1) * length]], 0
    )
    return tf.data.Dataset.from_tensor_slices(
        {"targets": tf.RaggedTensor.from_row_lengths(tokens, sizes)}
    )

  return dataset.flat_map(pieces).map(lambda ex: {"targets": ex["targets"]})


def pack(dataset: tf.data.Dataset, length: int, align: int = 1) -> tf.data.Dataset:
  """Packs whole documents (long ones split first) into rows of `length`, with segment ids
  (1, 2, ... per document, 0 for padding) and positions restarting at 0 in every document.

  align > 1 (a divisor of length): every document starts at a multiple of `align` in its row,
  the gap after the one before it padding (segment 0, token 0, position 0), so a model that
  counts blocks of a divisor of `align` from the row's start sees each document's own blocks.
  """
  import seqio  # pylint: disable=g-import-not-at-top

  documents = split_long_documents(dataset, length)
  if align > 1:
    documents = documents.map(
        lambda ex: {
            "targets": tf.pad(
                ex["targets"], [[0, -tf.size(ex["targets"]) % align]], constant_values=_FILLER
            )
        }
    )
  packed = seqio.utils.trim_and_pack_dataset(documents, {"targets": length})

  def features(ex):
    gap = tf.equal(ex["targets"], _FILLER)
    return {
        "targets": tf.where(gap, 0, ex["targets"]),
        "segment_ids": tf.where(gap, 0, ex["targets_segment_ids"]),
        "positions": tf.where(gap, 0, ex["targets_positions"]),
    }

  return packed.map(features)


_FILLER = -1  # the gap after an aligned document while packing (no token id is negative)


def layout(name: str) -> Callable[[tf.data.Dataset, int], tf.data.Dataset]:
  """The layout function (dataset, length) -> rows of a layout name (`registry.layout_of`):
  "chunk", "pack", or "pack<A>" (documents aligned at multiples of A)."""
  if name == "chunk":
    return chunk
  return functools.partial(pack, align=int(name[len("pack") :] or 1))


def sft_layout(dataset: tf.data.Dataset, length: int, eos_id: int) -> tf.data.Dataset:
  """prompt ids ++ response ids, EOS-padded to `length`, with the prompt length (LLaDA SFT).

  Examples whose prompt and response with one EOS do not fit are dropped; the pipeline counts them
  and logs the count (and fails when nothing fits).
  """

  def fits(ex):
    return tf.size(ex["prompt"]) + tf.size(ex["response"]) < length

  def lay_out(ex):
    tokens = tf.concat([ex["prompt"], ex["response"]], 0)
    padding = tf.fill([length - tf.size(tokens)], tf.constant(eos_id, tokens.dtype))
    return {
        "targets": tf.ensure_shape(tf.concat([tokens, padding], 0), [length]),
        "prompt_length": tf.size(ex["prompt"], out_type=tf.int32),
    }

  return dataset.filter(fits).map(lay_out)
