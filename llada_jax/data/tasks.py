"""SeqIO Tasks over the bundled corpora.

A task reads a corpus split as paragraphs (so hosts can shard it), tokenizes it, and packs the token
stream into chunks of exactly the sequence length. Masking is applied on device by the objective.
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from llada_jax.data.corpora import split_text

SPLITS = ("train", "validation")


def _paragraphs(split: str, shuffle_files: bool, seed: int | None = None, *,
                corpus: str) -> tf.data.Dataset:
  del shuffle_files, seed  # one file per split; order is shuffled after packing
  text = split_text(corpus)[split]
  paragraphs = [p + "\n\n" for p in text.split("\n\n") if p]
  return tf.data.Dataset.from_tensor_slices({"text": paragraphs})


def pack_to_length(dataset: tf.data.Dataset, sequence_length: dict[str, int],
                   output_features: dict[str, seqio.Feature]) -> tf.data.Dataset:
  """Concatenates all token streams and cuts them into chunks of sequence_length['targets']."""
  del output_features
  length = sequence_length["targets"]
  tokens = dataset.map(lambda ex: ex["targets"]).unbatch()
  return tokens.batch(length, drop_remainder=True).map(lambda chunk: {"targets": chunk})


def register_corpus_task(name: str, corpus: str, vocabulary: seqio.Vocabulary) -> seqio.Task:
  """Registers (once) a packed pre-training task over a bundled corpus."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(functools.partial(_paragraphs, corpus=corpus), splits=SPLITS),
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
          seqio.preprocessors.tokenize,
          pack_to_length,
      ],
      output_features={"targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)},
  )
