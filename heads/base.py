"""What every head shares: the estimator base class, input checks, the registry, feature steps.

A *head* maps cached image features ``X`` (N spots, D features) to expression ``Y`` (N, G genes).
Heads follow scikit-learn conventions: the constructor stores hyper-parameters only, ``fit(X, Y)``
learns state kept in attributes ending in ``_``, ``predict(X)`` returns an (N, G) float array.
``save(path)`` / ``Head.load(path)`` round-trip a head through joblib.

Registry: ``HEADS`` maps a name ("mean", "ridge", ...) to its class (``registered_heads()`` fills
it; a head's module is imported on first use, so torch loads only for torch heads);
``make_head(name, **params)`` builds one; ``default_search_space(name)`` is the space a random-search sweep samples from. A head
class declares that space in its ``search_space`` class attribute, written as
``{param: [choices...]}`` or ``{param: {"log": [low, high]}}`` / ``{"uniform": [low, high]}`` /
``{"int": [low, high]}`` (see heads.sweep).

Feature steps live here too, because several heads share them: ``FeaturePCA`` (standardize, then
optionally project on the leading principal components) and ``FeatureReduced`` (any head behind
that step, itself a head).
"""
from __future__ import annotations

import copy
import importlib
import inspect
from contextlib import contextmanager
from pathlib import Path

import joblib
import numpy as np
from sklearn.base import BaseEstimator, clone

from embedder.errors import UsageError
from embedder.files import atomic_write
from heads.params import N_COMPONENTS, SEED, Bool, param_problems

HEADS: dict[str, type["Head"]] = {}


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
class HeadError(UsageError):
    """Bad head input or configuration (unknown head or parameter, bad folds, shapes, sweep file)."""


def as_matrix(a, name: str, dtype=np.float64) -> np.ndarray:
    """``a`` as a finite 2-D float array, or a ValueError naming ``name``."""
    arr = np.asarray(a, dtype=dtype)
    if arr.ndim != 2:
        raise HeadError(f"{name} must be a 2-D array (spots x columns), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise HeadError(f"{name} is empty (shape {arr.shape})")
    if not np.isfinite(arr).all():
        row, col = np.argwhere(~np.isfinite(arr))[0]
        raise HeadError(f"{name} holds NaN/inf (first at row {row}, column {col})")
    return arr


def check_pair(X, Y) -> tuple[np.ndarray, np.ndarray]:
    """Validated (X, Y) with the same number of rows."""
    X = as_matrix(X, "X (features)")
    Y = as_matrix(Y, "Y (targets)")
    if X.shape[0] != Y.shape[0]:
        raise HeadError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}; they must describe the same spots")
    return X, Y


def rng_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (train, validation) row indices with ``fraction`` of ``n`` rows held out (>= 1)."""
    if not 0.0 < fraction < 1.0:
        raise HeadError(f"validation fraction must be in (0, 1), got {fraction}")
    n_val = max(1, int(round(n * fraction)))
    if n - n_val < 2:
        raise HeadError(f"too few spots ({n}) to hold out a validation split of {fraction:.0%}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def fit_with_supported(estimator, X, Y, **fit_params):
    """``estimator.fit(X, Y, **kw)`` passing only the keyword arguments its ``fit`` accepts.

    Lets wrappers forward optional information (``groups``, ``reference_targets``, validation
    data) to the heads that use it without every head having to accept everything.
    """
    accepted = inspect.signature(estimator.fit).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kept = {k: v for k, v in fit_params.items() if v is not None and (takes_any or k in accepted)}
    return estimator.fit(X, Y, **kept)


# --------------------------------------------------------------------------------------------
# persistence
# --------------------------------------------------------------------------------------------
def atomic_dump(obj, path) -> Path:
    """joblib-dump ``obj`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: joblib.dump(obj, tmp))


class Head(BaseEstimator):
    """Base of every head. Subclasses implement ``fit`` and ``_predict`` (on validated X)."""

    search_space: dict = {}
    param_constraints: dict = {}   # param -> heads.params constraint, checked by make_head
    name: str = ""

    def fit(self, X, Y):  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- fitted-state bookkeeping shared by all heads --
    def _start_fit(self, X, Y) -> tuple[np.ndarray, np.ndarray]:
        problems = param_problems(self.name or type(self).__name__, self.param_constraints, self.get_params(deep=False))
        if problems:
            raise HeadError(problems[0])
        X, Y = check_pair(X, Y)
        self.n_features_in_ = X.shape[1]
        self.n_targets_ = Y.shape[1]
        return X, Y

    def is_fitted(self) -> bool:
        return hasattr(self, "n_features_in_")

    def predict(self, X) -> np.ndarray:
        if not self.is_fitted():
            raise RuntimeError(f"{type(self).__name__} is not fitted yet; call fit(X, Y) first")
        X = as_matrix(X, "X (features)")
        if X.shape[1] != self.n_features_in_:
            raise HeadError(
                f"{type(self).__name__} was fitted on {self.n_features_in_} features but X has "
                f"{X.shape[1]}; use features from the same backbone(s) as at training time")
        return np.asarray(self._predict(X), dtype=np.float64)

    def save(self, path) -> Path:
        return atomic_dump(self, path)

    @classmethod
    def load(cls, path):
        obj = joblib.load(path)
        if not isinstance(obj, cls):
            raise TypeError(f"{path} holds a {type(obj).__name__}, not a {cls.__name__}")
        return obj


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
# where each head is defined: a head's module (and its heavy imports, e.g. torch) loads on first use
HEAD_MODULES = {
    "mean": "heads.mean", "ridge": "heads.ridge", "hest": "heads.ridge", "mlp": "heads.mlp",
    "gbm": "heads.gbm", "knn": "heads.knn", "bleep": "heads.knn", "ensemble": "heads.ensemble",
    "ridge_streamed": "heads.streamed_ridge", "mlp_streamed": "heads.chunked_mlp", "bagged": "heads.bagging",
}


def register_head(name: str):
    """Class decorator: make the head buildable as ``make_head(name)`` (list it in HEAD_MODULES)."""
    def decorate(cls):
        if name in HEADS and HEADS[name] is not cls:
            raise HeadError(f"head name {name!r} is already registered by {HEADS[name].__name__}")
        cls.name = name
        HEADS[name] = cls
        return cls
    return decorate


def registered_heads() -> dict[str, type[Head]]:
    """The registry with every head module imported."""
    for module in sorted(set(HEAD_MODULES.values())):
        importlib.import_module(module)
    return HEADS


def _head_class(name: str) -> type[Head]:
    if name not in HEADS and name in HEAD_MODULES:
        importlib.import_module(HEAD_MODULES[name])
    if name not in HEADS:
        raise HeadError(f"unknown head {name!r}; choose one of: {', '.join(sorted(registered_heads()))}")
    return HEADS[name]


def head_param_names(name: str) -> list[str]:
    """The constructor hyper-parameters of head ``name``."""
    return sorted(_head_class(name)().get_params(deep=False))


def make_head(name: str, **params) -> Head:
    """A new, unfitted head ``name`` with ``params``; unknown parameters are a clear ValueError."""
    cls = _head_class(name)
    unknown = sorted(set(params) - set(head_param_names(name)))
    if unknown:
        raise HeadError(f"head {name!r} has no parameter(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(head_param_names(name))}")
    problems = param_problems(name, cls.param_constraints, params)
    if problems:
        raise HeadError(problems[0])
    return cls(**params)


def default_search_space(name: str) -> dict:
    """Copy of the random-search space of head ``name`` (param -> choices or distribution)."""
    return copy.deepcopy(_head_class(name).search_space)


# --------------------------------------------------------------------------------------------
# feature steps
# --------------------------------------------------------------------------------------------
class FeaturePCA(BaseEstimator):
    """Standardize features (zero mean, unit variance; constant columns left at 0) and optionally
    keep the leading ``n_components`` principal components. ``whiten`` scales them to unit variance.
    """

    def __init__(self, n_components: int | None = None, standardize: bool = True,
                 whiten: bool = False, seed: int = 0):
        self.n_components = n_components
        self.standardize = standardize
        self.whiten = whiten
        self.seed = seed

    def fit(self, X):
        X = as_matrix(X, "X (features)")
        self.mean_ = X.mean(axis=0)
        std = X.std(axis=0)
        self.scale_ = np.where(std > 1e-12 * max(1.0, float(np.abs(X).max())), std, 1.0)
        if not self.standardize:
            self.scale_ = np.ones_like(self.scale_)
        self.components_ = None
        if self.n_components is not None:
            Z = (X - self.mean_) / self.scale_
            k = int(min(self.n_components, *Z.shape))
            # principal axes from the Gram matrix: one (D, D) product and a symmetric eigensolve
            gram = Z.T @ Z
            eigval, eigvec = np.linalg.eigh(gram)
            top = np.argsort(eigval)[::-1][:k]
            eigvec = eigvec[:, top]
            # fix the sign of each axis so results do not depend on the LAPACK build
            eigvec *= np.where(eigvec[np.abs(eigvec).argmax(axis=0), range(k)] < 0, -1.0, 1.0)
            self.components_ = eigvec
            self.explained_variance_ = np.clip(eigval[top], 0, None) / max(1, X.shape[0] - 1)
        return self

    def transform(self, X) -> np.ndarray:
        Z = (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_
        if self.components_ is not None:
            Z = Z @ self.components_
            if self.whiten:
                Z /= np.sqrt(np.where(self.explained_variance_ > 0, self.explained_variance_, 1.0))
        return Z

    def fit_transform(self, X) -> np.ndarray:
        return self.fit(X).transform(X)

    @property
    def n_output_(self) -> int:
        return len(self.mean_) if self.components_ is None else self.components_.shape[1]


class FeatureReduced(Head):
    """Any head behind a ``FeaturePCA`` step: ``FeatureReduced(make_head("mlp"), n_components=256)``."""

    param_constraints = {"n_components": N_COMPONENTS, "standardize": Bool(), "whiten": Bool(), "seed": SEED}

    def __init__(self, head: Head | None = None, n_components: int | None = 256,
                 standardize: bool = True, whiten: bool = False, seed: int = 0):
        self.head = head
        self.n_components = n_components
        self.standardize = standardize
        self.whiten = whiten
        self.seed = seed

    def fit(self, X, Y, **fit_params):
        X, Y = self._start_fit(X, Y)
        if self.head is None:
            raise HeadError("FeatureReduced needs a head to wrap")
        self.step_ = FeaturePCA(self.n_components, self.standardize, self.whiten, self.seed).fit(X)
        if "X_val" in fit_params and fit_params["X_val"] is not None:
            fit_params["X_val"] = self.step_.transform(fit_params["X_val"])
        self.head_ = fit_with_supported(clone(self.head), self.step_.transform(X), Y, **fit_params)
        return self

    def _predict(self, X):
        return self.head_.predict(self.step_.transform(X))


# --------------------------------------------------------------------------------------------
# progress display (the only output the library produces)
# --------------------------------------------------------------------------------------------
@contextmanager
def progress_task(description: str, total: int, enabled: bool = True):
    """Context yielding ``advance(n=1)``; draws a transient rich progress bar on stderr when enabled."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
