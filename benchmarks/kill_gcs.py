"""kill -9 a 2-process x 4-device training job writing to gs:// at random moments, then rerun it:
how many reruns end with the parameters of an uninterrupted run, bitwise?

  python benchmarks/kill_gcs.py --kills=20 [--steps=24 --seed=0]

Starts a local Cloud Storage server (tests/gcs_server.py, loopback only), trains the reference
run, then for each trial starts the same job in a new workdir, kills the whole job (both processes,
as a slice preemption does) with SIGKILL after a random delay — some trials first send SIGTERM and
kill during the preemption save — reruns the same command to the end and compares the final
parameters with the reference. Prints one line per trial and the count; JSON with --json.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position

from gcs_server import GCSServer, environment_for  # noqa: E402  pylint: disable=wrong-import-position

_KILLS = flags.DEFINE_integer("kills", 20, "Trials (each one kill, then a rerun).")
_STEPS = flags.DEFINE_integer("steps", 24, "Training steps of every run.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
_JSON = flags.DEFINE_string("json", "", "Also write the trials here.")


def command(workdir: str, steps: int) -> list[str]:
  """The 2-process x 4-device training job (launch/local.sh, gloo) of the micro config."""
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
      f"--config.train.num_steps={steps}",
      "--config.checkpoint.save_every=4",
      "--config.checkpoint.keep=2",
      "--config.checkpoint.async_save=True",
      "--config.optimizer.decay_fraction=0.0",
      "--config.train.log_every=1",
  ]


def run_to_end(workdir: str, steps: int, env: dict[str, str]) -> float:
  start = time.perf_counter()
  result = subprocess.run(
      command(workdir, steps),
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
  )
  if result.returncode:
    raise RuntimeError(f"{workdir}: exit {result.returncode}\n{result.stdout[-3000:]}")
  return time.perf_counter() - start


def interrupt(workdir: str, steps: int, env: dict[str, str], delay: float, term_first: bool) -> str:
  """Starts the job and kills it after `delay` s (SIGTERM first, then SIGKILL 0.5 s later, when
  term_first): what the job was doing is not known, which is the point."""
  proc = subprocess.Popen(
      command(workdir, steps),
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      start_new_session=True,
  )
  time.sleep(delay)
  if proc.poll() is not None:
    return "finished before the kill"
  if term_first:
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.5)
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()
  return "SIGTERM then SIGKILL" if term_first else "SIGKILL"


def final_params(workdir: str):
  import jax  # pylint: disable=g-import-not-at-top

  from llada_jax.loading import load_model_and_step  # pylint: disable=g-import-not-at-top

  step, _, params = load_model_and_step(workdir)
  return step, jax.device_get(params)


def main(argv: list[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  server = GCSServer()
  server.start()
  environment_for(server)
  env = dict(os.environ, **server.env())
  bucket = server.bucket("kills")
  steps = _STEPS.value
  try:
    seconds = run_to_end(f"{bucket}/reference", steps, env)
    reference_step, reference = final_params(f"{bucket}/reference")
    assert reference_step == steps
    print(f"reference: {steps} steps in {seconds:.0f} s", flush=True)
    rng = random.Random(_SEED.value)
    trials = []
    for trial in range(_KILLS.value):
      workdir = f"{bucket}/trial{trial}"
      delay = rng.uniform(0.2, 0.9) * seconds
      how = interrupt(workdir, steps, env, delay, term_first=trial % 4 == 3)
      run_to_end(workdir, steps, env)
      step, params = final_params(workdir)
      equal = step == steps and all(
          np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference))
      )
      trials.append(dict(trial=trial, delay_s=delay, how=how, final_step=step, bitwise=equal))
      print(
          f"trial {trial}: {how} after {delay:.1f} s; rerun ends at step {step}; "
          f"parameters bitwise equal: {equal}",
          flush=True,
      )
    killed = [t for t in trials if t["how"] != "finished before the kill"]
    survived = sum(t["bitwise"] for t in killed)
    print(
        f"{survived}/{len(killed)} kills survived (bitwise-equal final parameters); "
        f"{len(trials) - len(killed)} runs ended before their kill and are not counted",
        flush=True,
    )
    if _JSON.value:
      pathlib.Path(_JSON.value).write_text(json.dumps(trials, indent=1))
  finally:
    server.close()


if __name__ == "__main__":
  app.run(main)
