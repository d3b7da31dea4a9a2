"""How far to trust a prediction: member spread, split-conformal intervals, the training range.

* ``target_range(Y)``: per-gene min/max of the training targets; ``fit_head`` stores it in the model
  and predictions are clipped to it (log-expression below the smallest value seen is noise).
* ``member_predictions`` / ``predict_with_spread``: a head holding several fitted members (a
  ``bagged`` head) predicts their mean; the members' standard deviation (in the targets' scale) is
  the spread. Other heads have no spread (None).
* ``calibrate(truth, oof, spread)``: split-conformal calibration on out-of-fold predictions (grouped
  folds: each residual comes from a model that never saw that spot's slide, as a new slide will be).
  Score per spot and gene: ``|y - yhat| / (spread + eps)`` when a spread is known (eps: the gene's
  median out-of-fold spread, so near-zero spreads do not give zero-width intervals), else ``|y - yhat|``.
  Per gene and for each level of ``LEVELS`` the ``ceil((n + 1) * level)``-th smallest score is kept:
  a few numbers per gene, not the residuals.
* ``predict_uncertain(fitted, X, interval, clip)``: mean (clipped), std, and ``lower``/``upper`` =
  mean -/+ quantile * (spread + eps), clipped to the training range. A level between stored levels
  uses the next higher stored one (never narrower than asked).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from hexpr.embedder.errors import UsageError
from hexpr.heads.bagging import SeedBagged
from hexpr.heads.base import as_matrix
from hexpr.heads.targets import TargetTransformed

LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99)
DEFAULT_INTERVAL = 0.9
RANGE_KEY = "target_range"
CONFORMAL_KEY = "conformal"


class UncertaintyWarning(UserWarning):
    """A model cannot give what was asked (no recorded range, no calibration); predictions still come."""


def check_interval(level) -> float | None:
    """``level`` (None: no intervals) as a float strictly between 0 and 1, else a UsageError."""
    if level is None:
        return None
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0 < float(level) < 1:
        raise UsageError(f"--interval must be a coverage strictly between 0 and 1 (e.g. 0.9 for 90 % intervals), got {level!r}")
    return float(level)


def stored_level(levels, level: float) -> float:
    """The smallest stored level >= ``level``; a UsageError when ``level`` is above them all."""
    above = [float(v) for v in levels if float(v) >= level - 1e-9]
    if not above:
        raise UsageError(f"--interval {level:g} is above the highest coverage this model was calibrated for "
                         f"({max(levels):g}); use at most {max(levels):g}")
    return min(above)


def check_model_interval(fitted, level) -> float | None:
    """``check_interval(level)``, then a UsageError when ``fitted`` stores quantiles only below ``level``."""
    level = check_interval(level)
    calibration = (getattr(fitted, "extra", None) or {}).get(CONFORMAL_KEY)
    if level is not None and calibration is not None:
        stored_level(calibration["levels"], level)
    return level


# --------------------------------------------------------------------------------------------
# fit time
# --------------------------------------------------------------------------------------------
def target_range(Y) -> dict:
    Y = np.asarray(Y, dtype=np.float64)
    return {"min": Y.min(axis=0), "max": Y.max(axis=0)}


def conformal_quantiles(scores, levels=LEVELS) -> np.ndarray:
    """(L, G): per column the ``ceil((n + 1) * level)``-th smallest of ``n`` scores (inf when that exceeds n)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64), axis=0)
    n = scores.shape[0]
    out = np.full((len(levels), scores.shape[1]), np.inf)
    for i, level in enumerate(levels):
        k = math.ceil((n + 1) * float(level))
        if k <= n:
            out[i] = scores[k - 1]
    return out


def calibrate(truth, oof, spread=None, levels=LEVELS, value_range: dict | None = None) -> dict:
    """Split-conformal calibration of out-of-fold predictions ``oof`` against ``truth`` (both (N, G);
    rows with NaN predictions, never held out, are skipped). ``spread``: the out-of-fold member
    spread (normalised scores), or None (absolute residuals). ``value_range``: clip ``oof`` to it
    first, as predictions will be."""
    truth, oof = np.asarray(truth, dtype=np.float64), np.asarray(oof, dtype=np.float64)
    held = ~np.isnan(oof).any(axis=1)
    if held.sum() < 2:
        raise ValueError("conformal calibration needs out-of-fold predictions of at least 2 spots")
    truth, oof = truth[held], oof[held]
    if value_range is not None:
        oof = np.clip(oof, value_range["min"], value_range["max"])
    scores = np.abs(truth - oof)
    eps = None
    if spread is not None:
        spread = np.asarray(spread, dtype=np.float64)[held]
        eps = np.median(spread, axis=0)
        eps = np.where(eps > 0, eps, max(float(np.median(spread)), 1e-6))
        scores = scores / (spread + eps)
    return {"levels": [float(v) for v in levels], "quantiles": conformal_quantiles(scores, levels).astype(np.float32),
            "normalised": spread is not None, "eps": None if eps is None else eps.astype(np.float32),
            "n_calibration": int(held.sum()),
            "score": "|y - yhat| / (member spread + eps)" if spread is not None else "|y - yhat|"}


# --------------------------------------------------------------------------------------------
# members and their spread
# --------------------------------------------------------------------------------------------
def member_predictions(model, X) -> tuple[list[np.ndarray], object] | None:
    """(raw member predictions, inverse target transform or None) of a model whose head holds
    several fitted members (``bagged``, optionally behind a target transform); None otherwise."""
    head, inverse = model, None
    if isinstance(model, TargetTransformed):
        head, inverse = model.head_, model.transform_.inverse_transform
    members = getattr(head, "members_", None) if isinstance(head, SeedBagged) else None
    if not members or len(members) < 2:
        return None
    X = as_matrix(X, "X (features)")
    return [np.asarray(m.predict(X), dtype=np.float64) for m in members], inverse


def predict_with_spread(model, X) -> tuple[np.ndarray, np.ndarray | None]:
    """(mean prediction, members' std in the targets' scale or None). The mean is what
    ``model.predict`` returns; members are predicted once."""
    found = member_predictions(model, X)
    if found is None:
        return np.asarray(model.predict(X), dtype=np.float64), None
    raw, inverse = found
    scaled = np.stack(raw if inverse is None else [inverse(r) for r in raw])
    mean = np.mean(raw, axis=0)
    return (mean if inverse is None else np.asarray(inverse(mean), dtype=np.float64)), scaled.std(axis=0)


# --------------------------------------------------------------------------------------------
# predict time
# --------------------------------------------------------------------------------------------
@dataclass
class UncertainPrediction:
    """Predictions (N, G) with what is known about their uncertainty."""

    mean: np.ndarray                 # clipped to the training range unless raw was asked
    std: np.ndarray | None           # members' spread (bagged heads), else None
    lower: np.ndarray | None         # conformal interval at ``level`` (None: not calibrated / not asked)
    upper: np.ndarray | None
    level: float | None              # the stored coverage the interval uses
    clipped: bool

    def layers(self) -> dict[str, np.ndarray]:
        """The uncertainty arrays that exist, by layer name (``std``, ``lower``, ``upper``)."""
        named = {"std": self.std, "lower": self.lower, "upper": self.upper}
        return {k: v for k, v in named.items() if v is not None}

    def summary(self) -> dict:
        return {"clipped_to_training_range": self.clipped, "interval": self.level, "layers": sorted(self.layers())}


def predict_uncertain(fitted, X, interval: float | None = DEFAULT_INTERVAL, clip: bool = True) -> UncertainPrediction:
    """Predictions of a ``FittedModel`` with spread and conformal intervals (see the module doc).
    Models saved before ranges/calibration were recorded predict unclipped / without intervals, with a warning."""
    interval = check_interval(interval)
    extra = getattr(fitted, "extra", None) or {}
    value_range, calibration = extra.get(RANGE_KEY), extra.get(CONFORMAL_KEY)
    level = None if interval is None or calibration is None else stored_level(calibration["levels"], interval)
    mean, std = predict_with_spread(fitted.model, fitted.checked_features(X))
    lower = upper = None
    if interval is not None and calibration is None:
        warnings.warn("this model has no conformal calibration (fitted before hexpr recorded it, or from a "
                      "prediction-only model): no prediction intervals; refit it with fit-head to get them",
                      UncertaintyWarning, stacklevel=2)
    clipped = bool(clip and value_range is not None)
    if clip and value_range is None:
        warnings.warn("this model does not record its training targets' range (fitted before hexpr did): "
                      "predictions are not clipped; refit it with fit-head to clip them", UncertaintyWarning, stacklevel=2)
    if clipped:
        mean = np.clip(mean, value_range["min"], value_range["max"])
    if level is not None:
        q = np.asarray(calibration["quantiles"], dtype=np.float64)[list(calibration["levels"]).index(level)]
        if calibration["normalised"] and std is not None:
            half = q * (std + np.asarray(calibration["eps"], dtype=np.float64))
        elif calibration["normalised"]:  # cannot happen for a model fitted by fit_head; be safe
            raise ValueError("normalised conformal calibration without member spread")
        else:
            half = np.broadcast_to(q, mean.shape)
        lower, upper = mean - half, mean + half
        if clipped:
            lower = np.clip(lower, value_range["min"], value_range["max"])
            upper = np.clip(upper, value_range["min"], value_range["max"])
    return UncertainPrediction(mean=mean, std=std, lower=lower, upper=upper, level=level, clipped=clipped)
