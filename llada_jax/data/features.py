"""Feature conversion: task examples -> the model's features, with the forward process in tf.data.

Every example of the global stream has an index g = step * batch_size + row. Its noise is drawn
with stateless ops from keys derived from (seed, stream, g), and the batch-level draws (the random
length cut, the stratified time offset) from (seed, stream, step), so any example's masking can be
recomputed on its own, on any host, in any order.

Model features of one example (length L):
  targets [L] int32          the clean tokens
  segment_ids [L] int32      document number within the row (1, 2, ...), 0 for padding
  positions [L] int32        RoPE positions (restart at every document when packed)
  valid [L] bool             in the sequence: not padding and before the random cut length
  prompt_length [] int32     SFT only: the first prompt_length tokens are never masked
and, when masking happens in the pipeline:
  inputs [L] int32           targets with masked positions replaced by the mask id
  masked [L] bool            positions the loss is computed on
  p_mask [] float32          the masking probability p = (1 - eps) t + eps
"""

from __future__ import annotations

import dataclasses

import enum

import tensorflow as tf


class Purpose(enum.IntEnum):
  """What a stateless draw is for; folded with the stream into its key (values fixed forever)."""

  CUT = 0  # whether the batch is cut to a random length
  CUT_LENGTH = 1  # the random length
  STRATIFIED_TIME = 2  # the batch's time offset (time_sampling="stratified")
  TIME = 3  # an example's t (time_sampling="uniform")
  MASK = 4  # an example's per-token masking draws


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """What the forward process needs: ids, eps, time sampling and the random-length cut."""

  seed: int
  stream: int  # llada_jax.keys.Stream.TRAIN or EVAL
  mask_id: int
  eps: float
  time_sampling: str
  random_length_prob: float
  global_batch: int


def _key(spec: MaskingSpec, purpose: Purpose, index: tf.Tensor) -> tf.Tensor:
  """A stateless seed for (seed, stream, purpose, index)."""
  base = tf.constant([spec.seed, spec.stream * 16 + purpose], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def add_structure(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Adds segment ids and positions to chunked (unpacked) rows: one segment, positions 0..L-1."""
  if "segment_ids" in example:
    return example
  length = tf.size(example["targets"])
  return {
      **example,
      "segment_ids": tf.ones([length], tf.int32),
      "positions": tf.range(length, dtype=tf.int32),
  }


def cut_length(spec: MaskingSpec, step: tf.Tensor, length: int) -> tf.Tensor:
  """The batch's length: L, or with probability random_length_prob a draw from U{1..L}."""
  cut = tf.random.stateless_uniform([], _key(spec, Purpose.CUT, step)) < spec.random_length_prob
  drawn = tf.random.stateless_uniform(
      [], _key(spec, Purpose.CUT_LENGTH, step), minval=1, maxval=length + 1, dtype=tf.int32
  )
  return tf.where(cut, drawn, length)


def diffusion_time(spec: MaskingSpec, index: tf.Tensor) -> tf.Tensor:
  """t ~ U(0, 1) of example `index`; stratified: (u_step + row / batch) mod 1 as on device."""
  if spec.time_sampling == "stratified":
    step, row = index // spec.global_batch, index % spec.global_batch
    u = tf.random.stateless_uniform([], _key(spec, Purpose.STRATIFIED_TIME, step))
    return tf.math.floormod(u + tf.cast(row, tf.float32) / spec.global_batch, 1.0)
  return tf.random.stateless_uniform([], _key(spec, Purpose.TIME, index))


def convert(
    example: dict[str, tf.Tensor], index: tf.Tensor, spec: MaskingSpec, mask_in_pipeline: bool
) -> dict[str, tf.Tensor]:
  """The model features of the example with global index `index` (see the module docstring)."""
  example = add_structure(example)
  targets = example["targets"]
  length = targets.shape[0]
  in_cut = tf.range(length) < cut_length(spec, index // spec.global_batch, length)
  features = {
      "targets": targets,
      "segment_ids": example["segment_ids"],
      "positions": example["positions"],
      "valid": in_cut & (example["segment_ids"] > 0),
  }
  maskable = features["valid"]
  if "prompt_length" in example:
    features["prompt_length"] = example["prompt_length"]
    maskable = maskable & (tf.range(length) >= example["prompt_length"])
  if mask_in_pipeline:
    p_mask = (1.0 - spec.eps) * diffusion_time(spec, index) + spec.eps
    draws = tf.random.stateless_uniform([length], _key(spec, Purpose.MASK, index))
    masked = (draws < p_mask) & maskable
    features.update(inputs=tf.where(masked, spec.mask_id, targets), masked=masked, p_mask=p_mask)
  return features
