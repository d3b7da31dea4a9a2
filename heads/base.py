"""What every head shares: the estimator base class, input checks, the registry, feature steps.

A *head* maps cached image features ``X`` (N spots, D features) to expression ``Y`` (N, G genes).
Heads are scikit-learn regressors (``RegressorMixin`` + ``BaseEstimator``): the constructor stores
hyper-parameters only (``fit`` never changes them), ``fit(X, Y)`` validates its input
(``validate_data``) and learns state kept in attributes ending in ``_``, ``predict(X)`` returns an
(N, G) float array (N values when fitted on a 1-D ``y``) and raises ``NotFittedError`` before ``fit``.
They work in ``Pipeline``, ``GridSearchCV`` and ``cross_val_predict``; tests/test_estimator_checks.py
runs scikit-learn's estimator checks on every registered head.
Heads are saved without pickle by ``heads.model_files`` (``save_head`` / ``load_head``): their
``get_params`` and trailing-underscore fitted attributes are all it needs.

Registry: one table, ``HEAD_CLASSES``, maps a name ("mean", "ridge", ...) to "module:Class"; a
head's module is imported on first use, so torch loads only for torch heads (``registered_heads()``
imports them all and returns ``{name: class}``; ``Head.name`` reads a class's name from the table);
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

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.extmath import randomized_svd
from sklearn.utils.validation import check_is_fitted, validate_data

from hexpr.embedder.errors import ModelError, UsageError
from hexpr.heads.params import N_COMPONENTS, SEED, Bool, param_problems

# the registry: head name -> "module:Class" (a head's module, and its heavy imports, load on first use)
from hexpr.heads.registry import HEAD_CLASSES  # noqa: E402 - the one registry table (names only, light)
HEADS: dict[str, type["Head"]] = {}   # the classes of HEAD_CLASSES imported so far


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
class HeadError(UsageError):
    """Bad head input or configuration (unknown head or parameter, bad folds, shapes, sweep file)."""


class HeadNotFittedError(NotFittedError, ModelError):
    """``predict`` before ``fit``: scikit-learn's ``NotFittedError`` and a hexpr ``ModelError``."""


def check_finite(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` unchanged, or a HeadError naming ``name`` and the first NaN/inf cell."""
    if not np.isfinite(arr).all():
        row, col = np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0]
        raise HeadError(f"{name} holds NaN/inf (first at row {row}, column {col})")
    return arr


def as_matrix(a, name: str, dtype=np.float64) -> np.ndarray:
    """``a`` as a finite 2-D float array, or a ValueError naming ``name``."""
    arr = np.asarray(a, dtype=dtype)
    if arr.ndim != 2:
        raise HeadError(f"{name} must be a 2-D array (spots x columns), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise HeadError(f"{name} is empty (shape {arr.shape})")
    return check_finite(arr, name)


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


class _RegistryName:
    """``Head.name``: the class's name in ``HEAD_CLASSES`` ("" for heads that are not registered)."""

    def __get__(self, obj, cls) -> str:
        return registry_name(cls)


class Head(RegressorMixin, BaseEstimator):
    """Base of every head. Subclasses implement ``fit`` (starting with ``_start_fit``) and
    ``_predict`` (on validated 2-D X, returning (N, G))."""

    search_space: dict = {}
    param_constraints: dict = {}   # param -> heads.params constraint, checked by make_head and fit
    name = _RegistryName()
    min_samples: int = 1           # fewer training rows than this: a clear error before any work
    poor_score: bool = False       # scikit-learn tag: not expected to fit well (the mean head)
    bag_fit: str | None = None     # how it learns from bags (heads.bags): "mean_features", "bag_loss" or None

    def fit(self, X, Y):  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def seed_changes_fit(self) -> bool:
        """Whether fits that differ only in ``seed`` differ (what seed bagging needs); heads whose
        seed reaches nothing random override this."""
        return "seed" in self.get_params(deep=False)

    # -- scikit-learn estimator tags --
    def _non_deterministic(self) -> bool:
        """True where a fit with the same seed may differ between runs (e.g. CUDA kernels)."""
        return False

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        tags.regressor_tags.poor_score = self.poor_score
        tags.non_deterministic = self._non_deterministic()
        return tags

    # -- fitted-state bookkeeping shared by all heads --
    def _start_fit(self, X, Y, bags=None) -> tuple[np.ndarray, np.ndarray]:
        """Checked hyper-parameters and validated (X, Y): float64, finite, Y 2-D (a 1-D ``y`` becomes
        one column, and ``predict`` then returns 1-D). Sets ``n_features_in_`` and ``n_targets_``.
        With ``bags`` (``heads.bags.Bags``), X holds the patches and Y the observations."""
        if bags is not None:
            return self._start_bag_fit(X, Y, bags)
        problems = param_problems(self.name or type(self).__name__, self.param_constraints, self.get_params(deep=False))
        if problems:
            raise HeadError(problems[0])
        if Y is not None and np.asarray(Y).dtype.kind in "biuf":
            check_finite(np.atleast_1d(np.asarray(Y)), "Y (targets)")
        X, Y = validate_data(self, X, Y, multi_output=True, y_numeric=True, dtype=np.float64,
                             ensure_all_finite=False, ensure_min_samples=self.min_samples)
        check_finite(X, "X (features)")
        Y = np.asarray(Y, dtype=np.float64)
        self.single_output_ = Y.ndim == 1
        if self.single_output_:
            Y = Y[:, None]
        if Y.shape[1] == 0:
            raise HeadError(f"Y (targets) is empty (shape {Y.shape})")
        self.n_targets_ = Y.shape[1]
        return X, Y

    def _start_bag_fit(self, X, Y, bags) -> tuple[np.ndarray, np.ndarray]:
        problems = param_problems(self.name or type(self).__name__, self.param_constraints, self.get_params(deep=False))
        if problems:
            raise HeadError(problems[0])
        X = check_finite(validate_data(self, X, dtype=np.float64, ensure_all_finite=False,
                                       ensure_min_samples=self.min_samples), "X (features)")
        Y = as_matrix(Y, "Y (targets)")
        if X.shape[0] != bags.n_patches or Y.shape[0] != bags.n_obs:
            raise HeadError(f"bags of {bags.n_patches} patches / {bags.n_obs} observations do not match X with "
                            f"{X.shape[0]} rows and Y with {Y.shape[0]} rows")
        self.single_output_ = False
        self.n_targets_ = Y.shape[1]
        return X, Y

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "n_features_in_")

    def is_fitted(self) -> bool:
        return self.__sklearn_is_fitted__()

    def _check_fitted(self) -> None:
        """HeadNotFittedError (a ``NotFittedError``) unless ``fit`` has run."""
        try:
            check_is_fitted(self)
        except NotFittedError:
            raise HeadNotFittedError(f"{type(self).__name__} is not fitted yet; call fit(X, Y) first") from None

    def _validate_predict_input(self, X) -> np.ndarray:
        self._check_fitted()
        shape = getattr(X, "shape", None) or ()
        if len(shape) == 2 and shape[1] != self.n_features_in_:
            raise HeadError(
                f"X has {shape[1]} features, but {type(self).__name__} is expecting {self.n_features_in_} features "
                f"as input: it was fitted on {self.n_features_in_} features but X has {shape[1]}; use features "
                "from the same backbone(s) as at training time")
        X = validate_data(self, X, reset=False, dtype=np.float64, ensure_all_finite=False)
        return check_finite(X, "X (features)")

    def predict(self, X) -> np.ndarray:
        X = self._validate_predict_input(X)
        pred = np.asarray(self._predict(X), dtype=np.float64).reshape(X.shape[0], -1)
        return pred[:, 0] if getattr(self, "single_output_", False) else pred


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def registry_name(cls: type) -> str:
    """The name under which ``cls`` is listed in ``HEAD_CLASSES`` ("" when it is not)."""
    where = f"{cls.__module__}:{cls.__qualname__}"
    return next((name for name, path in HEAD_CLASSES.items() if path == where), "")


def registered_heads() -> dict[str, type[Head]]:
    """The registry as ``{name: class}``, every head module imported."""
    for name in HEAD_CLASSES:
        _head_class(name)
    return HEADS


def _head_class(name: str) -> type[Head]:
    if name not in HEAD_CLASSES:
        raise HeadError(f"unknown head {name!r}; choose one of: {', '.join(sorted(HEAD_CLASSES))}")
    if name not in HEADS:
        module, cls = HEAD_CLASSES[name].split(":")
        HEADS[name] = getattr(importlib.import_module(module), cls)
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

    ``svd_solver="exact"`` (default) takes the components from one symmetric eigensolve of the
    (D, D) Gram matrix: deterministic, ``seed`` plays no part. ``"randomized"`` (Halko et al.,
    scikit-learn's ``randomized_svd`` seeded with ``seed``) is cheaper for a few components of
    many features; different seeds then give slightly different components.
    """

    def __init__(self, n_components: int | None = None, standardize: bool = True,
                 whiten: bool = False, seed: int = 0, svd_solver: str = "exact"):
        self.n_components = n_components
        self.standardize = standardize
        self.whiten = whiten
        self.seed = seed
        self.svd_solver = svd_solver

    def __setstate__(self, state):
        state.setdefault("svd_solver", "exact")     # steps saved before the parameter existed
        super().__setstate__(state)

    @property
    def uses_seed(self) -> bool:
        """Whether ``seed`` changes the fit (randomized principal components only)."""
        return self.n_components is not None and self.svd_solver == "randomized"

    def _principal_axes(self, Z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(eigenvalues of Z'Z (k,), axes (D, k)) of the ``k`` leading components of ``Z``."""
        if self.svd_solver == "randomized":
            _, s, vt = randomized_svd(Z, k, random_state=self.seed)
            return s ** 2, vt.T
        if self.svd_solver != "exact":
            raise HeadError(f"svd_solver must be 'exact' or 'randomized', got {self.svd_solver!r}")
        # principal axes from the Gram matrix: one (D, D) product and a symmetric eigensolve
        eigval, eigvec = np.linalg.eigh(Z.T @ Z)
        top = np.argsort(eigval)[::-1][:k]
        return eigval[top], eigvec[:, top]

    def fit(self, X, y=None):
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
            eigval, eigvec = self._principal_axes(Z, k)
            # fix the sign of each axis so results do not depend on the LAPACK build
            eigvec *= np.where(eigvec[np.abs(eigvec).argmax(axis=0), range(k)] < 0, -1.0, 1.0)
            self.components_ = eigvec
            self.explained_variance_ = np.clip(eigval, 0, None) / max(1, X.shape[0] - 1)
        return self

    def transform(self, X) -> np.ndarray:
        Z = (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_
        if self.components_ is not None:
            Z = Z @ self.components_
            if self.whiten:
                Z /= np.sqrt(np.where(self.explained_variance_ > 0, self.explained_variance_, 1.0))
        return Z

    def fit_transform(self, X, y=None) -> np.ndarray:
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
        subtiles = fit_params.pop("subtile_features", None)   # heads.bags: fit the step on the sub-tiles
        if subtiles is None:
            fit_params.pop("subtile_bags", None)
        self.step_ = FeaturePCA(self.n_components, self.standardize, self.whiten, self.seed).fit(
            X if subtiles is None else subtiles)
        if subtiles is not None:
            fit_params["subtile_features"] = self.step_.transform(subtiles)
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
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
