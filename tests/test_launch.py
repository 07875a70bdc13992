"""Pod launchers: each dry run prints the command it would run, with the job's coordinates."""

import os
import pathlib
import subprocess
import sys

LAUNCH = pathlib.Path(__file__).parent.parent / "launch"


def _dry_run(*args):
  result = subprocess.run([*args], capture_output=True, text=True, check=False, timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_local_dry_run_gives_every_process_its_id_and_the_coordinator():
  out = _dry_run(
      LAUNCH / "local.sh",
      "--dry_run",
      "3",
      "2",
      "--",
      "python",
      "-m",
      "llada_jax.train",
      "--config=configs/tiny.py",
  ).splitlines()
  assert len(out) == 3
  port = out[0].split("JAX_COORDINATOR_ADDRESS=127.0.0.1:")[1].split()[0]
  for i, line in enumerate(out):
    assert f"JAX_PROCESS_ID={i} " in line and "JAX_NUM_PROCESSES=3" in line
    assert f"127.0.0.1:{port}" in line and "device_count=2" in line


def test_local_keeps_the_callers_xla_flags_and_sets_its_own_device_count():
  """The suite's XLA_FLAGS hold 8 devices and its compilation settings: each process keeps the
  settings and has the 2 devices it was given."""
  script = "import os, jax; print(jax.local_device_count(), os.environ['XLA_FLAGS'])"
  assert "device_count=8" in os.environ["XLA_FLAGS"]
  out = _dry_run(LAUNCH / "local.sh", "2", "2", "--", sys.executable, "-c", script).splitlines()
  assert sorted(line.split()[:2] for line in out) == [["[0]", "2"], ["[1]", "2"]], out
  for line in out:
    assert "--xla_backend_optimization_level=0" in line, line


def test_tpu_vm_dry_run_runs_on_all_workers_with_auto_discovery():
  out = _dry_run(
      LAUNCH / "tpu_vm.sh",
      "--dry_run",
      "my-tpu",
      "us-central2-b",
      "--",
      "--config=configs/llada_8b.py",
      "--workdir=gs://b/r",
  )
  assert out.startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all")
  assert "LLADA_AUTO_DISTRIBUTED=1" in out and "--workdir=gs://b/r" in out


def test_slurm_dry_run_takes_the_coordinator_from_the_first_node():
  out = _dry_run("bash", LAUNCH / "slurm.sbatch", "--dry_run", "--config=configs/llada_8b.py")
  assert out.startswith("srun --ntasks=4 --ntasks-per-node=1")
  assert "JAX_COORDINATOR_ADDRESS=node0:12345" in out and "SLURM_PROCID" in out


def test_gke_dry_run_renders_the_jobset():
  out = _dry_run(
      LAUNCH / "gke.sh",
      "--dry_run",
      "llada8b",
      "img:1",
      "tpu-v5p-slice",
      "4x4x4",
      "16",
      "4",
      "--",
      "--config=configs/llada_8b.py",
  )
  assert "kind: JobSet" in out and "parallelism: 16" in out and "google.com/tpu: 4" in out
  assert 'args: ["python -m llada_jax.train --config=configs/llada_8b.py"]' in out
  assert "${" not in out


def test_launchers_reject_missing_arguments():
  for script in ("local.sh", "tpu_vm.sh", "gke.sh"):
    result = subprocess.run(
        [LAUNCH / script, "--dry_run"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and result.stderr.startswith("usage:")
