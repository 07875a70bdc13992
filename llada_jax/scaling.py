"""Fit and plot a scaling study: loss against compute for MDM (LLaDA), ARM and block runs.

  llada-scaling --runs=runs/scaling --out=scaling.png [--x=flops|flops_6nd|tokens]
      [--points=frontier|final] [--metric=bits_per_byte] [--bootstrap=200]
      [--min_compute=C] [--noirreducible]

Reads every workdir under --runs (run.json + metrics.jsonl, written by llada-train and
llada-evaluate), fits L(C) = a (C / C0)^(-b) + c per objective (llada_jax.analysis.fit), prints
the fits and the compute multipliers at which MDM and block diffusion match ARM and block diffusion
matches MDM, writes the plot and the fits as JSON (--fits, default: --out with .json). The same
runs give byte-identical JSON.
"""

from __future__ import annotations

import json
import pathlib

from absl import flags

from llada_jax.analysis.study import analyse, multiplier_lines
from llada_jax.cli_support import entry_point
from llada_jax.errors import ConfigError

_RUNS = flags.DEFINE_string("runs", None, "Directory of training workdirs (searched recursively).")
_OUT = flags.DEFINE_string("out", None, "The plot (PNG).")
_FITS = flags.DEFINE_string("fits", None, "The fits as JSON (default: --out with .json).")
_X = flags.DEFINE_enum(
    "x",
    "flops",
    ["flops", "flops_6nd", "tokens"],
    "Compute axis: exact FLOPs, 6 N D FLOPs, or tokens.",
)
_POINTS = flags.DEFINE_enum(
    "points",
    "frontier",
    ["frontier", "final"],
    "Fit the compute frontier of all evaluations or each run's final one.",
)
_METRIC = flags.DEFINE_string(
    "metric",
    None,
    "Evaluation metric (default: bits_per_byte when every run has it, else loss_bound).",
)
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 200, "Bootstrap refits over runs (0: none).")
_MIN_COMPUTE = flags.DEFINE_float(
    "min_compute",
    0.0,
    "Fit only points at this compute or more (in the units of --x), e.g. past an early plateau.",
)
_IRREDUCIBLE = flags.DEFINE_bool(
    "irreducible",
    True,
    "Fit the irreducible loss c; --noirreducible fits a pure power law (c = 0).",
)
_REFERENCE = flags.DEFINE_float(
    "reference_flops",
    None,
    "Compute at which multipliers are quoted (default: the largest of the 2 objectives' runs).",
)


def _scaling(argv: list[str]) -> None:
  """The `llada-scaling` command: frontier, fits and plot of a folder of runs."""
  del argv
  from llada_jax.analysis.plot import plot_scaling  # pylint: disable=g-import-not-at-top

  if not _RUNS.value or not _OUT.value:
    raise ConfigError("--runs and --out are required, e.g. --runs=runs/scaling --out=scaling.png")
  document, runs, fits = analyse(
      _RUNS.value,
      _X.value,
      _POINTS.value,
      _METRIC.value,
      _BOOTSTRAP.value,
      _REFERENCE.value,
      _MIN_COMPUTE.value,
      _IRREDUCIBLE.value,
  )
  print(
      f"{len(runs)} runs; metric {document['metric']} against {document['x']}; "
      f"{document['points']} points"
      + (f" at {_MIN_COMPUTE.value:.3g} or more" if _MIN_COMPUTE.value else "")
  )
  print("objective | runs | points | a | b [16%, 84%] | c [16%, 84%] | rms log residual")
  for objective, fit in fits.items():
    summary = document["fits"][objective]
    b_low, b_high = summary["b_interval"]
    c_low, c_high = summary["c_interval"]
    print(
        f"{objective} | {summary['runs']} | {fit.n_points} | {fit.a:.4g} | {fit.b:.3f} "
        f"[{b_low:.3f}, {b_high:.3f}] | {fit.c:.3f} [{c_low:.3f}, {c_high:.3f}] | {fit.rms:.4f}"
    )
  for warning in document.get("warnings", []):
    print(f"warning: {warning}")
  for line in multiplier_lines(document):
    print(line)
  plot_scaling(runs, fits, document["metric"], document["x"], _OUT.value, _MIN_COMPUTE.value)
  fits_path = pathlib.Path(_FITS.value or pathlib.Path(_OUT.value).with_suffix(".json"))
  fits_path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
  print(f"wrote {_OUT.value} and {fits_path}")


run = entry_point(_scaling)  # console script `llada-scaling`


if __name__ == "__main__":
  run()
