"""Power-law fits of loss against compute, L(C) = a (C / C0)^(-b) + c, and the compute multiplier
of one objective against another.

Points are either the compute frontier of all of an objective's evaluation records (a record is
kept when no record at equal or lower compute has a lower loss: the lower envelope of the learning
curves, as in Kaplan et al.) or each run's final record; `min_compute` then drops the points below
a compute (an early regime the law should not describe, such as a unigram plateau). The fit
minimises squared log-loss residuals (every decade of loss weighs the same) with c in
[0, min loss) (or c = 0: a pure power law, the one shape a short range of compute can pin down),
b in (0, 5]; C0 is the geometric mean of the points' compute, so a is the loss above c at C0.
Uncertainty: the Gauss-Newton standard errors of the one fit and a bootstrap over runs (runs
resampled with replacement, refit), whose 16th-84th percentiles are the quoted intervals.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import optimize

from llada_jax.analysis.runs import Run
from llada_jax.errors import ConfigError

POINTS = ("frontier", "final")


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """L(C) = a (C / scale)^(-b) + c with standard errors and bootstrap samples [n, 3] of
  (a, b, c)."""

  a: float
  b: float
  c: float
  scale: float
  stderr: tuple[float, float, float]
  n_points: int
  rms: float  # of the log-loss residuals
  bootstrap: np.ndarray = dataclasses.field(repr=False, compare=False)

  def predict(self, compute: np.ndarray | float) -> np.ndarray:
    return self.a * (np.asarray(compute, np.float64) / self.scale) ** (-self.b) + self.c

  def compute_for(self, loss: np.ndarray | float) -> np.ndarray:
    """The compute at which the fit reaches `loss` (inf at or below the asymptote c)."""
    return _compute_for(self.a, self.b, self.c, self.scale, np.asarray(loss, np.float64))

  def interval(self, index: int) -> tuple[float, float]:
    """16th and 84th percentiles of parameter a (0), b (1) or c (2) over the bootstrap."""
    if len(self.bootstrap) == 0:
      return float("nan"), float("nan")
    low, high = np.percentile(self.bootstrap[:, index], [16, 84])
    return float(low), float(high)

  def summary(self) -> dict[str, float | int | list[float]]:
    """The numbers of the fit as plain JSON values."""
    out: dict[str, float | int | list[float]] = dict(
        a=self.a,
        b=self.b,
        c=self.c,
        scale=self.scale,
        n_points=self.n_points,
        rms=self.rms,
        bootstrap_samples=len(self.bootstrap),
    )
    for index, name in enumerate("abc"):
      out[f"{name}_stderr"] = self.stderr[index]
      out[f"{name}_interval"] = list(self.interval(index))
      out[f"{name}_bootstrap_std"] = (
          float(np.std(self.bootstrap[:, index])) if len(self.bootstrap) else float("nan")
      )
    return out


def _compute_for(a, b, c, scale, loss):
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    return np.where(loss > c, scale * (a / np.maximum(loss - c, 1e-300)) ** (1.0 / b), np.inf)


def frontier(compute: np.ndarray, loss: np.ndarray) -> np.ndarray:
  """Indices of the lower envelope: points with a lower loss than every point of less compute."""
  order = np.lexsort((loss, compute))
  keep, best = [], np.inf
  for i in order:
    if loss[i] < best:
      keep.append(i)
      best = loss[i]
  return np.asarray(keep, np.int64)


def select_points(
    runs: Sequence[Run],
    metric: str,
    x: str = "flops",
    points: str = "frontier",
    min_compute: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(compute, loss, run index) of the points a fit uses (see the module docstring)."""
  if points not in POINTS:
    raise ConfigError(f"points={points!r} is not allowed: expected one of {', '.join(POINTS)}")
  if not min_compute >= 0:  # pylint: disable=unnecessary-negation  # NaN fails too
    raise ConfigError(f"min_compute={min_compute} is not allowed: expected a number >= 0")
  compute, loss, owner = [], [], []
  for index, run in enumerate(runs):
    xs, ys = run.curve(metric, x)
    keep = xs > 0
    xs, ys = xs[keep], ys[keep]
    if points == "final":
      xs, ys = xs[-1:], ys[-1:]
    compute.extend(xs)
    loss.extend(ys)
    owner.extend([index] * len(xs))
  compute, loss, owner = (np.asarray(v) for v in (compute, loss, owner))
  if points == "frontier" and len(compute):
    keep = frontier(compute, loss)
    compute, loss, owner = compute[keep], loss[keep], owner[keep]
  keep = compute >= min_compute
  return compute[keep], loss[keep], owner[keep]


def _fit_once(
    compute: np.ndarray,
    loss: np.ndarray,
    scale: float,
    irreducible: bool = True,
    start: tuple[float, float, float] | None = None,
):
  """Least squares on log loss from several starts (or from `start`, a previous fit's (a, b, c));
  c stays 0 unless `irreducible`. (params, stderr, rms) or None."""
  z = np.log(compute / scale)
  target = np.log(loss)
  floor = float(np.min(loss))

  def residual(p):
    c = p[2] if irreducible else 0.0
    return np.log(np.exp(p[0]) * np.exp(-p[1] * z) + c) - target

  if start is None:
    starts = [
        (max(float(np.exp(np.mean(np.log(np.maximum(loss - c0, 1e-6))))), 1e-6), b0, c0)
        for c0 in ((0.0, 0.5 * floor, 0.9 * floor) if irreducible else (0.0,))
        for b0 in (0.1, 0.3, 1.0)
    ]
  else:
    starts = [(start[0], start[1], min(start[2], 0.99 * floor))]
  lower, upper = [-50.0, 1e-6, 0.0], [50.0, 5.0, floor * (1 - 1e-9)]
  size = 3 if irreducible else 2
  best = None
  for a0, b0, c0 in starts:
    try:
      result = optimize.least_squares(
          residual, [np.log(a0), b0, c0][:size], bounds=(lower[:size], upper[:size])
      )
    except ValueError:
      continue
    if best is None or result.cost < best.cost:
      best = result
  if best is None:
    return None
  log_a, b, c = (*best.x, 0.0) if size == 2 else best.x
  dof = max(len(loss) - size, 1)
  sigma2 = 2 * best.cost / dof
  jac = best.jac * np.array([1.0 / np.exp(log_a), 1.0, 1.0][:size])  # d/da instead of d/dlog a
  cov = np.linalg.pinv(jac.T @ jac) * sigma2
  stderr = tuple(float(np.sqrt(max(v, 0.0))) for v in np.diag(cov)) + (0.0,) * (3 - size)
  rms = float(np.sqrt(np.mean(best.fun**2)))
  return (float(np.exp(log_a)), float(b), float(c)), stderr, rms


def fit_power_law(
    compute: np.ndarray,
    loss: np.ndarray,
    owner: np.ndarray | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    irreducible: bool = True,
) -> PowerLawFit:
  """Fits L(C) = a (C / C0)^(-b) + c (c = 0 unless `irreducible`) to at least 3 points;
  bootstraps over `owner` (run) groups."""
  compute, loss = np.asarray(compute, np.float64), np.asarray(loss, np.float64)
  if len(compute) < 3 or len(np.unique(compute)) < 3:
    raise ConfigError(
        f"a power-law fit needs at least 3 points of different compute, got "
        f"{len(np.unique(compute))}: run more sizes or evaluate more often"
    )
  scale = float(np.exp(np.mean(np.log(compute))))
  fitted = _fit_once(compute, loss, scale, irreducible)
  if fitted is None:
    raise ConfigError("the power-law fit did not converge on these points")
  (a, b, c), stderr, rms = fitted
  owner = np.arange(len(compute)) if owner is None else np.asarray(owner)
  groups = np.unique(owner)
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(bootstrap if len(groups) > 1 else 0):
    chosen = rng.choice(groups, size=len(groups), replace=True)
    rows = np.concatenate([np.flatnonzero(owner == g) for g in chosen])
    if len(np.unique(compute[rows])) < 3:
      continue
    refit = _fit_once(compute[rows], loss[rows], scale, irreducible, start=(a, b, c))
    if refit is not None:
      samples.append(refit[0])
  return PowerLawFit(
      a, b, c, scale, stderr, len(compute), rms, np.asarray(samples, np.float64).reshape(-1, 3)
  )


def compute_multiplier(
    fit: PowerLawFit, reference: PowerLawFit, at: float
) -> tuple[float, float, float]:
  """k such that `fit` at k C reaches the `reference` fit's loss at C, with the 16th-84th
  percentiles over paired bootstrap fits (nan without them); k > 1: `fit` needs more compute.

  The study compares MDM and block diffusion with ARM and block diffusion with MDM. A diffusion
  objective's loss is a *bound* on its NLL, so against the ARM's exact NLL k overstates what it
  needs to match ARM's likelihood (the bound >= the NLL); two bounds compare bound with bound.
  """
  k = float(fit.compute_for(reference.predict(at)) / at)
  n = min(len(fit.bootstrap), len(reference.bootstrap))
  if not n:
    return k, float("nan"), float("nan")
  m, r = fit.bootstrap[:n], reference.bootstrap[:n]
  reference_loss = r[:, 0] * (at / reference.scale) ** (-r[:, 1]) + r[:, 2]
  ks = _compute_for(m[:, 0], m[:, 1], m[:, 2], fit.scale, reference_loss) / at
  low, high = np.percentile(ks, [16, 84], method="nearest")  # ks may hold inf
  return k, float(low), float(high)
