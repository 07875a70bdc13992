"""Expands a scaling ladder (configs/scaling/) into training runs: runs them here, or prints them.

  python launch/sweep.py --ladder=configs/scaling/cpu.py --out=runs/scaling \
      [--only=REGEX] [--objectives=mdm,arm,block] [--mode=local|print] \
      [--launcher=local|tpu_vm|slurm|gke --launcher_args="..."] [--dry_run] [-- --config.x=y ...]

Every mode first prints the table of the selected runs. `--mode=local` trains them one after the
other (`python -m llada_jax.train --config=LADDER:RUN --workdir=OUT/RUN`, output in
OUT/RUN/train.log), skips those whose workdir already holds run.json and the checkpoint of the
last step (so rerunning the sweep resumes it), and prints one line per run. `--mode=print` prints
one command per run for a launcher of launch/; `--launcher_args` are the launcher's own positional
arguments: tpu_vm "TPU_NAME ZONE", gke "IMAGE ACCELERATOR TOPOLOGY HOSTS CHIPS_PER_HOST" (the
JobSet is named after the run), slurm sbatch options such as "--nodes=4". Arguments after `--` go
to every training command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Callable

from absl import flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # configs/ and llada_jax/ without an installed package

# pylint: disable=wrong-import-position
from configs.scaling.ladder import Ladder, Run, parameters, run_config, runs  # noqa: E402
from llada_jax.cli_support import entry_point  # noqa: E402
from llada_jax.config import OBJECTIVES  # noqa: E402
from llada_jax.errors import ConfigError  # noqa: E402
from llada_jax.training.flops import model_flops_per_token, non_embedding_parameters  # noqa: E402

LAUNCHERS = ("local", "tpu_vm", "slurm", "gke")
LAUNCHER_ARGS = {
    "tpu_vm": ("TPU_NAME", "ZONE"),
    "gke": ("IMAGE", "ACCELERATOR", "TOPOLOGY", "HOSTS", "CHIPS_PER_HOST"),
}

_LADDER = flags.DEFINE_string("ladder", None, "A ladder file of configs/scaling/ (defines LADDER).")
_OUT = flags.DEFINE_string("out", None, "Parent of the runs' workdirs (OUT/RUN); gs:// for pods.")
_ONLY = flags.DEFINE_string("only", "", "Only runs whose name matches this regular expression.")
_OBJECTIVES = flags.DEFINE_list(
    "objectives", list(OBJECTIVES), "Objectives to run of each size and budget (default: all)."
)
_MODE = flags.DEFINE_enum(
    "mode",
    "local",
    ["local", "print"],
    "local: train the runs here, one after the other; print: print their " "launcher commands.",
)
_LAUNCHER = flags.DEFINE_enum(
    "launcher", "local", list(LAUNCHERS), "Launcher of the printed commands (--mode=print)."
)
_LAUNCHER_ARGS = flags.DEFINE_string(
    "launcher_args", "", "The launcher's positional arguments or sbatch options."
)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "--mode=local: print the commands, run nothing.")


def load_ladder(path: str) -> Ladder:
  """The LADDER of a ladder file."""
  if not os.path.isfile(path):
    raise ConfigError(f"--ladder={path} names no file; pass e.g. --ladder=configs/scaling/cpu.py")
  spec = importlib.util.spec_from_file_location(f"ladder_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  ladder = getattr(module, "LADDER", None)
  if not isinstance(ladder, Ladder):
    raise ConfigError(f"--ladder={path} defines no LADDER (a configs.scaling.ladder.Ladder)")
  return ladder


def select(ladder: Ladder, only: str, objectives: list[str]) -> list[Run]:
  """The ladder's runs of these objectives whose names match `only`."""
  try:
    pattern = re.compile(only)
  except re.error as e:
    raise ConfigError(f"--only={only!r} is not a regular expression: {e}") from None
  everything = runs(ladder, tuple(objectives))
  selected = [r for r in everything if pattern.search(r.name)]
  if not selected:
    raise ConfigError(
        f"--only={only!r} matches no run of ladder {ladder.name!r}: "
        f"{', '.join(r.name for r in everything)}"
    )
  return selected


def table(ladder: Ladder, selected: list[Run]) -> str:
  """One row per run: size, steps, tokens and FLOPs in both conventions."""
  rows = [("run", "objective", "params", "non-emb", "lr", "steps", "tokens", "FLOPs", "FLOPs 6ND")]
  for run in selected:
    c = run_config(ladder, run)
    tokens = c.train.num_steps * c.data.batch_size * c.data.sequence_length
    rows.append(
        (
            run.name,
            run.objective,
            _count(parameters(c)),
            _count(non_embedding_parameters(c)),
            f"{c.optimizer.peak_lr:g}",
            str(c.train.num_steps),
            _count(tokens),
            f"{tokens * model_flops_per_token(c):.3e}",
            f"{tokens * 6 * non_embedding_parameters(c):.3e}",
        )
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  title = (
      f"ladder {ladder.name}: {len(selected)} runs, budgets in {ladder.convention} FLOPs, "
      f"{ladder.batch_size} x {ladder.sequence_length} tokens per step"
  )
  return "\n".join(
      [title]
      + [
          "  ".join(
              cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
          )
          for row in rows
      ]
  )


def workdir(out: str, run: Run) -> str:
  """OUT/RUN (string join: OUT may be gs://)."""
  return f"{out.rstrip('/')}/{run.name}"


def train_flags(ladder_path: str, run: Run, out: str, overrides: list[str]) -> list[str]:
  """The llada_jax.train flags of a run: its config by name, its workdir, the overrides."""
  return [f"--config={ladder_path}:{run.name}", f"--workdir={workdir(out, run)}", *overrides]


def check_launcher_args(launcher: str, launcher_args: str) -> list[str]:
  """The launcher's positional arguments, checked against what it takes."""
  args = shlex.split(launcher_args)
  wanted = LAUNCHER_ARGS.get(launcher)
  if wanted is not None and len(args) != len(wanted):
    raise ConfigError(
        f"--launcher_args={launcher_args!r} is not allowed for --launcher="
        f"{launcher}: expected {len(wanted)} arguments, {' '.join(wanted)}"
    )
  if launcher == "local" and args:
    raise ConfigError(
        f"--launcher_args={launcher_args!r} is not allowed for --launcher=local: " "expected none"
    )
  return args


def launcher_command(
    launcher: str, launcher_args: str, ladder_path: str, run: Run, out: str, overrides: list[str]
) -> list[str]:
  """The command that trains `run` through a launcher of launch/."""
  args = check_launcher_args(launcher, launcher_args)
  train = train_flags(ladder_path, run, out, overrides)
  if launcher == "local":
    return [sys.executable, "-m", "llada_jax.train", *train]
  if launcher == "tpu_vm":
    return ["launch/tpu_vm.sh", *args, "--", *train]
  if launcher == "slurm":
    return ["sbatch", *args, f"--job-name={run.name}", "launch/slurm.sbatch", *train]
  name = re.sub(r"[^a-z0-9-]", "-", f"llada-{run.name}".lower())  # a Kubernetes object name
  return ["launch/gke.sh", name, *args, "--", *train]


def final_step(ladder: Ladder, run: Run, overrides: list[str]) -> int:
  """The step the run ends at: the ladder's, or that of a --config.train.num_steps override."""
  steps = run_config(ladder, run).train.num_steps
  for arg in overrides:
    if arg.startswith("--config.train.num_steps="):
      steps = int(arg.split("=", 1)[1])
  return steps


def is_done(path: pathlib.Path, step: int) -> bool:
  """True when the workdir holds run.json and the (complete, renamed) checkpoint of `step`."""
  return (path / "run.json").is_file() and (path / "checkpoints" / str(step)).is_dir()


def final_eval(path: pathlib.Path) -> dict[str, float]:
  """The last evaluation record of the run's metrics.jsonl ({} if none)."""
  last = {}
  metrics = path / "metrics.jsonl"
  if metrics.is_file():
    for line in metrics.read_text().splitlines():
      record = json.loads(line)
      if record.get("split") == "eval" and record.get("loss_bound") is not None:
        last = record
  return last


def run_subprocess(command: list[str], log: pathlib.Path) -> int:
  """Runs a training command with its output appended to `log`; returns its exit status."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
  with log.open("ab") as f:
    return subprocess.run(
        command, stdout=f, stderr=subprocess.STDOUT, env=env, check=False
    ).returncode


def sweep_local(
    ladder_path: str,
    ladder: Ladder,
    selected: list[Run],
    out: str,
    overrides: list[str],
    dry_run: bool = False,
    execute: Callable[[list[str], pathlib.Path], int] = run_subprocess,
) -> None:
  """Trains the runs one after the other, skipping finished ones; one line per run.

  `execute(command, log)` runs one training command (tests pass an in-process one).
  """
  for run in selected:
    command = launcher_command("local", "", ladder_path, run, out, overrides)
    if dry_run:
      print(shlex.join(command), flush=True)
      continue
    path = pathlib.Path(workdir(out, run))
    step = final_step(ladder, run, overrides)
    if is_done(path, step):
      print(_summary(ladder, run, path, step, "done before"), flush=True)
      continue
    path.mkdir(parents=True, exist_ok=True)
    start = time.time()
    status = execute(command, path / "train.log")
    if status != 0:
      print(
          f"error: run {run.name} failed with exit status {status}; see {path / 'train.log'}",
          file=sys.stderr,
      )
      sys.exit(1)
    print(_summary(ladder, run, path, step, f"{time.time() - start:.0f} s"), flush=True)


def _summary(ladder: Ladder, run: Run, path: pathlib.Path, step: int, wall: str) -> str:
  c = run_config(ladder, run)
  tokens = step * c.data.batch_size * c.data.sequence_length
  record = final_eval(path)
  loss = f"{record['loss_bound']:.4f}" if record else "none"
  if record.get("bits_per_byte") is not None:
    loss += f" ({record['bits_per_byte']:.3f} bits/byte)"
  return (
      f"{run.name}: {_count(parameters(c))} params, {step} steps, {_count(tokens)} tokens, "
      f"{tokens * model_flops_per_token(c):.3e} FLOPs, {wall}, final eval loss {loss}"
  )


def _count(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g}{unit}"
  return str(int(n))


def _sweep(argv: list[str]) -> None:
  overrides = argv[1:]
  for name, flag in (("ladder", _LADDER), ("out", _OUT)):
    if not flag.value:
      raise ConfigError(
          f"--{name} is required, e.g. --ladder=configs/scaling/cpu.py " "--out=runs/scaling"
      )
  if _MODE.value == "local" and (_LAUNCHER.value != "local" or _LAUNCHER_ARGS.value):
    raise ConfigError(
        f"--launcher={_LAUNCHER.value} is not allowed with --mode=local: expected "
        "--mode=print to print launcher commands"
    )
  for arg in overrides:
    if not arg.startswith("--config."):
      raise ConfigError(f"{arg!r} after -- is not allowed: expected --config.<field>=<value>")
  check_launcher_args(_LAUNCHER.value, _LAUNCHER_ARGS.value)
  ladder = load_ladder(_LADDER.value)
  selected = select(ladder, _ONLY.value, _OBJECTIVES.value)
  print(table(ladder, selected), flush=True)
  if _MODE.value == "print":
    for run in selected:
      print(
          shlex.join(
              launcher_command(
                  _LAUNCHER.value, _LAUNCHER_ARGS.value, _LADDER.value, run, _OUT.value, overrides
              )
          )
      )
  else:
    sweep_local(_LADDER.value, ladder, selected, _OUT.value, overrides, _DRY_RUN.value)


main = entry_point(_sweep)


if __name__ == "__main__":
  main()
