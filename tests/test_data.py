"""SeqIO pipelines: tasks, chunking and packing, masking in the pipeline, resume, bad input."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from conftest import make_tiny_config
from llada_jax.data import corpora, pipeline, registry
from llada_jax.data.vocab import get_vocabulary
from llada_jax.errors import ConfigError

ONE_DEVICE = SingleDeviceSharding(jax.devices()[0])


@pytest.fixture(scope="module")
def config():
  return make_tiny_config()


def _take(config, steps, start_step=0, sharding=ONE_DEVICE):
  it = pipeline.train_batches(config, sharding, start_step=start_step)
  return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(steps)]


@pytest.fixture(scope="module")
def stream(config):
  return _take(config, 8)


def _decode(config, row) -> str:
  return get_vocabulary(config).decode(np.asarray(row).tolist())


def test_train_batches_are_corpus_text_with_every_feature(config, stream):
  batch = stream[0]
  assert {k: v.shape for k, v in batch.items()} == {
      "targets": (8, 32),
      "inputs": (8, 32),
      "masked": (8, 32),
      "valid": (8, 32),
      "segment_ids": (8, 32),
      "positions": (8, 32),
      "p_mask": (8,),
  }
  train_text = corpora.split_text("tinyshakespeare")["train"]
  for row in batch["targets"]:
    assert _decode(config, row) in train_text
    assert row.min() >= 3  # bytes only: no pad, EOS or mask in chunked text
  np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(32), (8, 32)))


def test_pipeline_noise_is_the_forward_process(config, stream):
  mask_id, eps = config.tokens.mask_id, config.diffusion.eps
  for batch in stream:
    np.testing.assert_array_equal(
        batch["inputs"], np.where(batch["masked"], mask_id, batch["targets"])
    )
    assert not np.any(batch["masked"] & ~batch["valid"])
    assert np.all((batch["p_mask"] >= eps) & (batch["p_mask"] <= 1.0))


def test_masking_statistics_match_p(config):
  """Per example the masked fraction estimates p; p = (1 - eps) t + eps with t ~ U(0, 1)."""
  c = config.copy_and_resolve_references()
  c.data.sequence_length, c.model.max_sequence_length, c.data.batch_size = 256, 256, 64
  c.diffusion.random_length_prob = 0.0
  batches = _take(c, 8)
  p = np.concatenate([b["p_mask"] for b in batches])
  frac = np.concatenate([b["masked"].mean(1) for b in batches])
  # Binomial(256, p) / 256 around p: the mean residual is ~0 and its spread matches sqrt(p(1-p)/L).
  z = (frac - p) / np.sqrt(p * (1 - p) / 256)
  assert abs(z.mean()) < 4 / np.sqrt(z.size) and 0.8 < z.std() < 1.2
  t = np.sort((p - c.diffusion.eps) / (1 - c.diffusion.eps))
  assert np.max(np.abs(t - (np.arange(t.size) + 0.5) / t.size)) < 1.63 / np.sqrt(t.size)  # KS 1%


def test_same_seed_same_masked_batch_other_seed_other_noise(config, stream):
  again = _take(config, 1)[0]
  for k in stream[0]:
    np.testing.assert_array_equal(again[k], stream[0][k])
  other = config.copy_and_resolve_references()
  other.seed = 1
  assert not np.array_equal(_take(other, 1)[0]["masked"], stream[0]["masked"])


@pytest.mark.parametrize("k", [1, 3, 6])
def test_resume_at_step_k_equals_the_uninterrupted_stream(config, stream, k):
  resumed = _take(config, 2, start_step=k)
  for step, batch in enumerate(resumed, start=k):
    for name in batch:
      np.testing.assert_array_equal(batch[name], stream[step][name], err_msg=f"{name} step {step}")


def test_num_shards_layout_and_shard_disjointness(config, stream):
  c = config.copy_and_resolve_references()
  c.data.num_shards = 4
  batch = _take(c, 1)[0]
  rows = [bytes(r) for r in batch["targets"]]
  assert len(set(rows)) == len(rows)
  with pytest.raises(ConfigError, match="data.num_shards=3"):
    c.data.num_shards = 3
    pipeline.host_layout(c, ONE_DEVICE)


def test_validation_is_held_out_and_fixed(config):
  splits = corpora.split_text("tinyshakespeare")
  assert abs(len(splits["validation"]) / sum(map(len, splits.values())) - 0.1) < 0.01
  first = pipeline.eval_batches(config, ONE_DEVICE, 1)[0]
  second = pipeline.eval_batches(config, ONE_DEVICE, 1)[0]
  for row in np.asarray(first["targets"]):
    text = _decode(config, row)
    assert text in splits["validation"] and text not in splits["train"]
  for k in first:
    np.testing.assert_array_equal(first[k], second[k])


def _docs(tmp_path):
  docs = ["alpha beta gamma delta " * (i % 5 + 1) + f"doc {i}" for i in range(40)]
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
  return docs, path


def _epoch_rows(config):
  """Every validation row of one pass (no shuffle, no repeat)."""
  return [np.asarray(b["targets"]) for b in pipeline.eval_batches(config, ONE_DEVICE, 10_000)]


def test_chunking_keeps_the_token_stream_in_order(config, tmp_path):
  docs, path = _docs(tmp_path)
  registry.register_text_task("docs_chunk", [path], [path], text_field="body")
  c = config.copy_and_resolve_references()
  c.data.update(task="docs_chunk", batch_size=2)
  stream = np.concatenate([r.reshape(-1) for r in _epoch_rows(c)])
  vocab = get_vocabulary(c)
  expected = np.concatenate([vocab.encode(d) + [vocab.eos_id] for d in docs])
  np.testing.assert_array_equal(stream, expected[: stream.size])
  assert expected.size - stream.size < 32 * 2  # at most the last partial batch is dropped


def test_packing_keeps_every_token_once_with_segments_and_positions(config, tmp_path):
  docs, path = _docs(tmp_path)
  registry.register_text_task("docs_pack", [path], [path], text_field="body")
  c = config.copy_and_resolve_references()
  c.data.update(task="docs_pack", packing="pack", batch_size=1)
  vocab = get_vocabulary(c)
  expected = {}
  for d in docs:  # documents longer than the row are split into row-length pieces
    ids = vocab.encode(d) + [vocab.eos_id]
    for i in range(0, len(ids), 32):
      expected[tuple(ids[i : i + 32])] = expected.get(tuple(ids[i : i + 32]), 0) + 1
  seen = {}
  for b in pipeline.eval_batches(c, ONE_DEVICE, 10_000):
    targets, seg, pos = (np.asarray(b[k])[0] for k in ("targets", "segment_ids", "positions"))
    for s in set(seg) - {0}:
      piece = targets[seg == s]
      np.testing.assert_array_equal(pos[seg == s], np.arange(piece.size))
      seen[tuple(piece)] = seen.get(tuple(piece), 0) + 1
    assert np.all(targets[seg == 0] == 0) and not np.any(np.asarray(b["valid"])[0][seg == 0])
  assert seen == expected


def test_gsm8k_sft_rows(config):
  c = config.copy_and_resolve_references()
  c.data.update(task="gsm8k_sft", sequence_length=512, batch_size=4)
  c.model.max_sequence_length = 512
  batch = _take(c, 1)[0]
  vocab = get_vocabulary(c)
  for row, plen, masked in zip(batch["targets"], batch["prompt_length"], batch["masked"]):
    prompt, response = vocab.decode(row[:plen].tolist()), row[plen:]
    assert prompt.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    text = vocab.decode(response[response != vocab.eos_id].tolist())
    assert "####" in text and text.endswith("<|eot_id|>") and "<<" not in text
    assert response[-1] == vocab.eos_id and not masked[:plen].any()


def test_mixture_draws_from_both_corpora(config):
  c = config.copy_and_resolve_references()
  c.data.update(task="corpora", batch_size=64)
  rows = [_decode(c, r) for r in _take(c, 1)[0]["targets"]]
  shakespeare, gutenberg = (corpora.split_text(n)["train"] for n in corpora.CORPUS_FILES)
  from_s = sum(r in shakespeare for r in rows)
  from_g = sum(r in gutenberg for r in rows)
  assert from_s + from_g == 64 and from_s >= 2 and from_g >= 30  # rates 1.1 MB : 5.1 MB


def test_device_masking_leaves_noise_to_the_step(config):
  c = config.copy_and_resolve_references()
  c.data.masking = "device"
  assert set(_take(c, 1)[0]) == {"targets", "segment_ids", "positions", "valid"}


def test_register_text_task_reads_txt_paragraphs(config, tmp_path):
  text = "First paragraph,\nstill first.\n\nSecond one.\n\n"
  (tmp_path / "a.txt").write_text(text * 50)
  registry.register_text_task("txt_task", [tmp_path / "a.txt"], [tmp_path / "a.txt"])
  c = config.copy_and_resolve_references()
  c.data.update(task="txt_task", batch_size=2)
  rows = _epoch_rows(c)
  joined = "".join(_decode(c, r) for rows_ in rows for r in rows_)
  assert joined and (text * 50).startswith(joined)


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "holds no records"),
        (b"\xff\xfe bad bytes", "undecodable byte at offset 0"),
        (b'{"body": "ok"}\n{"other": 1}\n', "bad.jsonl:2: no string field 'body'"),
        (b'{"body": "ok"}\nnot json\n', "bad.jsonl:2: not a JSON object"),
    ],
)
def test_bad_files_give_one_line_errors(config, tmp_path, content, needle):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(content)
  registry.register_text_task("bad_task", [path], [path], text_field="body")
  c = config.copy_and_resolve_references()
  c.data.task = "bad_task"
  with pytest.raises(ConfigError, match=needle):
    _take(c, 1)


def test_missing_file_unknown_task_and_too_short_sft(config, tmp_path):
  with pytest.raises(ConfigError, match="is not a file"):
    registry.register_text_task("missing", [tmp_path / "nope.txt"])
  c = config.copy_and_resolve_references()
  c.data.task = "no_such_task"
  with pytest.raises(ConfigError, match="registered: .*gsm8k_sft.*tinyshakespeare"):
    _take(c, 1)
  c.data.task = "gsm8k_sft"
  with pytest.raises(ConfigError, match="none of its 7473 train examples fits"):
    _take(c, 1)


@pytest.mark.parametrize("vocabulary, mask_id", [("byte", 259), ("spm8k", 8000)])
def test_vocabulary_round_trips_text_and_its_tf_ops(config, vocabulary, mask_id):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  c = config.copy_and_resolve_references()
  c.data.vocabulary, c.tokens.mask_id, c.model.vocab_size = vocabulary, mask_id, mask_id + 64
  vocab = get_vocabulary(c)
  text = corpora.split_text("gutenberg")["validation"][:2000] + "  café 😀\tend\n\n"
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text and max(ids) < mask_id
  assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == text


def test_vocabulary_ids_must_match_the_config(config):
  c = config.copy_and_resolve_references()
  c.tokens.eos_id = 2
  with pytest.raises(ConfigError, match="tokens.eos_id=2 is not allowed"):
    get_vocabulary(c)


def test_unigram_entropy_is_the_byte_entropy():
  bits = corpora.unigram_entropy_bits("tinyshakespeare")
  assert 4.5 < bits < 5.0  # 65 distinct characters, English letter frequencies
  assert corpora.bits_per_byte(np.log(2.0)) == pytest.approx(1.0)


def _run_two_processes(tmp_path, layout):
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  worker = pathlib.Path(__file__).parent / "multiprocess" / "data_worker.py"
  procs = [
      subprocess.Popen(
          [sys.executable, str(worker), str(i), str(port), str(tmp_path), layout],
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
      )
      for i in range(2)
  ]
  for proc in procs:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]
  return [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(2)]


def _micro_config(**data):
  spec = importlib.util.spec_from_file_location(
      "micro", pathlib.Path(__file__).parent / "configs" / "micro.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.update(data)
  return c


def _mesh_sharding(config):
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top

  from llada_jax.parallel.sharding import axis_rules, batch_sharding  # pylint: disable=g-import-not-at-top

  mesh = Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
  return batch_sharding(mesh, axis_rules(config))


def test_two_processes_read_disjoint_shards_whose_union_is_the_global_batch(tmp_path):
  """2 processes x 4 CPU devices (gloo): process p holds rows 4p..4p+3 and reads shard p of 2;
  together they give exactly the batches one process with 8 devices and num_shards=2 sees."""
  rows = _run_two_processes(tmp_path, "data")
  config = _micro_config(num_shards=2)
  reference = _take(config, 3, sharding=_mesh_sharding(config))
  for step, batch in enumerate(reference):
    for name, value in batch.items():
      got = np.concatenate(
          [rows[p][f"{step}/{name}/{r}"] for p in (0, 1) for r in range(4 * p, 4 * p + 4)]
      )
      np.testing.assert_array_equal(got, value, err_msg=f"{name} step {step}")
    first, second = (bytes(batch["targets"][4 * p : 4 * p + 4]) for p in (0, 1))
    assert first != second


@pytest.mark.slow  # test_two_processes_read_disjoint_shards_... runs in make test
def test_processes_of_one_model_replica_get_identical_data(tmp_path):
  """With the tensor axis across the two processes both hold every row: same data on both."""
  rows = _run_two_processes(tmp_path, "tensor")
  reference = _take(_micro_config(), 3)  # one process, num_shards -1 -> 1 shard
  for step, batch in enumerate(reference):
    for name, value in batch.items():
      for p in (0, 1):
        got = np.concatenate([rows[p][f"{step}/{name}/{r}"] for r in range(0, 8, 2)])
        np.testing.assert_array_equal(got, value, err_msg=f"{name} step {step} process {p}")


def test_spm8k_pipeline_rows_are_corpus_text(config):
  c = config.copy_and_resolve_references()
  c.data.update(vocabulary="spm8k", task="gutenberg")
  c.tokens.mask_id, c.model.vocab_size = 8000, 8064
  batch = _take(c, 1)[0]
  gutenberg = corpora.split_text("gutenberg")["train"]
  for row in batch["targets"]:
    assert _decode(c, row) in gutenberg
  assert np.all(batch["inputs"][batch["masked"]] == 8000)
  c.tokens.mask_id = 7999
  with pytest.raises(ConfigError, match="tokens.mask_id=7999"):
    from llada_jax.config import validate  # pylint: disable=g-import-not-at-top

    validate(c)


def test_pretokenized_shards_give_the_stream_of_the_text_task(config, tmp_path):
  """The bundled corpus through llada-preprocess shards: the same rows as tokenizing on the fly
  (documents go to files round-robin, as seqio shards records), and a vocabulary check."""
  from llada_jax.data import pretokenized  # pylint: disable=g-import-not-at-top

  path = tmp_path / "shakespeare.txt"
  path.write_text(corpora.split_text("tinyshakespeare")["validation"])
  pretokenized.write_shards(
      [str(path)],
      str(tmp_path / "shards"),
      pretokenized.VocabularySpec("byte"),
      num_shards=2,
      num_workers=1,
  )
  registry.register_pretokenized_task(
      "shakespeare_shards", str(tmp_path / "shards"), str(tmp_path / "shards"), append_eos=False
  )
  registry.register_text_task("shakespeare_text", [path], [path])
  c = config.copy_and_resolve_references()
  c.data.update(num_shards=2, batch_size=4)
  rows = {}
  for task in ("shakespeare_shards", "shakespeare_text"):
    c.data.task = task
    rows[task] = np.concatenate(_epoch_rows(c))
  assert rows["shakespeare_text"].shape[0] > 100
  np.testing.assert_array_equal(rows["shakespeare_shards"], rows["shakespeare_text"])
  c.data.update(task="shakespeare_shards", vocabulary="spm8k")
  c.tokens.mask_id, c.model.vocab_size = 8000, 8064
  with pytest.raises(ConfigError, match="tokenized with 'byte'"):
    _take(c, 1)


def _late_resume_matches(c, step=50):
  """Batch `step` (and the next) resumed on one process, and on two processes each reading one of
  the two shards (the host layout of a 2-process job), equal the uninterrupted stream's."""
  uninterrupted = _take(c, step + 2)
  resumed = _take(c, 2, start_step=step)
  per_shard = c.data.batch_size // 2
  hosts = [
      pipeline._feature_dataset(
          c, pipeline.HostLayout(2, per_shard, (p,)), "train", True, step
      ).as_numpy_iterator()
      for p in (0, 1)
  ]
  for offset in (0, 1):
    on_two = [next(host) for host in hosts]
    for name, value in uninterrupted[step + offset].items():
      np.testing.assert_array_equal(resumed[offset][name], value, err_msg=f"{name} +{offset}")
      np.testing.assert_array_equal(
          np.concatenate([h[name] for h in on_two]),
          value,
          err_msg=f"{name} +{offset} on two processes",
      )
  return uninterrupted


def test_late_resume_is_exact_across_epochs_and_host_counts(config, tmp_path):
  """A 2-shard stream of ~9 steps per epoch and windows of 16 rows, resumed at step 50 (epoch 5)."""
  _, path = _docs(tmp_path)
  registry.register_text_task("docs_resume", [path], text_field="body")
  c = config.copy_and_resolve_references()
  c.data.update(task="docs_resume", num_shards=2, shuffle_buffer=16)
  stream = _late_resume_matches(c)
  rows = [bytes(r) for b in stream for r in b["targets"]]
  assert len(set(rows)) < len(rows) // 4  # several epochs went by


def test_late_resume_of_indexed_pretokenized_shards(config, tmp_path, monkeypatch):
  """llada-preprocess shards (index entries every 4 documents, so a resume seeks into a file)
  resumed at step 50, on one and on two processes; their epoch is the chunked token stream."""
  from llada_jax.data import pretokenized  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(pretokenized, "INDEX_EVERY", 4)
  docs, path = _docs(tmp_path)
  pretokenized.write_shards(
      [str(path)],
      str(tmp_path / "shards"),
      pretokenized.VocabularySpec("byte"),
      num_shards=4,
      num_workers=1,
      text_field="body",
  )
  registry.register_pretokenized_task("docs_shards", str(tmp_path / "shards"))
  c = config.copy_and_resolve_references()
  c.data.update(task="docs_shards", num_shards=2, shuffle_buffer=16)
  stream = _late_resume_matches(c)
  vocab = get_vocabulary(c)
  rows = {}
  for shard in (0, 1):  # shard s reads files s and s + 2: documents d with d % 4 in {s, s + 2}
    tokens = np.concatenate(
        [
            vocab.encode(docs[d]) + [vocab.eos_id]
            for f in (shard, shard + 2)
            for d in range(f, len(docs), 4)
        ]
    )
    rows[shard] = {
        bytes(r) for r in tokens[: tokens.size // 32 * 32].astype(np.int32).reshape(-1, 32)
    }
  for batch in stream:
    for half, shard in ((batch["targets"][:4], 0), (batch["targets"][4:], 1)):
      assert {bytes(r) for r in half} <= rows[shard]


def test_resume_reads_one_window_whatever_the_step(config, monkeypatch):
  """Resuming at step 10^9 reads the batch's window of rows, and at most the next one that the
  input pipeline's read-ahead may start (not 10^9 batches' worth)."""
  from llada_jax.data import streams  # pylint: disable=g-import-not-at-top

  read = []
  original = streams.MemoryRows.read
  monkeypatch.setattr(
      streams.MemoryRows,
      "read",
      lambda self, start, stop: read.append(stop - start) or original(self, start, stop),
  )
  batch = _take(config, 1, start_step=10**9)[0]
  assert batch["targets"].shape == (8, 32) and sum(read) <= 2 * config.data.shuffle_buffer


@pytest.mark.parametrize("rates", [None, (1.0, 3.0)])
def test_stream_from_any_example_is_the_stream_from_zero(rates):
  """WindowedStream (37 rows, windows of 5) and a mixture of two: chunks(i) continues the stream
  read from 0 at i, across windows, epochs and mixture blocks."""
  from llada_jax.data import streams  # pylint: disable=g-import-not-at-top

  def windowed(n, key):
    return streams.WindowedStream(
        streams.MemoryRows({"targets": np.arange(n)[:, None] + key}), 5, (0, 1, 2, key)
    )

  stream = windowed(37, 0)
  if rates:
    stream = streams.MixedStream([stream, windowed(11, 1000)], rates, 8, (0, 1, 2, 9), "ab")

  def read(first, count):
    out = []
    for chunk in stream.chunks(first):
      out.extend(chunk["targets"][:, 0])
      if len(out) >= count:
        return np.array(out[:count])

  everything = read(0, 400)
  if not rates:
    assert sorted(everything[:37]) == list(range(37))
  for first in (1, 4, 5, 36, 37, 38, 123, 250):
    np.testing.assert_array_equal(read(first, 150), everything[first : first + 150], err_msg=first)


@pytest.mark.parametrize(
    "task, letters, held_out, first_held_out",
    # reverse_sft's held-out words as written before reverse_az_sft joined it (commit 7d03ccb)
    [
        ("reverse_sft", "abcdef", 40, "ebb>"),
        ("reverse_az_sft", "abcdefghijklmnopqrstuvwxyz", 400, None),
    ],
)
def test_reversal_tasks_hold_every_word_once_split_by_a_fixed_permutation(
    task, letters, held_out, first_held_out
):
  """Each reversal task holds every three-letter word over its alphabet exactly once, `held_out`
  of them in the validation split, each answered by its letters in reverse order then EOS."""
  spec = registry.lookup(task)
  assert spec.kind == "sft" and spec.append_eos
  splits = {s: spec.reader(s) for s in ("train", "validation")}
  assert len(splits["validation"]) == held_out
  prompts = [r["prompt"] for s in splits.values() for r in s]
  everything = {a + b + c + ">" for a in letters for b in letters for c in letters}
  assert len(prompts) == len(set(prompts)) and set(prompts) == everything
  for r in splits["train"] + splits["validation"]:
    assert r["response"] == "".join(reversed(r["prompt"][:3]))
  if first_held_out:
    assert splits["validation"][0]["prompt"] == first_held_out
