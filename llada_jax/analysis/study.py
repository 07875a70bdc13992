"""A scaling study as a whole: every run of a directory, one fit per objective, the multiplier."""

from __future__ import annotations

import numpy as np

from llada_jax.analysis.fit import compute_multiplier, fit_power_law, select_points
from llada_jax.analysis.runs import collect_runs, default_metric

SCHEMA = 1


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
  runs or points to constrain their parameters."""
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
  for objective in ("mdm", "arm"):
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
  if len(fits) == 2:
    reference = reference or max(float(np.max(r.curve(metric, x)[0])) for r in runs)
    k, low, high = compute_multiplier(fits["mdm"], fits["arm"], reference)
    document["multiplier"] = {"at": reference, "k": k, "interval": [low, high]}
  return document, runs, fits
