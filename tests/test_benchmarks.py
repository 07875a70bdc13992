"""The CPU benchmarks run at their CI size (--small) and write the JSON rows docs/performance.md
quotes; speeds are only checked to be positive (speed goals live in the benchmarks, not here)."""

import json
import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *flags: str) -> None:
  result = subprocess.run(
      [sys.executable, str(BENCHMARKS / script), "--small", *flags],
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]


def test_train_step_benchmark_reports_throughput_and_flops(tmp_path):
  _run("train_step.py", f"--json={tmp_path / 'train.json'}")
  report = json.loads((tmp_path / "train.json").read_text())
  assert report["device"] and [r["remat"] for r in report["rows"]] == ["none"]
  for row in report["rows"]:
    assert row["tokens_per_s"] > 0 and row["tflops_per_device"] > 0 and row["step_ms"] > 0


def test_sampler_benchmark_compares_modes_with_exact_decoding(tmp_path):
  _run("sampler.py", "--modes=exact,t1.0", f"--json={tmp_path / 'sampler.json'}")
  rows = json.loads((tmp_path / "sampler.json").read_text())["rows"]
  assert [(r["batch"], r["mode"]) for r in rows] == [
      (b, m) for b in (1, 4) for m in ("exact", "t1.0")
  ]
  assert all(r["tokens_per_s"] > 0 for r in rows)
  assert all(r["agreement"] == 1.0 for r in rows)  # τ = 1 commits one token a step: exact
  assert all(-1 < r["outside_forward"] < 1 for r in rows if r["mode"] == "exact")
