"""Scaling ladders and launch/sweep.py: runs build and validate, twins match, steps follow the
budget, names round-trip, launcher commands, and local sweeps that train, skip and resume."""

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from conftest import cli_env
from configs.scaling import cpu, ladder, pod
from llada_jax.config import OBJECTIVES, validate
from llada_jax.errors import ConfigError
from llada_jax.training.flops import model_flops_per_token, non_embedding_parameters

ROOT = pathlib.Path(__file__).resolve().parents[1]
MICRO_LADDER = "tests/configs/micro_ladder.py"
LADDERS = {"cpu": cpu.LADDER, "pod": pod.LADDER}


def _load(path: str, name: str):
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
  return sys.modules[name]


sweep = _load("launch/sweep.py", "launch_sweep")
micro = _load(MICRO_LADDER, "micro_ladder")


def _sweep(*args: str) -> subprocess.CompletedProcess:
  env = cli_env()
  return subprocess.run(
      [sys.executable, "launch/sweep.py", *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )


# What follows from a run's number of steps, which differs where FLOPs per token do (objective
# block under the exact convention).
STEP_FIELDS = {
    "train": ("num_steps", "eval_every", "log_every"),
    "optimizer": ("warmup_steps",),
    "checkpoint": ("save_every",),
}


def _twins(lad: ladder.Ladder):
  """The runs of each size and budget, one per objective, in the order of OBJECTIVES."""
  everything = ladder.runs(lad)
  n = len(OBJECTIVES)
  return [tuple(everything[i : i + n]) for i in range(0, len(everything), n)]


@pytest.mark.parametrize("name", sorted(LADDERS))
def test_every_run_builds_a_valid_config(name):
  lad = LADDERS[name]
  everything = ladder.runs(lad)
  assert len(everything) == len(OBJECTIVES) * sum(len(b) for b in lad.budgets.values())
  for run in everything:
    c = validate(ladder.run_config(lad, run))
    assert c.diffusion.objective == run.objective and c.model.causal == (run.objective == "arm")
    assert c.data.sequence_length == c.model.max_sequence_length == lad.sequence_length
    assert c.train.num_steps // c.train.eval_every in range(8, 13)
    assert c.checkpoint.save_every <= c.train.num_steps and c.optimizer.warmup_steps >= 1
    assert c.optimizer.peak_lr == run.size.peak_lr
  assert {r.name.split("-")[0] for r in everything} == {s.name for s in lad.sizes}


def test_cpu_ladder_spans_the_sizes_and_compute_grows():
  configs = [ladder.run_config(cpu.LADDER, r) for r in ladder.runs(cpu.LADDER, ("mdm",))]
  params = [ladder.parameters(c) for c in configs]
  assert params == sorted(params) and params[0] < 1e5 and params[-1] > 1e6
  budgets = [b for s in cpu.LADDER.sizes for b in cpu.LADDER.budgets[s.name]]
  assert budgets == sorted(budgets)
  assert all(c.data.task == "gutenberg" and c.data.vocabulary == "byte" for c in configs)


def test_pod_ladder_holds_the_llada_1b_shape():
  from configs import llada_1b  # pylint: disable=import-outside-toplevel

  c = ladder.run_config(pod.LADDER, "1b-mdm-1e20")
  want = llada_1b.get_config().model
  for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size"):
    assert c.model[key] == want[key]
  assert c.data.task == llada_1b.get_config().data.task and c.data.sequence_length == 4096


@pytest.mark.parametrize("name", sorted(LADDERS))
def test_twins_differ_only_in_the_objective(name):
  """ARM: causal, no loss chunks; block: its number of steps under exact FLOPs (6 N D: none)."""
  lad = LADDERS[name]
  for mdm, arm, block in _twins(lad):
    assert (mdm.objective, arm.objective, block.objective) == tuple(OBJECTIVES)
    assert mdm.size == arm.size == block.size and mdm.budget == arm.budget == block.budget
    a, b, k = (ladder.run_config(lad, r).to_dict() for r in (mdm, arm, block))
    assert (a["model"].pop("causal"), b["model"].pop("causal"), k["model"].pop("causal")) == (
        False,
        True,
        False,
    )
    for config in (a, b, k):
      config["diffusion"].pop("objective")
    b["train"]["loss_chunk"] = a["train"]["loss_chunk"]
    assert a == b
    steps = (a["train"]["num_steps"], k["train"]["num_steps"])
    if lad.convention == "exact":
      assert 0.4 * steps[0] < steps[1] < 0.5 * steps[0]  # the two-stream pass: ~2.2-2.4x a token
    else:
      assert steps[0] == steps[1]
    for section, keys in STEP_FIELDS.items():
      for key in keys:
        a[section].pop(key)
        k[section].pop(key)
    assert a == k


@pytest.mark.parametrize("convention", ladder.CONVENTIONS)
@pytest.mark.parametrize("name", sorted(LADDERS))
def test_num_steps_spend_the_budget_within_a_step(name, convention):
  lad = dataclasses.replace(LADDERS[name], convention=convention)
  for run in ladder.runs(lad):
    c = ladder.run_config(lad, run)
    per_token = (
        model_flops_per_token(c) if convention == "exact" else 6.0 * non_embedding_parameters(c)
    )
    per_step = per_token * c.data.batch_size * c.data.sequence_length
    assert abs(c.train.num_steps * per_step - run.budget) <= per_step / 2


def test_run_names_round_trip():
  assert [ladder.format_budget(b) for b in (3e13, 1.5e19, 2.25e14, 1e8)] == [
      "3e13",
      "1.5e19",
      "2.25e14",
      "1e8",
  ]
  for lad in LADDERS.values():
    for run in ladder.runs(lad):
      assert ladder.parse_run(lad, run.name) == run
  assert ladder.parse_run(cpu.LADDER, "d64-arm-1.0e12").name == "d64-arm-1e12"


@pytest.mark.parametrize(
    "bad", ["d65-mdm-1e12", "d64-gpt-1e12", "d64-mdm-2e12", "d64-mdm-x", "d64", ""]
)
def test_bad_run_name_is_one_line_error_listing_the_runs(bad):
  with pytest.raises(ConfigError) as e:
    cpu.get_config(bad)
  assert "\n" not in str(e.value) and "d64-mdm-1e12" in str(e.value)
  assert "d128-arm-1.2e13" in str(e.value)


def test_too_small_budget_names_the_run():
  lad = dataclasses.replace(micro.LADDER, budgets={"d16": (1e6,), "d32": (1.2e8,)})
  with pytest.raises(ConfigError, match="run d16-arm-1e6 of ladder 'micro' has 0 steps"):
    ladder.run_config(lad, "d16-arm-1e6")


def test_ladder_checks_its_budgets_and_convention():
  with pytest.raises(ConfigError, match="expected exactly the sizes"):
    dataclasses.replace(micro.LADDER, budgets={"d16": (5e7,)})
  with pytest.raises(ConfigError, match="at most 3 significant digits"):
    dataclasses.replace(micro.LADDER, budgets={"d16": (1.2345e8,), "d32": (1e8,)})
  with pytest.raises(ConfigError, match="convention='chinchilla'"):
    dataclasses.replace(micro.LADDER, convention="chinchilla")


def _check_with_launcher_dry_run(command: list[str]) -> str:
  """Runs a printed launcher command with the launcher's own --dry_run: it must accept it."""
  script = next(i for i, a in enumerate(command) if a.startswith("launch/"))
  dry = ["bash", *command[script : script + 1], "--dry_run", *command[script + 1 :]]
  result = subprocess.run(dry, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_print_mode_wraps_each_run_for_every_launcher():
  args = (
      "--ladder=configs/scaling/pod.py",
      "--out=gs://b/sc",
      "--mode=print",
      "--only=^1b-",
      "--objectives=mdm",
      "--",
      "--config.data.task=corpora",
  )
  want = "--config=configs/scaling/pod.py:1b-mdm-1e19 --workdir=gs://b/sc/1b-mdm-1e19"
  expected = {
      "local": ([], f"-m llada_jax.train {want} --config.data.task=corpora"),
      "tpu_vm": (
          ["--launcher_args=my-tpu us-central2-b"],
          f"launch/tpu_vm.sh my-tpu us-central2-b -- {want}",
      ),
      "slurm": (
          ["--launcher_args=--nodes=4"],
          f"sbatch --nodes=4 --job-name=1b-mdm-1e19 launch/slurm.sbatch {want}",
      ),
      "gke": (
          ["--launcher_args=img:1 tpu-v5p-slice 4x4x4 16 4"],
          f"launch/gke.sh llada-1b-mdm-1e19 img:1 tpu-v5p-slice 4x4x4 16 4 -- {want}",
      ),
  }
  for launcher, (extra, line) in expected.items():
    result = _sweep(*args[:-2], f"--launcher={launcher}", *extra, *args[-2:])
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("ladder pod: 3 runs") and "FLOPs 6ND" in out[1]
    commands = out[-3:]
    assert [c.split("--config=")[1].split()[0] for c in commands] == [
        f"configs/scaling/pod.py:1b-mdm-{b}" for b in ("1e19", "1e20", "1e21")
    ]
    assert line in commands[0] and commands[0].endswith("--config.data.task=corpora")
    if launcher != "local":
      _check_with_launcher_dry_run(commands[0].split())


def test_dry_run_prints_the_train_commands_and_runs_nothing(tmp_path):
  """By default a sweep runs every objective of llada_jax.config.OBJECTIVES."""
  lad = "configs/scaling/cpu.py"
  result = _sweep(f"--ladder={lad}", f"--out={tmp_path / 'sw'}", "--dry_run", "--only=^d48-")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0].startswith("ladder cpu: 3 runs")
  lines = result.stdout.splitlines()[-3:]
  assert len(lines) == len(OBJECTIVES) == 3
  for line, objective in zip(lines, OBJECTIVES):
    run = f"d48-{objective}-2.5e11"
    assert line == (
        f"{sys.executable} -m llada_jax.train --config={lad}:{run} "
        f"--workdir={tmp_path / 'sw' / run}"
    )
  assert not (tmp_path / "sw").exists()
  result = _sweep(f"--ladder={lad}", "--out=sw", "--dry_run", "--only=^d48-", "--objectives=arm")
  assert result.returncode == 0 and result.stdout.splitlines()[-1].endswith(
      "--workdir=sw/d48-arm-2.5e11"
  )
  assert result.stdout.splitlines()[0].startswith("ladder cpu: 1 runs")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--mode=print", "--launcher=tpu_vm", "--launcher_args=my-tpu"], "TPU_NAME ZONE"),
        (["--launcher=gke"], "not allowed with --mode=local"),
        (["--only=d99"], "matches no run of ladder 'cpu': d48-mdm-2.5e11"),
        (["--", "--workdir=x"], "expected --config.<field>=<value>"),
    ],
)
def test_bad_sweep_arguments_are_one_line_errors(args, needle):
  result = _sweep("--ladder=configs/scaling/cpu.py", "--out=/nonexistent/sw", *args)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert needle in result.stderr.strip().splitlines()[-1], result.stderr


def test_train_takes_a_run_name_after_the_config_file(tmp_path):
  env = cli_env()
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "llada_jax.train",
          "--config=configs/scaling/cpu.py:d64-mdm-7e12",
          f"--workdir={tmp_path}",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "run 'd64-mdm-7e12' is not in ladder 'cpu'" in result.stderr, result.stderr


def _train_in_process(command: list[str], log: pathlib.Path) -> int:
  """sweep_local's `execute` without a subprocess: trains the run of `command` here."""
  from llada_jax.training.loop import train  # pylint: disable=import-outside-toplevel

  flags = dict(a[2:].split("=", 1) for a in command if a.startswith("--"))
  train(micro.get_config(flags["config"].split(":")[1]), flags["workdir"])
  log.write_text("trained in process\n")
  return 0


def test_local_sweep_trains_then_skips_finished_runs(tmp_path, capsys):
  runs = sweep.select(micro.LADDER, "d16", ["mdm", "arm"])
  calls = []

  def execute(command, log):
    calls.append(command)
    return _train_in_process(command, log)

  sweep.sweep_local(MICRO_LADDER, micro.LADDER, runs, str(tmp_path), [], execute=execute)
  first = capsys.readouterr().out.splitlines()
  assert len(calls) == 2 and len(first) == 2
  for line, run in zip(first, runs):
    assert line.startswith(f"{run.name}: 11.4K params, 4 steps, 1.02K tokens")
    assert "final eval loss " in line and "bits/byte" in line
    records = [json.loads(r) for r in (tmp_path / run.name / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4]
    assert json.loads((tmp_path / run.name / "run.json").read_text())["objective"] == run.objective

  sweep.sweep_local(MICRO_LADDER, micro.LADDER, runs, str(tmp_path), [], execute=execute)
  second = capsys.readouterr().out.splitlines()
  assert len(calls) == 2 and all("done before" in line for line in second)

  longer = ["--config.train.num_steps=5"]  # a new last step: not done, the run resumes
  sweep.sweep_local(
      MICRO_LADDER,
      micro.LADDER,
      runs[:1],
      str(tmp_path),
      longer,
      execute=lambda command, log: calls.append(command) or 0,
  )
  assert calls[-1][-1] == longer[0] and len(calls) == 3


def test_local_sweep_stops_at_a_failed_run_naming_it(tmp_path, capsys):
  runs = sweep.select(micro.LADDER, "d32", ["mdm", "arm"])
  with pytest.raises(SystemExit) as e:
    sweep.sweep_local(
        MICRO_LADDER, micro.LADDER, runs, str(tmp_path), [], execute=lambda command, log: 3
    )
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("error: run d32-mdm-1.2e8 failed with exit status 3")
  assert "d32-arm" not in err


@pytest.mark.slow
def test_local_sweep_end_to_end(tmp_path):
  out = tmp_path / "sw"
  pair = ("--objectives=mdm,arm",)  # the micro budgets leave a block d16 2 steps, too few
  result = _sweep(f"--ladder={MICRO_LADDER}", f"--out={out}", *pair)
  assert result.returncode == 0, result.stderr[-3000:]
  names = [r.name for r in ladder.runs(micro.LADDER, ("mdm", "arm"))]
  lines = result.stdout.splitlines()[-4:]
  for name, line in zip(names, lines):
    assert line.startswith(f"{name}: ") and " s, final eval loss " in line
    workdir = out / name
    assert (workdir / "run.json").is_file() and (workdir / "checkpoints" / "4").is_dir()
    assert "eval/step 4" in (workdir / "train.log").read_text()
    splits = [json.loads(r)["split"] for r in (workdir / "metrics.jsonl").open()]
    assert splits.count("eval") == 2
  again = _sweep(f"--ladder={MICRO_LADDER}", f"--out={out}", *pair)
  assert again.returncode == 0, again.stderr
  assert all("done before" in line for line in again.stdout.splitlines()[-4:])
