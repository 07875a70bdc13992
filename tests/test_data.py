"""The SeqIO pipeline over the bundled Tiny Shakespeare corpus."""

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from conftest import make_tiny_config
from llada_jax.data import corpora, pipeline
from llada_jax.data.vocab import get_vocabulary


@pytest.fixture(scope="module")
def config():
  return make_tiny_config()


def _decode(config, row) -> str:
  return get_vocabulary(config).decode(np.asarray(row).tolist())


def test_train_batches_are_packed_corpus_text(config):
  sharding = SingleDeviceSharding(jax.devices()[0])
  batch = next(pipeline.train_batches(config, sharding))
  assert batch.shape == (8, 32) and batch.dtype == np.int32
  train_text = corpora.split_text("tinyshakespeare")["train"]
  for row in np.asarray(batch):
    assert _decode(config, row) in train_text
    assert row.min() >= 3  # bytes only: no pad, EOS or mask in packed text


def test_validation_is_held_out(config):
  splits = corpora.split_text("tinyshakespeare")
  assert abs(len(splits["validation"]) / sum(map(len, splits.values())) - 0.1) < 0.01
  sharding = SingleDeviceSharding(jax.devices()[0])
  batch = pipeline.eval_batches(config, sharding, 1)[0]
  for row in np.asarray(batch):
    text = _decode(config, row)
    assert text in splits["validation"] and text not in splits["train"]


def test_resume_skips_exactly_the_consumed_batches(config):
  sharding = SingleDeviceSharding(jax.devices()[0])
  fresh = pipeline.train_batches(config, sharding)
  for _ in range(3):
    next(fresh)
  resumed = next(pipeline.train_batches(config, sharding, start_step=3))
  np.testing.assert_array_equal(next(fresh), resumed)


def test_unigram_entropy_is_the_byte_entropy():
  bits = corpora.unigram_entropy_bits("tinyshakespeare")
  assert 4.5 < bits < 5.0  # 65 distinct characters, English letter frequencies
  assert corpora.bits_per_byte(np.log(2.0)) == pytest.approx(1.0)
