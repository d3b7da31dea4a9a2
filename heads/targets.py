"""Target transforms, composable with any head.

A transform has ``fit(Y)``, ``transform(Y)``, ``inverse_transform(Yt)`` (per-gene statistics
learnt on training targets only). ``TargetTransformed(head, transform)`` fits the head on
transformed targets and maps its predictions back, so predictions always come out in the scale
of the targets given to ``fit`` -- like scikit-learn's ``TransformedTargetRegressor``.

Names: none, log1p, standardize, robust, minmax, and chains joined by "+" ("log1p+standardize").
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, clone

from hexpr.heads.base import Head, HeadError, as_matrix, fit_with_supported


def _safe_scale(scale: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """Replace zero/degenerate per-gene scales by ``fallback`` (where usable) or 1."""
    scale = np.asarray(scale, dtype=np.float64)
    if fallback is not None:
        scale = np.where(scale > 0, scale, fallback)
    return np.where(scale > 0, scale, 1.0)


class TargetTransform(BaseEstimator):
    """Base: identity. Subclasses learn per-gene statistics in ``fit``."""

    name = "none"

    def fit(self, Y):
        self.n_genes_ = as_matrix(Y, "Y (targets)").shape[1]
        return self

    def transform(self, Y) -> np.ndarray:
        return self._check(Y).copy()

    def inverse_transform(self, Yt) -> np.ndarray:
        return self._check(Yt).copy()

    def fit_transform(self, Y) -> np.ndarray:
        return self.fit(Y).transform(Y)

    def _check(self, Y) -> np.ndarray:
        Y = np.asarray(Y, dtype=np.float64)
        if Y.ndim != 2 or Y.shape[1] != self.n_genes_:
            raise HeadError(f"{self.name} transform was fitted on {self.n_genes_} genes, got shape {Y.shape}")
        return Y


class Identity(TargetTransform):
    name = "none"


class Log1p(TargetTransform):
    """log(1 + y); needs y > -1 (expression counts or normalized values are >= 0)."""

    name = "log1p"

    def transform(self, Y):
        Y = self._check(Y)
        if (Y <= -1).any():
            raise HeadError("log1p transform needs targets > -1; these targets hold values <= -1 "
                             "(already log-scaled or centred?) -- use transform 'none' or 'standardize'")
        return np.log1p(Y)

    def inverse_transform(self, Yt):
        return np.expm1(self._check(Yt))


class _AffinePerGene(TargetTransform):
    """(y - center) / scale per gene; subclasses define how center and scale are estimated."""

    def _stats(self, Y) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, Y):
        Y = as_matrix(Y, "Y (targets)")
        self.n_genes_ = Y.shape[1]
        self.center_, self.scale_ = self._stats(Y)
        return self

    def transform(self, Y):
        return (self._check(Y) - self.center_) / self.scale_

    def inverse_transform(self, Yt):
        return self._check(Yt) * self.scale_ + self.center_


class Standardize(_AffinePerGene):
    name = "standardize"

    def _stats(self, Y):
        return Y.mean(axis=0), _safe_scale(Y.std(axis=0))


class MinMax(_AffinePerGene):
    """Scale each gene to [0, 1] over the training spots (the 2024 challenge's normalisation)."""

    name = "minmax"

    def _stats(self, Y):
        low = Y.min(axis=0)
        return low, _safe_scale(Y.max(axis=0) - low)


class Robust(_AffinePerGene):
    """(y - median) / IQR per gene, then clipped to +-``clip`` so outliers do not dominate training.

    Genes with a zero IQR (mostly-zero genes) fall back to their standard deviation, then to 1.
    The inverse is exact for values inside the clip range; values beyond it were clipped on purpose.
    """

    name = "robust"

    def __init__(self, clip: float | None = 5.0):
        self.clip = clip

    def _stats(self, Y):
        q25, median, q75 = np.percentile(Y, [25, 50, 75], axis=0)
        return median, _safe_scale(q75 - q25, fallback=Y.std(axis=0))

    def transform(self, Y):
        Z = super().transform(Y)
        return Z if self.clip is None else np.clip(Z, -self.clip, self.clip)


class Chain(TargetTransform):
    """Apply ``steps`` in order; invert in reverse order."""

    def __init__(self, steps=()):
        self.steps = steps

    @property
    def name(self):
        return "+".join(s.name for s in self.steps)

    def fit(self, Y):
        Y = as_matrix(Y, "Y (targets)")
        self.n_genes_ = Y.shape[1]
        self.steps_ = []
        for step in self.steps:
            step = clone(step)
            Y = step.fit(Y).transform(Y)
            self.steps_.append(step)
        return self

    def transform(self, Y):
        Y = self._check(Y)
        for step in self.steps_:
            Y = step.transform(Y)
        return Y

    def inverse_transform(self, Yt):
        Yt = self._check(Yt)
        for step in reversed(self.steps_):
            Yt = step.inverse_transform(Yt)
        return Yt


TRANSFORMS: dict[str, type[TargetTransform]] = {
    "none": Identity, "log1p": Log1p, "standardize": Standardize, "robust": Robust, "minmax": MinMax,
}


def make_transform(spec="none") -> TargetTransform:
    """A new transform from a name, a "+"-joined chain of names, or a TargetTransform instance."""
    if isinstance(spec, TargetTransform):
        return clone(spec)
    if spec is None:
        spec = "none"
    names = [part.strip() for part in str(spec).split("+") if part.strip()]
    unknown = [n for n in names if n not in TRANSFORMS]
    if not names or unknown:
        raise HeadError(f"unknown target transform {spec!r}; choose from {', '.join(TRANSFORMS)} "
                         "or chain them with '+', e.g. 'log1p+standardize'")
    steps = [TRANSFORMS[n]() for n in names]
    return steps[0] if len(steps) == 1 else Chain(steps)


class TargetTransformed(Head):
    """``head`` fitted on ``transform(Y)``; ``predict`` returns ``inverse_transform(head.predict(X))``.

    Forwards to the head, when its ``fit`` accepts them: ``reference_targets`` (the untransformed
    training targets, e.g. to pick highly expressed genes), ``inverse_targets`` (the inverse
    transform, e.g. to score validation predictions in the targets' scale) and validation data
    (transformed).
    """

    def __init__(self, head: Head | None = None, transform="none"):
        self.head = head
        self.transform = transform

    def fit(self, X, Y, **fit_params):
        X, Y = self._start_fit(X, Y, fit_params.get("bags"))
        if self.head is None:
            raise HeadError("TargetTransformed needs a head to wrap")
        self.transform_ = make_transform(self.transform).fit(Y)
        if fit_params.get("Y_val") is not None:
            fit_params["Y_val"] = self.transform_.transform(fit_params["Y_val"])
        fit_params.setdefault("reference_targets", Y)
        fit_params.setdefault("inverse_targets", self.transform_.inverse_transform)
        self.head_ = fit_with_supported(clone(self.head), X, self.transform_.transform(Y), **fit_params)
        return self

    def _predict(self, X):
        return self.transform_.inverse_transform(self.head_.predict(X))
