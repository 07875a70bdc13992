"""`llada-merge` (llada_jax/merge.py): the mean of checkpoints, chosen by step or by the lowest
validation bound in metrics.jsonl, written as a workdir that loads and samples and as an HF folder
that reads back with the same logits; every bad request is one line before any work.

Expected values come from NumPy over parameters restored separately (`checkpoint.load_params`
into `serving_abstract_params`), never from merge.py; the bounds are chosen by hand and written
by the trainer's MetricWriter (a slow test ranks the records of a real micro run)."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import cli_env, make_tiny_config
from llada_jax import checkpoint
from llada_jax.errors import CheckpointError, ConfigError
from llada_jax.loading import load_model, serving_abstract_params
from llada_jax.merge import RunningMean, merge
from llada_jax.model import logits
from llada_jax.sampling.text import sample
from llada_jax.training.metrics import Accounting, MetricWriter

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAVED = (10, 20, 30, 40, 50)
# Validation bounds by hand: the lowest two are 20 and 40, the lowest three add 30. Step 10 was
# first logged lowest of all and then again (a resumed run: the last value counts); step 30 has a
# hook's eval record after its bound (without the metric); step 50 has no eval record; step 60
# has the lowest bound but no checkpoint; a train record's loss_bound is not a validation value.
RECORDS = (
    {"step": 10, "split": "eval", "loss_bound": 1.0},
    {"step": 10, "split": "train", "loss": 5.0},
    {"step": 10, "split": "eval", "loss_bound": 3.0},
    {"step": 20, "split": "eval", "loss_bound": 2.5, "bits_per_byte": 3.6},
    {"step": 30, "split": "train", "loss_bound": 0.1},
    {"step": 30, "split": "eval", "loss_bound": 2.9},
    {"step": 30, "split": "eval", "piqa/acc": 0.5},
    {"step": 40, "split": "eval", "loss_bound": 2.7},
    {"step": 50, "split": "train", "loss": 2.0},
    {"step": 60, "split": "eval", "loss_bound": 0.5},
)


def write_steps(path: pathlib.Path, config: ml_collections.ConfigDict, steps) -> pathlib.Path:
  """A workdir holding checkpoints at `steps` of `config`'s model, each with its own parameters
  (the random initialisation plus noise of the step), made on one device."""
  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from llada_jax.training.state import create_train_state  # pylint: disable=g-import-not-at-top

  one = ml_collections.ConfigDict(config.to_dict())
  one.mesh.update(dict(data=-1, fsdp=1))
  state, _ = create_train_state(
      one,
      MaskedDiffusionLM(one),
      make_optimizer(one),
      make_mesh(one, jax.devices()[:1], check_batch=False),
  )
  saver = checkpoint.Checkpointer(path, config)
  for step in steps:
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(step), len(leaves))
    params = jax.tree.unflatten(
        tree,
        [
            (x.astype(np.float32) + 0.1 * jax.random.normal(k, x.shape)).astype(x.dtype)
            for x, k in zip(leaves, keys)
        ],
    )
    saver.save(step, state.replace(step=np.int32(step), params=params), force=True)
  saver.wait()
  saver.close()
  return path


def with_model(source: pathlib.Path, path: pathlib.Path, **model) -> pathlib.Path:
  """A workdir whose step 10 is `source`'s with these model settings in its stored config (the
  refusals come before any tensor is read)."""
  step = path / "checkpoints" / "10"
  shutil.copytree(source / "checkpoints" / "10", step)
  stored = json.loads((step / "config" / "metadata").read_text())
  stored["model"].update(model)
  (step / "config" / "metadata").write_text(json.dumps(stored))
  return path


def write_records(workdir: pathlib.Path, config: ml_collections.ConfigDict, records) -> None:
  """`records` written to metrics.jsonl by the trainer's MetricWriter (split "eval" as the
  "eval/" prefix), then a line cut short as by a kill mid-write."""
  writer = MetricWriter(workdir, Accounting.from_config(config))
  for record in records:
    scalars = {k: v for k, v in record.items() if k not in ("step", "split")}
    writer.write(record["step"], scalars, prefix="" if record["split"] == "train" else "eval/")
  writer.close()
  with open(workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 7')


def source_config(**model) -> ml_collections.ConfigDict:
  config = make_tiny_config(**model)
  config.mesh.update(dict(data=-1, fsdp=2))  # the trainer's layout: weights split over fsdp
  config.checkpoint.keep = 10
  return config


def host_params(workdir, step) -> dict[str, np.ndarray]:
  """{leaf path: float64 array} of one checkpoint, restored separately (replicated, one copy)."""
  config = checkpoint.load_config(workdir, step)
  params = checkpoint.load_params(workdir, step, serving_abstract_params(config))
  return flat(params)


def flat(params) -> dict[str, np.ndarray]:
  return {
      jax.tree_util.keystr(k): np.asarray(jax.device_get(v)).astype(np.float64)
      for k, v in jax.tree_util.tree_leaves_with_path(params)
  }


def assert_mean_of(params, workdir, steps) -> None:
  """`params` is the NumPy mean of the checkpoints at `steps`, to float32 rounding."""
  sources = [host_params(workdir, s) for s in steps]
  got = flat(params)
  assert got.keys() == sources[0].keys()
  for name, value in got.items():
    expected = np.mean([s[name] for s in sources], axis=0)
    np.testing.assert_allclose(value, expected, rtol=2e-6, atol=2e-7, err_msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Workdir a (float32, saved at SAVED, bounds of RECORDS), b (another d_model), c (QK-norm),
  d (bfloat16 parameters)."""
  root = tmp_path_factory.mktemp("merge_sources")
  a = write_steps(root / "a", source_config(), SAVED)
  write_records(a, source_config(), RECORDS)
  return {
      "a": a,
      "b": with_model(a, root / "b", d_model=32),
      "c": with_model(a, root / "c", qk_norm=True),
      "d": write_steps(root / "d", source_config(param_dtype="bfloat16"), (10, 20)),
  }


@pytest.fixture(scope="module")
def cli_merge(runs, tmp_path_factory) -> dict[str, pathlib.Path]:
  """`python -m llada_jax.merge --top_k=2` on one CPU device, writing a workdir and a float32 HF
  folder."""
  root = tmp_path_factory.mktemp("merge_cli")
  out, hf = root / "merged", root / "merged_hf"
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "llada_jax.merge",
          f"--workdir={runs['a']}",
          "--top_k=2",
          f"--out_workdir={out}",
          f"--out_hf={hf}",
          "--hf_dtype=float32",
          "--mesh=replicated",
      ],
      cwd=ROOT,
      env=cli_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "merged 2 checkpoint(s)" in result.stdout and "as step 40" in result.stdout
  return {"out": out, "hf": hf}


def test_two_steps_average_to_the_numpy_mean_on_the_trainers_8_device_layout(runs, tmp_path):
  out = tmp_path / "merged"
  result = merge([str(runs["a"])], steps=[30, 10], out_workdir=str(out))
  assert [(s.step, s.value) for s in result.sources] == [(10, 3.0), (30, 2.9)]
  assert_mean_of(result.params, runs["a"], (10, 30))
  # Restored and averaged on the stored mesh (fsdp=2 x data=4 of the 8 devices).
  embedding = result.params["wte"]["embedding"]
  assert len(embedding.sharding.device_set) == 8 and "fsdp" in str(embedding.sharding.spec)
  # The workdir: one checkpoint at the largest merged step, the source's model, a fresh state.
  assert checkpoint._complete_steps(out) == [30]  # pylint: disable=protected-access
  stored = checkpoint.load_config(out)
  assert stored.model.to_dict() == checkpoint.load_config(runs["a"], 30).model.to_dict()
  config, params = load_model(out)
  assert_mean_of(params, runs["a"], (10, 30))
  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from llada_jax.training.state import state_shardings  # pylint: disable=g-import-not-at-top

  abstract, _ = state_shardings(
      config, MaskedDiffusionLM(config), make_optimizer(config), make_mesh(config)
  )
  state = checkpoint.load_state(out, 30, abstract)
  assert int(state.step) == 30 and int(state.rollbacks) == 0 and float(state.lr_scale) == 1.0
  moments = [np.asarray(x) for x in jax.tree.leaves(state.opt_state)]
  assert all(not np.any(m) for m in moments)  # Adam moments and counts all 0
  record = json.loads((out / "merge.json").read_text())
  assert record["step"] == 30 and [s["step"] for s in record["sources"]] == [10, 30]


def test_one_step_is_that_step_bit_for_bit_in_its_stored_dtype(runs, tmp_path):
  result = merge([str(runs["d"])], steps=[20], out_workdir=str(tmp_path / "merged"))
  expected = checkpoint.load_params(
      runs["d"], 20, serving_abstract_params(checkpoint.load_config(runs["d"], 20))
  )
  for got, want in zip(jax.tree.leaves(result.params), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_top_k_takes_the_lowest_validation_bounds_of_saved_steps(runs, tmp_path):
  result = merge([str(runs["a"])], top_k=3, out_workdir=str(tmp_path / "m"), mesh="replicated")
  assert [(s.step, s.value) for s in result.sources] == [(20, 2.5), (30, 2.9), (40, 2.7)]
  assert_mean_of(result.params, runs["a"], (20, 30, 40))


def test_merged_workdir_samples_and_its_hf_folder_has_the_same_logits(runs, cli_merge):
  config, params = load_model(cli_merge["out"])
  assert_mean_of(params, runs["a"], (20, 40))  # --top_k=2 in the command line
  assert checkpoint.latest_step(cli_merge["out"]) == 40
  answer = sample(config, params, ids=[[70, 82, 79]], gen_length=8, steps=8, block_length=8)
  assert answer["tokens"] and all(0 <= t < config.model.vocab_size for t in answer["tokens"][0])
  hf_config, hf_params = load_model(cli_merge["hf"])
  ids = np.asarray([[70, 82, 79, config.tokens.mask_id, 65, config.tokens.mask_id]])
  np.testing.assert_allclose(
      np.asarray(logits(hf_config, hf_params, ids)),
      np.asarray(logits(config, params, ids)),
      rtol=1e-5,
      atol=1e-5,
  )


def test_a_non_float_leaf_is_the_newest_and_floats_are_summed_in_float32():
  running = RunningMean()
  for i, value in enumerate((256.0, 1.0, 1.0)):  # in bfloat16, 256 + 1 is 256
    running.add({"w": jax.numpy.full((3,), value, "bfloat16"), "n": jax.numpy.int32(i)})
  like = {"w": jax.ShapeDtypeStruct((3,), "bfloat16"), "n": jax.ShapeDtypeStruct((), "int32")}
  mean = running.mean(like)
  assert mean["w"].dtype == np.dtype("bfloat16") and int(mean["n"]) == 2
  np.testing.assert_array_equal(np.asarray(mean["w"], np.float32), 86.0)


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(workdirs=["a", "b"], steps=[10]), CheckpointError, "has model.d_model=64 but chec"),
        (dict(workdirs=["c", "a"], steps=[10]), CheckpointError, "has model.qk_norm=True but c"),
        (dict(workdirs=["a"], steps=[10, 25, 35]), ConfigError, "no checkpoint at step 25, 35; "),
        (dict(workdirs=["a"], top_k=5), ConfigError, "only 4 saved checkpoint(s) have an eval"),
        (dict(workdirs=["d"], top_k=1), ConfigError, "no saved checkpoint has an eval record"),
        (dict(workdirs=["a"]), ConfigError, "neither of --top_k and --steps"),
        (dict(workdirs=["a"], top_k=2, steps=[10]), ConfigError, "both of --top_k and --steps"),
        (dict(workdirs=["a", "a"], top_k=1), ConfigError, "is given twice"),
    ],
)
def test_refused_in_one_line(runs, tmp_path, kwargs, error, needle):
  workdirs = [str(runs[w]) for w in kwargs.pop("workdirs")]
  with pytest.raises(error) as raised:
    merge(workdirs, out_workdir=str(tmp_path / "out"), **kwargs)
  message = str(raised.value)
  assert needle in message and "\n" not in message, message
  if "step 25" in needle:
    assert message.endswith("its saved steps are 10, 20, 30, 40, 50")
  assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("flag", ["out_workdir", "out_hf"])
def test_an_existing_output_is_refused_before_anything_is_read(tmp_path, flag):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("saved")
  with pytest.raises(ConfigError, match=f"--{flag}=.* is not allowed: it exists and holds keep"):
    merge([str(tmp_path / "no_such_workdir")], top_k=1, **{flag: str(out)})
  assert (out / "keep.txt").read_text() == "saved"


def test_command_line_errors_are_one_line_with_exit_2(tmp_path):
  for args, needle in (
      ([f"--workdir={tmp_path}", f"--out_hf={tmp_path / 'h'}"], "neither of --top_k and --steps"),
      (["--workdir=x", "--steps=1,b", f"--out_hf={tmp_path / 'h'}"], "'b' is not a step"),
  ):
    result = subprocess.run(
        [sys.executable, "-m", "llada_jax.merge", *args],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and needle in result.stderr


@pytest.mark.slow
def test_top_k_of_a_trained_run_reads_the_trainers_eval_records(tmp_path):
  """End to end with the real trainer (22 s on 2 cores): its eval records at saved steps rank the
  checkpoints."""
  workdir = tmp_path / "run"
  trained = subprocess.run(
      [
          sys.executable,
          "-m",
          "llada_jax.train",
          f"--config={ROOT / 'tests' / 'configs' / 'micro.py'}",
          f"--workdir={workdir}",
          "--config.train.num_steps=3",
          "--config.train.eval_every=1",
          "--config.checkpoint.save_every=1",
          "--config.checkpoint.keep=3",
      ],
      cwd=ROOT,
      env=cli_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  bounds = {
      r["step"]: r["loss_bound"]
      for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
      if r["split"] == "eval"
  }
  assert sorted(bounds) == [1, 2, 3]
  best = sorted(sorted(bounds, key=bounds.get)[:2])
  result = merge([str(workdir)], top_k=2, out_workdir=str(tmp_path / "merged"))
  assert [s.step for s in result.sources] == best
  assert_mean_of(result.params, workdir, best)
