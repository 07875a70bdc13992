"""Scaling-study analysis: collect runs, fit loss against compute per objective (mdm, arm, block),
compare them pairwise (compute multipliers), plot."""

from llada_jax.analysis.fit import (
    PowerLawFit,
    compute_multiplier,
    fit_power_law,
    frontier,
    select_points,
)
from llada_jax.analysis.runs import Run, collect_runs, default_metric, read_records
from llada_jax.analysis.study import analyse, multiplier_lines

__all__ = [
    "PowerLawFit",
    "Run",
    "analyse",
    "collect_runs",
    "compute_multiplier",
    "default_metric",
    "fit_power_law",
    "frontier",
    "multiplier_lines",
    "read_records",
    "select_points",
]
