"""The CPU benchmarks run at their CI size (--small) and write the JSON rows docs/performance.md
quotes. Speeds cannot be checked (speed goals live in the benchmarks, not here); what a row
derives from them can: its FLOPs are the model's, counted here by hand from configs/tiny.py
(docs/llada.md, "Model FLOPs and MFU"), and its rates are one measured time seen several ways."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *flags: str) -> str:
  result = subprocess.run(
      [sys.executable, str(BENCHMARKS / script), "--small", *flags],
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _matmul_weights():
  """N_matmul of configs/tiny.py: q, k, v, out and the three SwiGLU matrices of every layer, and
  the output head (the embedding is a lookup)."""
  m = tiny.get_config().model
  head_dim = m.d_model // m.n_heads
  attention = m.d_model * head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
  return m.n_layers * (attention + 3 * m.d_model * m.mlp_hidden_size) + m.d_model * m.vocab_size


def test_train_step_benchmark_reports_throughput_and_flops(tmp_path):
  stdout = _run("train_step.py", f"--json={tmp_path / 'train.json'}")
  devices = int(re.match(r"(\d+) x ", stdout).group(1))
  report = json.loads((tmp_path / "train.json").read_text())
  assert report["device"] and [r["remat"] for r in report["rows"]] == ["none"]
  c = tiny.get_config()
  m = c.model
  # Training FLOPs per token: 6 N_matmul + 12 n_layers S d (bidirectional attention, not halved).
  per_token = 6 * _matmul_weights() + 12 * m.n_layers * c.data.sequence_length * m.d_model
  for row in report["rows"]:
    assert (row["batch"], row["seq"]) == (c.data.batch_size, c.data.sequence_length)
    assert row["step_ms"] > 0
    seconds = row["step_ms"] / 1e3
    assert row["tokens_per_s"] == pytest.approx(row["batch"] * row["seq"] / seconds, rel=1e-9)
    assert row["tflops_per_device"] == pytest.approx(
        per_token * row["tokens_per_s"] / devices / 1e12, rel=1e-9
    )


def test_sampler_benchmark_compares_modes_with_exact_decoding(tmp_path):
  _run("sampler.py", "--modes=exact,t1.0", f"--json={tmp_path / 'sampler.json'}")
  rows = json.loads((tmp_path / "sampler.json").read_text())["rows"]
  assert [(r["batch"], r["mode"]) for r in rows] == [
      (b, m) for b in (1, 4) for m in ("exact", "t1.0")
  ]
  assert all(r["agreement"] == 1.0 for r in rows)  # τ = 1 commits one token a step: exact
  # A share of measured times: any value under load (the range is the benchmark's to report).
  assert all(np.isfinite(r["outside_forward"]) for r in rows if r["mode"] == "exact")
  m = tiny.get_config().model
  prompt, gen, steps = 16, 32, 32  # --small: a 16-token prompt, 32 tokens in 32 steps
  length = prompt + gen
  for exact, fast in zip(rows[::2], rows[1::2]):
    batch = exact["batch"]
    assert exact["tokens_per_s"] > 0 and fast["tokens_per_s"] > 0
    assert fast["speedup"] == pytest.approx(fast["tokens_per_s"] / exact["tokens_per_s"], rel=1e-9)
    # Exact decoding: `steps` forward passes over prompt + answer, 2 N_matmul per token plus
    # attention, 4 n_layers L^2 d per row; GFLOP/s over the time of batch x gen tokens.
    flops = (
        steps * batch * (2 * _matmul_weights() * length + 4 * m.n_layers * length**2 * m.d_model)
    )
    seconds = batch * gen / exact["tokens_per_s"]
    assert exact["gflops"] == pytest.approx(flops / seconds / 1e9, rel=1e-9)
