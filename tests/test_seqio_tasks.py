"""A seqio user's own Tasks and Mixtures as data.task, and seqio's cache written on Apache Beam.

The user's module (data.task_module) registers, in seqio's registries and with its own
preprocessors: a Task over a `seqio.FunctionDataSource` (text upper-cased, tokenized, EOS after each
document), one over a `seqio.TFExampleDataSource` (a TFRecord file written here; "body" renamed to
"targets"), and a Mixture of the two.
"""

import json
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from conftest import make_tiny_config
from llada_jax.config import from_json, to_json
from llada_jax.data import pipeline
from llada_jax.errors import ConfigError

ONE_DEVICE = SingleDeviceSharding(jax.devices()[0])
MODULE = "llada_test_user_seqio_tasks"
FUNCTION_DOCS = [f"tale {i}: the quick brown fox jumps over dog number {i}." for i in range(40)]
RECORD_DOCS = [f"<{i:03d}> 0123456789 {i * 7919 % 1000:03d}" for i in range(40)]

USER_MODULE = """
import functools
import seqio
import tensorflow as tf

VOCABULARY = seqio.ByteVocabulary()
DOCS = {function_docs!r}
FEATURES = {{"targets": seqio.Feature(VOCABULARY, add_eos=True)}}


def upper(dataset):
  return dataset.map(lambda ex: {{"targets": tf.strings.upper(ex["targets"])}})


def docs(split, shuffle_files, seed=None):
  del shuffle_files, seed
  return tf.data.Dataset.from_tensor_slices({{"targets": DOCS if split == "train" else DOCS[:8]}})


seqio.TaskRegistry.add(
    "user_function_task", source=seqio.FunctionDataSource(docs, splits=("train", "validation")),
    preprocessors=[upper, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                   seqio.preprocessors.append_eos],
    output_features=FEATURES)
seqio.TaskRegistry.add(
    "user_record_task",
    source=seqio.TFExampleDataSource(
        {{"train": {record_file!r}, "validation": {record_file!r}}},
        feature_description={{"body": tf.io.FixedLenFeature([], tf.string)}}),
    preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={{"targets": "body"}}),
                   seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
    output_features=FEATURES)
seqio.MixtureRegistry.add("user_mixture", [("user_function_task", 1.0),
                                           ("user_record_task", 3.0)])
seqio.TaskRegistry.add(
    "user_other_vocabulary", source=seqio.FunctionDataSource(docs, splits=("train",)),
    preprocessors=[seqio.preprocessors.tokenize],
    output_features={{"targets": seqio.Feature(seqio.PassThroughVocabulary(300, eos_id=1))}})
seqio.TaskRegistry.add(
    "user_inputs_only", source=seqio.FunctionDataSource(docs, splits=("train",)),
    preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={{"inputs": "targets"}}),
                   seqio.preprocessors.tokenize],
    output_features={{"inputs": seqio.Feature(VOCABULARY)}})
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
  """Writes the TFRecord file and the user's task module; puts the module on sys.path."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("user_tasks")
  record_file = str(root / "records.tfrecord")
  with tf.io.TFRecordWriter(record_file) as writer:
    for doc in RECORD_DOCS:
      feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[doc.encode()]))
      writer.write(
          tf.train.Example(
              features=tf.train.Features(feature={"body": feature})
          ).SerializeToString()
      )
  (root / f"{MODULE}.py").write_text(
      textwrap.dedent(USER_MODULE.format(function_docs=FUNCTION_DOCS, record_file=record_file))
  )
  sys.path.insert(0, str(root))
  yield MODULE
  sys.path.remove(str(root))


def _config(task, **data):
  config = make_tiny_config()
  config.data.update(task=task, task_module=MODULE, **data)
  return config


def _rows(config, steps=3):
  it = pipeline.train_batches(config, ONE_DEVICE)
  return np.concatenate([np.asarray(next(it)["targets"]) for _ in range(steps)])


def _stream(docs):
  """The documents' byte ids, EOS (1) after each, three epochs: every chunk lies inside it."""
  ids = [b + 3 for doc in docs for b in [*doc.encode(), -2]]
  return bytes(ids * 3)


def _in_stream(row, docs) -> bool:
  return bytes(row.tolist()) in _stream(docs)


@pytest.mark.usefixtures("user_module")
def test_function_source_task_is_chunked_after_its_own_preprocessors():
  rows = _rows(_config("user_function_task"))
  upper = [doc.upper() for doc in FUNCTION_DOCS]
  assert rows.shape == (24, 32)
  assert all(_in_stream(row, upper) for row in rows)  # upper-cased (theirs), EOS between docs
  assert (rows == 1).any() and not any(_in_stream(row, FUNCTION_DOCS) for row in rows)


@pytest.mark.usefixtures("user_module")
def test_tfexample_source_task_packs_whole_documents():
  config = _config("user_record_task", packing="pack")
  batch = next(pipeline.train_batches(config, ONE_DEVICE))
  targets, segments = np.asarray(batch["targets"]), np.asarray(batch["segment_ids"])
  documents = {bytes(b + 3 for b in doc.encode()) + b"\x01" for doc in RECORD_DOCS}
  for row, seg in zip(targets, segments):
    pieces = [bytes(row[seg == s].tolist()) for s in np.unique(seg[seg > 0])]
    assert pieces and all(piece in documents for piece in pieces)
    np.testing.assert_array_equal(row[seg == 0], 0)


@pytest.mark.usefixtures("user_module")
def test_user_mixture_samples_both_tasks_by_their_rates():
  rows = _rows(_config("user_mixture"), steps=8)
  upper = [doc.upper() for doc in FUNCTION_DOCS]
  function = sum(_in_stream(row, upper) for row in rows)
  record = sum(_in_stream(row, RECORD_DOCS) for row in rows)
  assert function + record == len(rows) == 64
  assert 5 <= function <= 28  # rate 1 : 3, i.e. 16 of 64 expected


@pytest.mark.parametrize(
    "task, needle",
    [
        ("user_other_vocabulary", "its 'targets' vocabulary has 300 ids and EOS 1"),
        ("user_inputs_only", "has no 'targets' output feature"),
        ("no_such_task", "is not a registered task or mixture"),
    ],
)
@pytest.mark.usefixtures("user_module")
def test_tasks_that_do_not_fit_the_config_are_one_line_errors(task, needle):
  with pytest.raises(ConfigError, match=needle) as error:
    pipeline.train_batches(_config(task), ONE_DEVICE)
  assert "\n" not in str(error.value)


def test_stored_configs_without_the_cache_keys_load_with_defaults():
  stored = json.loads(to_json(make_tiny_config()))
  del stored["data"]["use_cached"], stored["data"]["cache_dir"]
  config = from_json(json.dumps(stored))
  assert (config.data.use_cached, config.data.cache_dir) == (False, "")


@pytest.mark.usefixtures("user_module")
def test_use_cached_without_a_cache_is_a_one_line_error(tmp_path):
  config = _config("user_function_task", use_cached=True, cache_dir=str(tmp_path))
  with pytest.raises(ConfigError, match="is not cached in .*write it with llada-cache"):
    pipeline.train_batches(config, ONE_DEVICE)
  config = _config("user_record_task", use_cached=True, cache_dir=str(tmp_path))
  with pytest.raises(ConfigError, match="hold no seqio.CacheDatasetPlaceholder"):
    pipeline.train_batches(config, ONE_DEVICE)


TEXT_DOCS = [f"line {i} of the corpus" for i in range(30)]


@pytest.fixture(scope="module")
def beam_cache(user_module, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """llada_jax's own text task and the user's seqio task cached by seqio's Beam pipeline on the
  DirectRunner's engine (FnApiRunner); then both sources are emptied (the text file deleted, the
  user's document list cleared), so reading them can only come from the cache. Yields the cache
  directory and the documents read on the fly before that."""
  del user_module  # it registered the user's tasks
  import seqio  # pylint: disable=g-import-not-at-top

  from llada_jax.data import beam_cache as cache_lib  # pylint: disable=g-import-not-at-top
  from llada_jax.data import registry  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("beam")
  corpus = root / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in TEXT_DOCS))
  registry.register_text_task("beam_text", [corpus], [corpus])
  cache = str(root / "cache")
  start = time.perf_counter()
  for task in ("beam_text", "user_function_task"):
    assert (
        len(cache_lib.cache_tasks(_config(task), cache, ["--runner=FnApiRunner"], min_shards=4))
        == 1
    )
  print(f"Beam (FnApiRunner) caching of two tasks: {time.perf_counter() - start:.1f} s")
  fresh = {}
  for name in ("beam_text.byte.chunk", "user_function_task"):
    task = seqio.TaskRegistry.get(name)
    documents = task.preprocess_precache(task.source.get_dataset("train", shuffle=False))
    fresh[name] = sorted(ex["targets"].tolist() for ex in documents.as_numpy_iterator())
  corpus.unlink()
  user_docs = sys.modules[MODULE].DOCS
  user_docs.clear()  # the user's source is gone too
  yield cache, fresh
  user_docs.extend(FUNCTION_DOCS)


def test_beam_cache_holds_each_tasks_tokenized_documents(beam_cache):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  cache, fresh = beam_cache
  for name, count in (("beam_text.byte.chunk", 30), ("user_function_task", 40)):
    files = tf.io.gfile.glob(f"{cache}/{name}/train.tfrecord-*-of-00004")
    cached = [
        list(tf.train.Example.FromString(record).features.feature["targets"].int64_list.value)
        for record in tf.data.TFRecordDataset(files).as_numpy_iterator()
    ]
    assert len(files) == 4 and len(cached) == count
    assert sorted(cached) == fresh[name]
    assert tf.io.gfile.exists(f"{cache}/{name}/COMPLETED")


def test_batches_come_from_the_cache(beam_cache):
  cache, _ = beam_cache
  # Chunks of the cache's (shuffled) document order: every piece between EOS ids lies in a
  # document. The sources are empty now, so the rows can only come from the cache.
  for task, docs in (
      ("beam_text", TEXT_DOCS),
      ("user_function_task", [doc.upper() for doc in FUNCTION_DOCS]),
  ):
    rows = _rows(_config(task, use_cached=True, cache_dir=cache))
    encoded = [bytes(b + 3 for b in doc.encode()) for doc in docs]
    for row in rows:
      assert all(
          any(piece in doc for doc in encoded) for piece in bytes(row.tolist()).split(b"\x01")
      )
    assert (rows == 1).any()


def test_trains_two_steps_on_a_users_seqio_task_from_the_beam_cache(beam_cache, tmp_path):
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  cache, _ = beam_cache
  config = _config("user_function_task", use_cached=True, cache_dir=cache)
  config.train.update(num_steps=2, eval_every=2)
  assert int(train(config, tmp_path).step) == 2
  metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  losses = [v for m in metrics for k, v in m.items() if "loss" in k]
  assert losses and np.isfinite(losses).all()
