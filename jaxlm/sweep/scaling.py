"""Scaling-law fits: L(N) = E + A / N^alpha (and L(D)), and an IsoFLOP compute-optimal frontier.

Pure numpy and scipy (scipy.optimize.curve_fit); the ladder summary (jaxlm/sweep/ladder_report.py)
feeds them the final validation losses of a ladder's trials. Every fit returns a `Fit`: its
constants with uncertainties, or the one-line reason it was skipped (too few points, no scipy),
so a summary never fails because a fit could not be made.

Uncertainties are the square roots of the covariance's diagonal, scaled by the residuals (no
noise level is known for one run per point): with exactly as many points as constants there
are no residual degrees of freedom and the uncertainties are infinite, which the tables say.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np

SCIPY_MISSING = ("needs scipy, which is not installed: pip install 'jaxlm[scaling]' (or "
                 "pip install scipy)")


E_AT_BOUND = ("E sits at its bound 0: these points show no floor, so E and alpha trade off "
              "and their errors are not spreads; see the E = 0 fit")


@dataclasses.dataclass(frozen=True)
class Fit:
  """A fitted law, or why there is none (`skipped`)."""
  kind: str  # "power" (y = E + A / x^alpha), "line" (log y = a log x + b) or "parabola".
  names: tuple[str, ...] = ()
  values: tuple[float, ...] = ()
  errors: tuple[float, ...] = ()  # One standard deviation each; inf without residual dof.
  n_points: int = 0
  skipped: str | None = None
  note: str | None = None  # Made, but read with care (say E sits at its bound 0).

  def __getitem__(self, name: str) -> float:
    return self.values[self.names.index(name)]

  def error(self, name: str) -> float:
    return self.errors[self.names.index(name)]

  def predict(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if self.kind == "power":
      return self["E"] + self["A"] * x ** -self["alpha"]
    if self.kind == "line":
      return np.exp(self["b"]) * x ** self["a"]
    lx = np.log(x)
    return self["a"] * lx**2 + self["b"] * lx + self["c"]

  def as_dict(self) -> dict[str, object]:
    if self.skipped:
      return {"kind": self.kind, "skipped": self.skipped, "n_points": self.n_points}
    note = {"note": self.note} if self.note else {}
    return {"kind": self.kind, "n_points": self.n_points, **note,
            **{n: v for n, v in zip(self.names, self.values, strict=True)},
            **{f"{n}_err": _json_float(e) for n, e in zip(self.names, self.errors, strict=True)}}


def _json_float(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None  # JSON has no inf: null means "unknown".


def _errors(pcov: np.ndarray) -> np.ndarray:
  diag = np.diag(np.asarray(pcov, dtype=float))
  return np.where(np.isfinite(diag) & (diag >= 0), np.sqrt(np.abs(diag)), np.inf)


def _clean(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
  keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
  return x[keep], y[keep]


def fit_power_law(x: Sequence[float], y: Sequence[float], what: str = "points") -> Fit:
  """y = E + A / x^alpha by least squares (curve_fit), E >= 0 and alpha > 0.

  Fitted as E + exp(log A - alpha log x): x spans decades, and a fit in log A is well scaled
  where one in A is not. The start is the best straight line of log(y - E) against log x over
  a grid of E below min(y), so curve_fit starts near the answer.
  """
  x, y = _clean(x, y)
  n = len(x)
  if len(np.unique(x)) < 3:
    return Fit("power", n_points=n, skipped=(
        f"needs at least 3 distinct {what} for 3 constants (E, A, alpha), got "
        f"{len(np.unique(x))}"))
  try:
    from scipy.optimize import curve_fit
  except ImportError:
    return Fit("power", n_points=n, skipped=SCIPY_MISSING)
  lx = np.log(x)

  def law(lx, e, log_a, alpha):
    return e + np.exp(log_a - alpha * lx)

  best = None
  for e in np.linspace(0.0, 0.999 * y.min(), 50) if y.min() > 0 else [0.0]:
    slope, intercept = np.polyfit(lx, np.log(np.maximum(y - e, 1e-12)), 1)
    p = (e, intercept, max(-slope, 1e-3))
    sse = float(np.sum((law(lx, *p) - y) ** 2))
    if best is None or sse < best[0]:
      best = (sse, p)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # OptimizeWarning: no covariance at zero dof (inf below).
    try:
      popt, pcov = curve_fit(law, lx, y, p0=best[1], maxfev=20000,
                             bounds=([0.0, -np.inf, 1e-6], [np.inf, np.inf, 10.0]))
    except (RuntimeError, ValueError) as e:
      return Fit("power", n_points=n, skipped=f"curve_fit did not converge: {e}")
  err = _errors(pcov) if n > 3 else np.full(3, np.inf)
  a = math.exp(popt[1])
  # At the bound the covariance describes a one-sided minimum: its errors are not a spread.
  note = (E_AT_BOUND if popt[0] <= 1e-6 * y.min() else None)
  return Fit("power", names=("E", "A", "alpha"), values=(float(popt[0]), a, float(popt[2])),
             errors=(float(err[0]), a * float(err[1]), float(err[2])), n_points=n, note=note)


def fit_line_loglog(x: Sequence[float], y: Sequence[float], what: str = "points") -> Fit:
  """y = exp(b) x^a, a straight line in log-log (how N_opt grows with C)."""
  x, y = _clean(x, y)
  keep = y > 0
  x, y = x[keep], y[keep]
  if len(np.unique(x)) < 2:
    return Fit("line", n_points=len(x), skipped=f"needs at least 2 {what}, got "
               f"{len(np.unique(x))}")
  if len(x) > 2:
    (a, b), cov = np.polyfit(np.log(x), np.log(y), 1, cov=True)
    err = _errors(cov)
  else:
    a, b = np.polyfit(np.log(x), np.log(y), 1)
    err = np.full(2, np.inf)
  return Fit("line", names=("a", "b"), values=(float(a), float(b)),
             errors=(float(err[0]), float(err[1])), n_points=len(x))


def fit_parabola(n: Sequence[float], loss: Sequence[float]) -> tuple[Fit, float | None]:
  """loss = a (log n)^2 + b log n + c over one FLOP budget; (fit, the n at its minimum).

  The minimum is None when the parabola opens downwards (no optimum among these sizes).
  """
  n_arr, loss_arr = _clean(n, loss)
  if len(np.unique(n_arr)) < 3:
    return Fit("parabola", n_points=len(n_arr), skipped=(
        f"needs at least 3 sizes at this budget, got {len(np.unique(n_arr))}")), None
  lx = np.log(n_arr)
  if len(n_arr) > 3:
    coef, cov = np.polyfit(lx, loss_arr, 2, cov=True)
    err = _errors(cov)
  else:
    coef, err = np.polyfit(lx, loss_arr, 2), np.full(3, np.inf)
  fit = Fit("parabola", names=("a", "b", "c"), values=tuple(float(c) for c in coef),
            errors=tuple(float(e) for e in err), n_points=len(n_arr))
  if coef[0] <= 0:
    return fit, None
  return fit, float(math.exp(-coef[1] / (2 * coef[0])))


def plus_minus(value: float, error: float) -> str:
  """'0.312 ± 0.041' (or '0.312 ± inf' where the fit has no residual degrees of freedom)."""
  if not math.isfinite(error):
    return f"{value:.4g} ± inf"
  return f"{value:.4g} ± {error:.2g}"
