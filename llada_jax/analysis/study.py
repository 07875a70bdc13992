"""A scaling study as a whole: every run of a directory, one fit per objective, the multipliers.

The fits document keeps the fields of its first version: "multiplier" is MDM against ARM. Every
comparison of two fitted objectives is in "multipliers", named `<objective>_vs_<reference>`:
mdm_vs_arm (the same numbers as "multiplier"), block_vs_arm and block_vs_mdm.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llada_jax.analysis.fit import PowerLawFit, compute_multiplier, fit_power_law, select_points
from llada_jax.analysis.runs import Run, collect_runs, default_metric
from llada_jax.config import OBJECTIVES

SCHEMA = 1

# (objective, reference): k is the compute the objective needs for the reference's loss.
COMPARISONS = (("mdm", "arm"), ("block", "arm"), ("block", "mdm"))


def analyse(
    runs_dir: str,
    x: str = "flops",
    points: str = "frontier",
    metric: str | None = None,
    bootstrap: int = 200,
    reference: float | None = None,
    min_compute: float = 0.0,
    irreducible: bool = True,
) -> tuple[dict, list, dict]:
  """(the fits document, the runs, the fits by objective) of a study directory: what
  llada-scaling prints, plots and writes. The document carries "warnings" for fits with too few
  runs or points to constrain their parameters. Multipliers are quoted at `reference` compute,
  by default the largest compute of the two objectives compared."""
  runs = collect_runs(runs_dir)
  metric = metric or default_metric(runs)
  fits, document = {}, {
      "schema": SCHEMA,
      "x": x,
      "metric": metric,
      "points": points,
      "min_compute": min_compute,
      "irreducible": irreducible,
      "runs": [r.name for r in runs],
      "fits": {},
  }
  for objective in OBJECTIVES:
    own = [r for r in runs if r.objective == objective]
    if not own:
      continue
    compute, loss, owner = select_points(own, metric, x, points, min_compute)
    fits[objective] = fit_power_law(
        compute, loss, owner, bootstrap=bootstrap, irreducible=irreducible
    )
    document["fits"][objective] = dict(fits[objective].summary(), runs=len(own))
    parameters = 3 if irreducible else 2
    if len(own) < 3 or fits[objective].n_points < parameters + 2:
      document.setdefault("warnings", []).append(
          f"the {objective} fit has {parameters} parameters for {fits[objective].n_points} points "
          f"from {len(own)} runs: it interpolates more than it measures; train at least 3 sizes "
          "(and read the multiplier as indicative)"
      )
  multipliers = multipliers_of(runs, fits, metric, x, reference)
  if multipliers:
    document["multipliers"] = multipliers
  if "mdm_vs_arm" in multipliers:
    m = multipliers["mdm_vs_arm"]
    document["multiplier"] = {"at": m["at"], "k": m["k"], "interval": m["interval"]}
  return document, runs, fits


def multipliers_of(
    runs: list[Run],
    fits: dict[str, PowerLawFit],
    metric: str,
    x: str,
    reference: float | None = None,
) -> dict[str, dict[str, Any]]:
  """The compute multiplier of every pair of COMPARISONS whose two objectives are fitted, at
  `reference` compute or else the largest compute the two objectives' runs reach."""
  out = {}
  for objective, against in COMPARISONS:
    if objective not in fits or against not in fits:
      continue
    at = reference or max(
        float(np.max(r.curve(metric, x)[0], initial=0.0))
        for r in runs
        if r.objective in (objective, against)
    )
    k, low, high = compute_multiplier(fits[objective], fits[against], at)
    out[f"{objective}_vs_{against}"] = {
        "objective": objective,
        "reference": against,
        "compares": f"{OBJECTIVES[objective].measure} vs {OBJECTIVES[against].measure}",
        "at": at,
        "k": k,
        "interval": [low, high],
    }
  return out


def multiplier_lines(document: dict[str, Any]) -> list[str]:
  """One line per multiplier of a fits document, e.g. "MDM needs 909x the compute of ARM ..."."""
  lines = []
  for m in document.get("multipliers", {}).values():
    mine, theirs = OBJECTIVES[m["objective"]], OBJECTIVES[m["reference"]]
    name, against = mine.short_name, theirs.short_name
    lines.append(
        f"{name} needs {m['k']:.3g}x the compute of {against} to reach {against}'s loss at "
        f"{m['at']:.3g} [{m['interval'][0]:.3g}, {m['interval'][1]:.3g}] "
        f"({name} {mine.measure} vs {against} {theirs.measure})"
    )
  return lines
