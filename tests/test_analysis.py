"""Scaling analysis: reading runs, frontier, power-law fits, the multiplier and llada-scaling."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from llada_jax.analysis import (
    analyse,
    collect_runs,
    compute_multiplier,
    default_metric,
    fit_power_law,
    frontier,
    read_records,
    select_points,
)
from llada_jax.analysis.fit import PowerLawFit
from llada_jax.analysis.study import multiplier_lines

LAW = dict(mdm=(2.0, 0.3, 1.0), arm=(1.0, 0.3, 1.0), block=(1.5, 0.3, 1.0))  # against C / 1e10


def _law(objective, compute):
  a, b, c = LAW[objective]
  return a * (compute / 1e10) ** -b + c


def _write_run(path, objective, params, budget, noise=0.0, seed=0, config=None):
  """A run whose eval curve follows the objective's law: 6 evaluations up to `budget` FLOPs."""
  path.mkdir(parents=True)
  description = {"schema": 1, "objective": objective, "parameters": params}
  if config is not None:
    description["config"] = config
  (path / "run.json").write_text(json.dumps(description))
  rng = np.random.default_rng(seed)
  lines = []
  for step, compute in enumerate(np.geomspace(budget / 30, budget, 6), 1):
    loss = _law(objective, compute) * np.exp(noise * rng.standard_normal())
    lines.append(
        {
            "step": step,
            "split": "train",
            "tokens": step * 10.0,
            "flops": compute,
            "flops_6nd": compute,
            "loss": 9.0,
        }
    )
    lines.append(
        {
            "step": step,
            "split": "eval",
            "tokens": step * 10.0,
            "flops": compute,
            "flops_6nd": 0.8 * compute,
            "loss_bound": loss / np.log2(np.e),
            "bits_per_byte": loss,
        }
    )
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp("study")
  for objective in ("mdm", "arm"):
    for i, budget in enumerate((1e10, 1e11, 1e12, 1e13)):
      _write_run(root / f"s{i}-{objective}", objective, 1000 * 4**i, budget)
  return root


@pytest.fixture(scope="module")
def three(tmp_path_factory):
  """The study with block diffusion twins (B=16 in their config); block's d3 ends at 2e13."""
  root = tmp_path_factory.mktemp("three")
  for objective in ("mdm", "arm", "block"):
    for i, budget in enumerate((1e10, 1e11, 1e12, 1e13)):
      budget *= 2 if objective == "block" and i == 3 else 1
      config = (
          {"diffusion": {"objective": "block", "block_size": 16}} if objective == "block" else None
      )
      _write_run(root / f"s{i}-{objective}", objective, 1000 * 4**i, budget, config=config)
  return root


def test_collect_runs_reads_descriptions_and_records(study):
  runs = collect_runs(study)
  assert [r.objective for r in runs] == ["arm"] * 4 + ["mdm"] * 4
  assert [r.parameters for r in runs[:4]] == [1000, 4000, 16000, 64000]
  assert default_metric(runs) == "bits_per_byte"
  xs, ys = runs[0].curve("bits_per_byte")
  assert len(xs) == 6 and np.all(np.diff(xs) > 0)


def test_resumed_steps_keep_the_last_record_and_a_cut_last_line_is_skipped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(
      '{"step": 1, "split": "eval", "loss_bound": 3.0}\n'
      '{"step": 2, "split": "eval", "loss_bound": 2.5}\n'
      '{"step": 2, "split": "eval", "loss_bound": 2.4}\n{"step": 3, "spl'
  )
  records = read_records(path)
  assert [(r["step"], r["loss_bound"]) for r in records] == [(1, 3.0), (2, 2.4)]
  path.write_text('{"step": 1, "split": "eval"}\nnot json\n{"step": 2, "split": "eval"}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2: not a metrics record"):
    read_records(path)


def test_bad_study_directories_are_one_line_errors(tmp_path):
  with pytest.raises(ValueError, match="expected a directory"):
    collect_runs(tmp_path / "missing")
  with pytest.raises(ValueError, match="holds no runs"):
    collect_runs(tmp_path)
  (tmp_path / "r").mkdir()
  (tmp_path / "r" / "run.json").write_text('{"objective": "gpt"}')
  with pytest.raises(ValueError, match="objective 'gpt' is not allowed"):
    collect_runs(tmp_path)


def test_frontier_is_the_lower_envelope_by_hand():
  compute = np.array([1.0, 2.0, 3.0, 2.0, 4.0, 5.0])
  loss = np.array([5.0, 4.0, 4.5, 3.0, 3.5, 2.0])
  np.testing.assert_array_equal(frontier(compute, loss), [0, 3, 5])


def test_exact_points_give_the_exact_law(study):
  runs = [r for r in collect_runs(study) if r.objective == "arm"]
  compute, loss, owner = select_points(runs, "bits_per_byte", points="final")
  assert len(compute) == 4 and set(owner) == {0, 1, 2, 3}
  compute, loss, owner = select_points(runs, "bits_per_byte")
  fit = fit_power_law(compute, loss, owner, bootstrap=0)
  np.testing.assert_allclose(fit.predict(compute), loss, rtol=1e-6)
  np.testing.assert_allclose([fit.b, fit.c], [0.3, 1.0], rtol=1e-4)
  np.testing.assert_allclose(fit.compute_for(fit.predict(3e11)), 3e11, rtol=1e-9)
  assert fit.compute_for(0.5) == np.inf


def test_without_irreducible_loss_the_fit_is_a_pure_power_law():
  compute = np.geomspace(1e10, 1e13, 8)
  loss = 3.0 * (compute / 1e11) ** -0.07
  fit = fit_power_law(compute, loss, bootstrap=0, irreducible=False)
  np.testing.assert_allclose([fit.b, fit.c, fit.stderr[2]], [0.07, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(fit.predict(compute), loss, rtol=1e-6)
  free = fit_power_law(compute, loss * 1.05 + 0.5, bootstrap=0)
  assert free.c > 0.1


def test_min_compute_drops_an_early_plateau(tmp_path):
  """A run stuck at 4.5 before 1e11 FLOPs: cut there, the fit is the law again."""
  for i, budget in enumerate((1e10, 1e11, 1e12, 1e13)):
    _write_run(tmp_path / f"s{i}-arm", "arm", 1000 * 4**i, budget)
  plateau = tmp_path / "p-arm"
  plateau.mkdir()
  (plateau / "run.json").write_text(json.dumps({"objective": "arm", "parameters": 10}))
  (plateau / "metrics.jsonl").write_text(
      "".join(
          json.dumps({"step": s, "split": "eval", "flops": c, "bits_per_byte": 4.5}) + "\n"
          for s, c in enumerate(np.geomspace(1e8, 9e10, 5), 1)
      )
  )
  runs = collect_runs(tmp_path)
  compute, loss, owner = select_points(runs, "bits_per_byte")
  assert compute.min() == pytest.approx(1e8)
  compute, loss, owner = select_points(runs, "bits_per_byte", min_compute=1e11)
  assert compute.min() >= 1e11 and "p-arm" not in {runs[i].name for i in owner}
  fit = fit_power_law(compute, loss, owner, bootstrap=0)
  np.testing.assert_allclose([fit.b, fit.c], [0.3, 1.0], rtol=1e-4)
  with pytest.raises(ValueError, match="min_compute=-1.0 is not allowed"):
    select_points(runs, "bits_per_byte", min_compute=-1.0)


def test_noisy_points_recover_the_exponent_within_the_bootstrap_interval(tmp_path):
  """2% log-normal noise on 24 points over 3.5 decades: b = 0.3 is recovered to about 0.1."""
  for i, budget in enumerate((1e10, 1e11, 1e12, 1e13)):
    _write_run(tmp_path / f"s{i}", "arm", 1000 * 4**i, budget, noise=0.02, seed=i)
  compute, loss, owner = [], [], []
  for index, run in enumerate(
      collect_runs(tmp_path)
  ):  # every point, not the frontier: noise must not be selected
    xs, ys = run.curve("bits_per_byte")
    compute.extend(xs)
    loss.extend(ys)
    owner.extend([index] * len(xs))
  fit = fit_power_law(np.array(compute), np.array(loss), np.array(owner), bootstrap=50)
  assert abs(fit.b - 0.3) < 0.1
  low, high = fit.interval(1)
  assert low <= fit.b <= high and len(fit.bootstrap) > 40


def test_multiplier_by_hand():
  """Equal exponents and no asymptote: k = (a_mdm / a_arm)^(1 / b) at every compute."""
  empty = np.zeros((0, 3))
  mdm = PowerLawFit(4.0, 0.5, 0.0, 1.0, (0, 0, 0), 5, 0.0, empty)
  arm = PowerLawFit(1.0, 0.5, 0.0, 1.0, (0, 0, 0), 5, 0.0, empty)
  for at in (1.0, 1e3, 1e9):
    k, low, high = compute_multiplier(mdm, arm, at)
    assert k == pytest.approx(16.0) and np.isnan(low) and np.isnan(high)
  assert compute_multiplier(arm, arm, 10.0)[0] == pytest.approx(1.0)
  above = PowerLawFit(4.0, 0.5, 2.0, 1.0, (0, 0, 0), 5, 0.0, empty)
  assert compute_multiplier(above, arm, 100.0)[0] == np.inf  # MDM's floor above ARM's loss


def test_a_study_of_three_objectives_fits_each_and_compares_every_pair(three, study):
  """Equal exponents, c = 1: k = (a / a_reference)^(1 / b) for every pair, at the largest compute
  of the two objectives compared; "multiplier" stays MDM vs ARM."""
  document, runs, fits = analyse(str(three), bootstrap=10)
  assert list(fits) == ["mdm", "arm", "block"] and len(runs) == 12
  for objective in LAW:
    assert document["fits"][objective]["runs"] == 4
    np.testing.assert_allclose([fits[objective].b, fits[objective].c], [0.3, 1.0], rtol=1e-4)
  multipliers = document["multipliers"]
  assert list(multipliers) == ["mdm_vs_arm", "block_vs_arm", "block_vs_mdm"]
  for name, against, ratio, at in (
      ("mdm", "arm", 2.0, 1e13),
      ("block", "arm", 1.5, 2e13),
      ("block", "mdm", 0.75, 2e13),
  ):
    m = multipliers[f"{name}_vs_{against}"]
    assert (m["objective"], m["reference"], m["at"]) == (name, against, pytest.approx(at))
    assert m["k"] == pytest.approx(ratio ** (1 / 0.3), rel=1e-3)
    assert m["interval"][0] <= m["interval"][1]
  assert multipliers["block_vs_arm"]["compares"] == "bound vs NLL"
  assert multipliers["block_vs_mdm"]["compares"] == "bound vs bound"
  assert document["multiplier"] == {
      key: multipliers["mdm_vs_arm"][key] for key in ("at", "k", "interval")
  }
  lines = multiplier_lines(document)
  assert len(lines) == 3 and lines[1].startswith("Block needs 3.86x the compute of ARM")
  assert lines[1].endswith("(Block bound vs ARM NLL)")
  two, _, _ = analyse(str(study), bootstrap=10)
  assert list(two["multipliers"]) == ["mdm_vs_arm"] and set(two["fits"]) == {"mdm", "arm"}
  assert two["multiplier"]["at"] == pytest.approx(1e13)


def test_the_plot_draws_every_objective_in_its_colour(three, tmp_path):
  pytest.importorskip("matplotlib")
  from llada_jax.analysis.plot import plot_scaling  # pylint: disable=g-import-not-at-top

  document, runs, fits = analyse(str(three), bootstrap=10)
  legend = plot_scaling(runs, fits, document["metric"], document["x"], tmp_path / "p.png")
  legend = {label.replace("\n", " "): colour for label, colour in legend.items()}
  drawn = {label.split(" fit:")[0]: colour for label, colour in legend.items() if " fit:" in label}
  assert drawn == {
      "MDM (LLaDA) bound": "tab:blue",
      "ARM NLL": "tab:red",
      "Block diffusion bound (B=16)": "tab:green",
  }
  assert legend["s3-block (0.06M)"] == "tab:green" and len(legend) == 15
  for run in runs:  # without B in its config the label does not guess one
    run.description.pop("config", None)
  legend = plot_scaling(runs, fits, document["metric"], document["x"], tmp_path / "q.png")
  assert any(label.startswith("Block diffusion bound fit:\nb = 0.300") for label in legend)


def test_too_few_points_is_a_one_line_error():
  with pytest.raises(ValueError, match="at least 3 points"):
    fit_power_law(np.array([1.0, 2.0]), np.array([3.0, 2.0]))


def test_llada_scaling_writes_plot_and_identical_json(study, tmp_path):
  pytest.importorskip("matplotlib")
  outputs = []
  for name in ("a", "b"):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llada_jax.scaling",
            f"--runs={study}",
            f"--out={tmp_path / name}.png",
            "--bootstrap=20",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outputs.append((tmp_path / f"{name}.json").read_bytes())
  assert outputs[0] == outputs[1]
  document = json.loads(outputs[0])
  assert document["fits"]["mdm"]["b"] == pytest.approx(0.3, rel=1e-3)
  assert document["multiplier"]["k"] == pytest.approx(2.0 ** (1 / 0.3), rel=1e-3)
  assert (tmp_path / "a.png").stat().st_size > 10_000
  assert "MDM needs" in result.stdout


def test_llada_scaling_prints_and_writes_the_block_fit(three, tmp_path):
  pytest.importorskip("matplotlib")
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "llada_jax.scaling",
          f"--runs={three}",
          f"--out={tmp_path / 'three'}.png",
          "--bootstrap=0",
      ],
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "\nblock | 4 | " in result.stdout and "MDM needs" in result.stdout
  document = json.loads((tmp_path / "three.json").read_text())
  assert document["fits"]["block"]["b"] == pytest.approx(0.3, rel=1e-3)
  assert document["multipliers"]["block_vs_mdm"]["k"] == pytest.approx(0.75 ** (1 / 0.3), rel=1e-3)


# The ladder's budgets (configs/scaling/cpu.py, docs/scaling_study.md): where the study reads its
# fits.
BUDGETS = (2.5e11, 1e12, 4e12, 1.2e13, 4e13)


def _predict(fit, compute):
  """L(C) = a (C / scale)^-b + c of a fits document's entry, by hand."""
  return fit["a"] * (np.asarray(compute) / fit["scale"]) ** -fit["b"] + fit["c"]


@pytest.mark.parametrize(
    "name, flags",
    [("scaling", []), ("scaling_above_1e12", ["--min_compute=1e12", "--noirreducible"])],
)
def test_llada_scaling_reproduces_the_committed_study(tmp_path, name, flags):
  """docs/scaling_study: the CPU ladder's runs (MDM, ARM and block twins), their plots and fits
  (docs/scaling_study.md). What the study states is compared to the precision it states it, not
  the optimizer's last digits: a parameter at its bound (c = 0 for the MDM and block fits) is any
  number from 1e-26 to 1e-13 depending on the scipy and BLAS build, and a least-squares fit that
  stops at scipy's default tolerances (1e-8) moves a parameter by up to ~1e-6."""
  image = pytest.importorskip("matplotlib.image")
  study = pathlib.Path(__file__).resolve().parent.parent / "docs" / "scaling_study"
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "llada_jax.scaling",
          f"--runs={study / 'runs'}",
          f"--out={tmp_path / name}.png",
          *flags,
      ],
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  got = json.loads((tmp_path / f"{name}.json").read_text())
  want = json.loads((study / f"{name}.json").read_text())
  assert got["runs"] == want["runs"] and len(got["runs"]) == 15
  assert set(got["fits"]) == set(want["fits"]) == {"mdm", "arm", "block"}
  budgets = [c for c in BUDGETS if c >= want["min_compute"]]
  for objective, fit in want["fits"].items():
    mine = got["fits"][objective]
    assert (mine["n_points"], mine["runs"]) == (fit["n_points"], fit["runs"])
    # The fitted loss at the ladder's budgets: the study quotes bits/byte to 0.01 (3e-3 of these
    # losses) and its fits miss their points by 2-3% (rms log residual); 1e-4 is far inside both.
    np.testing.assert_allclose(_predict(mine, budgets), _predict(fit, budgets), rtol=1e-4)
    # Exponents are quoted to 3 decimals, c to 2 (bits/byte): half a unit of the last quoted
    # digit of b and c and of the bootstrap intervals' ends (the table of docs/scaling_study.md).
    np.testing.assert_allclose(mine["b"], fit["b"], rtol=0, atol=5e-4)
    np.testing.assert_allclose(mine["b_interval"], fit["b_interval"], rtol=0, atol=5e-4)
    np.testing.assert_allclose(mine["c"], fit["c"], rtol=0, atol=5e-3)
    np.testing.assert_allclose(mine["c_interval"], fit["c_interval"], rtol=0, atol=5e-3)
  # Multipliers are quoted to 2 significant figures. k = (a / (L_ref - c))^(1/b) / C multiplies a
  # relative change of the losses by 1/b (about 20 here): 1e-3 on k is 5e-5 on a loss. An interval
  # end is one bootstrap refit's k (the 16th or 84th percentile, "nearest"): 1e-2, a fifth of
  # the quoted precision.
  np.testing.assert_allclose(got["multiplier"]["k"], want["multiplier"]["k"], rtol=1e-3)
  assert list(got["multipliers"]) == list(want["multipliers"]) and len(want["multipliers"]) == 3
  for pair, m in want["multipliers"].items():
    assert got["multipliers"][pair]["at"] == m["at"]  # the largest compute of the two, exact
    np.testing.assert_allclose(got["multipliers"][pair]["k"], m["k"], rtol=1e-3)
    np.testing.assert_allclose(got["multipliers"][pair]["interval"], m["interval"], rtol=1e-2)
  drawn, committed = image.imread(tmp_path / f"{name}.png"), image.imread(study / f"{name}.png")
  assert drawn.shape == committed.shape and np.mean(np.abs(drawn - committed)) < 0.01


def test_records_of_one_step_merge_and_a_rewritten_step_keeps_its_last_values(tmp_path):
  """The trainer's bound and an evaluation hook's accuracy are two eval records of one step: both
  stay; a resumed run's record of a step it writes again replaces the values it repeats."""
  from llada_jax.analysis.runs import read_records  # pylint: disable=import-outside-toplevel

  path = tmp_path / "metrics.jsonl"
  path.write_text(
      "\n".join(
          json.dumps(r)
          for r in (
              {"split": "eval", "step": 10, "loss_bound": 2.0},
              {"split": "eval", "step": 10, "piqa/acc": 0.6},
              {"split": "train", "step": 10, "loss": 3.0},
              {"split": "eval", "step": 10, "loss_bound": 1.5},
          )
      )
      + '\n{"split": "ev'  # a run killed mid-write
  )
  assert read_records(path) == (
      {"split": "eval", "step": 10, "loss_bound": 1.5, "piqa/acc": 0.6},
      {"split": "train", "step": 10, "loss": 3.0},
  )
