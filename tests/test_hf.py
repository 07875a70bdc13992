"""HF LLaDA checkpoints: import against an independent NumPy forward, byte-identical round trips,
sharded folders, and one-line errors for bad folders."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import cli_env, make_tiny_config
from hf_fixtures import P, hf_tensors, write_folder
from llada_jax.errors import CheckpointError
from llada_jax.interop import safetensors_io
from llada_jax.interop.hf_checkpoint import load_hf, save_hf
from llada_jax.model import logits


def _rms(x, w, eps):
  return w * x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)


def _rope(x, theta):
  t, _, hd = x.shape
  inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  ang = np.concatenate([np.arange(t)[:, None] * inv] * 2, -1)[:, None, :]
  rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
  return x * np.cos(ang) + rot * np.sin(ang)


def _numpy_llada(t, config, ids):
  """Independent float64 forward of the official architecture from PyTorch-layout weights."""
  m = config.model
  h, k = m.n_heads, m.n_kv_heads
  hd = m.d_model // h
  g = {n: w.astype(np.float64) for n, w in t.items()}
  x = g[P + "wte.weight"][ids]
  for i in range(m.n_layers):
    b = f"{P}blocks.{i}."
    z = _rms(x, g[b + "attn_norm.weight"], m.rms_norm_eps)
    q = _rope((z @ g[b + "q_proj.weight"].T).reshape(len(ids), h, hd), m.rope_theta)
    kk = _rope((z @ g[b + "k_proj.weight"].T).reshape(len(ids), k, hd), m.rope_theta)
    vv = (z @ g[b + "v_proj.weight"].T).reshape(len(ids), k, hd)
    kk, vv = np.repeat(kk, h // k, axis=1), np.repeat(vv, h // k, axis=1)
    s = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out = np.einsum("hts,shd->thd", a, vv).reshape(len(ids), h * hd)
    x = x + out @ g[b + "attn_out.weight"].T
    z = _rms(x, g[b + "ff_norm.weight"], m.rms_norm_eps)
    gate, up = z @ g[b + "ff_proj.weight"].T, z @ g[b + "up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ g[b + "ff_out.weight"].T
  return _rms(x, g[P + "ln_f.weight"], m.rms_norm_eps) @ g[P + "ff_out.weight"].T


@pytest.mark.parametrize("scan_layers", [True, False])
def test_import_matches_numpy_reference_forward(tmp_path, scan_layers):
  config = make_tiny_config(n_heads=4, n_kv_heads=2, scan_layers=scan_layers)
  tensors = hf_tensors(config)
  folder = write_folder(tmp_path / "hf", config, tensors)
  loaded_config, params = load_hf(folder, base=config)
  for field in (
      "vocab_size",
      "d_model",
      "n_layers",
      "n_heads",
      "n_kv_heads",
      "mlp_hidden_size",
      "rope_theta",
      "rms_norm_eps",
      "scan_layers",
  ):
    assert loaded_config.model[field] == config.model[field], field
  assert loaded_config.tokens.mask_id == config.tokens.mask_id
  ids = np.asarray([5, 17, 42, 259, 259, 7, 99, 3])
  got = np.asarray(logits(loaded_config, params, jnp.asarray([ids])))[0]
  want = _numpy_llada(tensors, config, ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize(
    "dtype,save_as", [(np.float32, "float32"), (ml_dtypes.bfloat16, "bfloat16")]
)
def test_round_trip_is_byte_identical(tmp_path, dtype, save_as):
  config = make_tiny_config()
  tensors = hf_tensors(config, dtype=dtype)
  folder = write_folder(tmp_path / "in", config, tensors, shards=3)
  loaded_config, params = load_hf(folder, base=config)
  files = save_hf(loaded_config, params, tmp_path / "out", max_shard_size="20KB", dtype=save_as)
  assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
  _, again = load_hf(tmp_path / "out", base=config)
  written = {}
  for file in files:
    written.update(dict(safetensors_io.iter_tensors(file)))
  assert sorted(written) == sorted(tensors)
  for name, tensor in tensors.items():
    assert written[name].dtype == tensor.dtype and written[name].tobytes() == tensor.tobytes()
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_single_file_export_and_hf_config_fields(tmp_path):
  config = make_tiny_config()
  folder = write_folder(tmp_path / "in", config, hf_tensors(config))
  loaded, params = load_hf(folder, base=config, dtype="bfloat16")
  assert jax.tree.leaves(params)[0].dtype == ml_dtypes.bfloat16
  files = save_hf(loaded, params, tmp_path / "out")
  assert [f.name for f in files] == ["model.safetensors"]
  hf = json.loads((tmp_path / "out" / "config.json").read_text())
  assert hf["n_kv_heads"] == 2 and hf["mask_token_id"] == 259 and hf["weight_tying"] is False


def _good_folder(tmp_path):
  config = make_tiny_config()
  return config, write_folder(tmp_path / "hf", config, hf_tensors(config))


def test_missing_files_are_named(tmp_path):
  config, folder = _good_folder(tmp_path)
  (folder / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="model.safetensors is missing"):
    load_hf(folder, base=config)
  with pytest.raises(CheckpointError, match="no config.json"):
    load_hf(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "field,value",
    [
        ("alibi", True),
        ("include_bias", True),
        ("attention_layer_norm", True),
        ("block_type", "sequential"),
    ],
)
def test_unsupported_features_are_named(tmp_path, field, value):
  config, folder = _good_folder(tmp_path)
  hf = json.loads((folder / "config.json").read_text())
  hf[field] = value
  (folder / "config.json").write_text(json.dumps(hf))
  with pytest.raises(CheckpointError, match=f"{field}={value!r} is not supported"):
    load_hf(folder, base=config)


def test_corrupted_and_truncated_files_are_named(tmp_path):
  config, folder = _good_folder(tmp_path)
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated"):
    load_hf(folder, base=config)
  (folder / "model.safetensors").write_bytes(b"\xff" * 16)
  with pytest.raises(CheckpointError, match="corrupted safetensors header"):
    load_hf(folder, base=config)


def test_missing_unknown_and_misshapen_tensors_are_named(tmp_path):
  config = make_tiny_config()
  tensors = hf_tensors(config)
  missing = dict(tensors)
  del missing[P + "blocks.1.up_proj.weight"]
  with pytest.raises(CheckpointError, match="lacks tensor model.transformer.blocks.1.up_proj"):
    load_hf(write_folder(tmp_path / "a", config, missing), base=config)
  extra = dict(tensors, **{P + "blocks.0.q_norm.weight": np.ones(4, np.float32)})
  with pytest.raises(CheckpointError, match="unexpected tensor .*q_norm"):
    load_hf(write_folder(tmp_path / "b", config, extra), base=config)
  bad = dict(tensors, **{P + "ln_f.weight": np.ones(3, np.float32)})
  with pytest.raises(CheckpointError, match="ln_f.weight has shape"):
    load_hf(write_folder(tmp_path / "c", config, bad), base=config)


def test_convert_command_lines_round_trip_and_sample(tmp_path):
  import os
  import pathlib
  import subprocess
  import sys

  config = make_tiny_config()
  tensors = hf_tensors(config)
  folder = write_folder(tmp_path / "hf", config, tensors)
  root = pathlib.Path(__file__).resolve().parents[1]
  env = cli_env()

  def run(*args):
    result = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  workdir, out = tmp_path / "work", tmp_path / "out"
  run(
      "llada_jax.convert",
      "from-hf",
      f"--hf_dir={folder}",
      f"--workdir={workdir}",
      "--dtype=float32",
  )
  run("llada_jax.convert", "to-hf", f"--workdir={workdir}", f"--out={out}", "--dtype=float32")
  written = dict(safetensors_io.iter_tensors(out / "model.safetensors"))
  assert all(written[n].tobytes() == t.tobytes() for n, t in tensors.items())
  sample_args = (
      "--prompt_ids=5,6,7",
      "--gen_length=8",
      "--steps=8",
      "--block_length=8",
      "--remasking=low_confidence",
      "--temperature=0",
  )
  from_workdir = run("llada_jax.sample", f"--checkpoint={workdir}", *sample_args).stdout
  from_hf = run("llada_jax.sample", f"--checkpoint={folder}", *sample_args).stdout
  assert '{"tokens": [[' in from_hf and from_hf == from_workdir


# In make test: test_convert_command_lines_round_trip_and_sample, and test_llama_import's init_from.
@pytest.mark.slow
def test_train_fine_tunes_from_a_converted_checkpoint(tmp_path):
  import os
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[1]
  sys.path.insert(0, str(root / "tests" / "configs"))
  import micro  # pylint: disable=g-import-not-at-top

  config = micro.get_config()
  folder = write_folder(tmp_path / "hf", config, hf_tensors(config))
  env = cli_env()
  workdir = tmp_path / "work"
  for args in (
      (
          "llada_jax.convert",
          "from-hf",
          f"--hf_dir={folder}",
          f"--workdir={workdir}",
          "--dtype=float32",
      ),
      (
          "llada_jax.train",
          f"--config={root / 'tests' / 'configs' / 'micro.py'}",
          f"--workdir={workdir}",
      ),
  ):
    result = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from the checkpoint at step 0" in result.stderr
  assert "step 3 |" in result.stderr


def test_import_holds_the_parameters_and_about_one_source_tensor_at_a_time(tmp_path):
  """A 16-layer folder whose files hold 73x its largest tensor: the import's peak host memory
  (tracemalloc sees NumPy's buffers and the reader's) is the finished parameters plus a few
  tensors (the reader's transient copy of the one read, its converted copy, the previous one
  until the loop rebinds it), never a second copy of the whole checkpoint."""
  import tracemalloc  # pylint: disable=g-import-not-at-top

  config = make_tiny_config(n_layers=16, d_model=128, mlp_hidden_size=256)
  tensors = hf_tensors(config)
  folder = write_folder(tmp_path / "hf", config, tensors, shards=2)
  total, largest = (
      sum(t.nbytes for t in tensors.values()),
      max(t.nbytes for t in tensors.values()),
  )
  assert total > 70 * largest
  tracemalloc.start()
  try:
    before = tracemalloc.get_traced_memory()[0]
    _, params = load_hf(folder, base=config)
    peak = tracemalloc.get_traced_memory()[1] - before
  finally:
    tracemalloc.stop()
  assert sum(p.nbytes for p in jax.tree.leaves(params)) == total
  assert total <= peak < total + 4 * largest, (peak, total, largest)
