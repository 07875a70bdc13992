"""The scaling plot: evaluation loss against compute per run and the fit per objective, and
downstream accuracy against compute when runs carry evaluation results."""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from llada_jax.analysis.fit import PowerLawFit
from llada_jax.analysis.runs import Run
from llada_jax.config import OBJECTIVES
from llada_jax.errors import ConfigError

X_LABELS = {
    "flops": "training FLOPs (exact count)",
    "flops_6nd": "training FLOPs (6 N D)",
    "tokens": "training tokens",
}
Y_LABELS = {"bits_per_byte": "held-out bits/byte", "loss_bound": "held-out nats/token"}


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("matplotlib is not installed: pip install 'llada_jax[analysis]'") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def accuracy_metrics(runs: Sequence[Run]) -> list[str]:
  """Downstream accuracies recorded by any run (`<task>/acc`), sorted."""
  return sorted({m for run in runs for m in run.metrics() if m.endswith("/acc")})


def objective_label(objective: str, runs: Sequence[Run]) -> str:
  """The legend name of an objective; block diffusion's names the block size B of its runs
  (diffusion.block_size of run.json's config) when they all share one."""
  if OBJECTIVES[objective].blocks:
    sizes = {
        r.description.get("config", {}).get("diffusion", {}).get("block_size")
        for r in runs
        if r.objective == objective
    }
    if len(sizes) == 1 and None not in sizes:
      return f"{OBJECTIVES[objective].label} (B={sizes.pop()})"
  return OBJECTIVES[objective].label


def plot_scaling(
    runs: Sequence[Run],
    fits: dict[str, PowerLawFit],
    metric: str,
    x: str,
    out: str | pathlib.Path,
    min_compute: float = 0.0,
) -> dict[str, str]:
  """Writes the PNG: thin lines per run (shade by size), thick fitted curve per objective over
  the compute it was fitted on (from `min_compute`), for every objective of the runs. Returns
  the colour of each entry of the loss panel's legend, by label."""
  plt = _pyplot()
  accuracies = accuracy_metrics(runs)
  panels = 2 if accuracies else 1
  fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 6.4), dpi=120, squeeze=False)
  ax = axes[0, 0]
  objectives = [o for o in OBJECTIVES if any(r.objective == o for r in runs)]
  columns = max(2, len(objectives))  # the legend: a column per objective
  wrap = "\n" if columns > 2 else " "  # three columns of fit labels fit the width on two lines
  for objective in objectives:
    own = [r for r in runs if r.objective == objective]
    for rank, run in enumerate(own):
      xs, ys = run.curve(metric, x)
      shade = 0.35 + 0.65 * (rank + 1) / len(own)
      ax.plot(
          xs,
          ys,
          "o-",
          color=OBJECTIVES[objective].colour,
          alpha=shade,
          lw=0.8,
          ms=2.5,
          label=f"{run.name} ({run.parameters / 1e6:.2f}M)",
      )
    if objective in fits:
      fit = fits[objective]
      grid = np.geomspace(
          max(min(min(r.curve(metric, x)[0]) for r in own), min_compute),
          max(max(r.curve(metric, x)[0]) for r in own),
          200,
      )
      low, high = fit.interval(1)
      ax.plot(
          grid,
          fit.predict(grid),
          color=OBJECTIVES[objective].colour,
          lw=2.5,
          label=f"{objective_label(objective, runs)} fit:{wrap}b = {fit.b:.3f} "
          f"[{low:.3f}, {high:.3f}], c = {fit.c:.2f}",
      )
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel(X_LABELS.get(x, x))
  ax.set_ylabel(Y_LABELS.get(metric, metric))
  ax.set_title("loss vs compute: L(C) = a C^-b + c")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=columns)
  handles, labels = ax.get_legend_handles_labels()
  legend = {name: handle.get_color() for handle, name in zip(handles, labels)}
  if accuracies:
    ax = axes[0, 1]
    for run in runs:
      for name in accuracies:
        xs, ys = run.curve(name, x)
        if len(xs):
          ax.plot(
              xs,
              ys,
              "o",
              color=OBJECTIVES[run.objective].colour,
              alpha=0.8,
              label=f"{run.name} {name}",
          )
    ax.set_xscale("log")
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel("accuracy")
    ax.set_title("downstream accuracy vs compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5)
  fig.tight_layout()
  fig.savefig(out, metadata={"Software": None})
  plt.close(fig)
  return legend
