"""Weighted average of several heads, weights fitted on out-of-fold predictions.

``EnsembleHead(members=["ridge", ("mlp", {"loss": "pearson"})])``: an inner K-fold (grouped when
``groups`` is passed to ``fit``) gives out-of-fold predictions of every member on the training
data; the weights -- non-negative, summing to 1 -- minimise their squared error (each gene scaled
by its training standard deviation when ``balance_genes``, so every gene counts alike). Members
are then refitted on all the training data. Fixed ``weights`` skip the inner CV (``--head auto``'s
blends: their weights were scored on the outer folds already).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from sklearn.base import clone

from hexpr.heads.base import Head, HeadError, fit_with_supported, make_head
from hexpr.heads.cv import make_folds
from hexpr.heads.params import NON_NEGATIVE, SEED, Bool, Constraint, Int, NoneOr, RealList


def simplex_weights(predictions: list[np.ndarray], Y: np.ndarray) -> np.ndarray:
    """argmin_w |sum_j w_j P_j - Y|^2 subject to w >= 0, sum w = 1 (K small: solve on the K x K Gram)."""
    K = len(predictions)
    if K == 1:
        return np.ones(1)
    flat = [p.ravel() for p in predictions]
    gram = np.array([[a @ b for b in flat] for a in flat])
    cross = np.array([a @ Y.ravel() for a in flat])
    scale = max(float(np.abs(gram).max()), 1e-300)
    gram, cross = gram / scale, cross / scale

    def objective(w):
        return w @ gram @ w - 2.0 * cross @ w, 2.0 * (gram @ w - cross)

    result = minimize(objective, np.full(K, 1.0 / K), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * K,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                    "jac": lambda w: np.ones_like(w)}])
    w = np.clip(result.x, 0.0, None)
    return w / w.sum()


def as_member(spec) -> Head:
    """A head from a name, a (name, params) pair, a {"head": name, "params": {...}} dict, or a Head."""
    if isinstance(spec, Head):
        return clone(spec)
    if isinstance(spec, str):
        return make_head(spec)
    if isinstance(spec, dict):
        return make_head(spec["head"], **dict(spec.get("params") or {}))
    name, params = spec
    return make_head(name, **dict(params or {}))


class Members(Constraint):
    """Ensemble members that ``as_member`` can build (each member's own params are checked too)."""

    text = "a non-empty list of head names, [name, {params}] pairs or {\"head\": name, \"params\": {...}} dicts"

    def __call__(self, value) -> bool:
        if isinstance(value, (str, dict)) or not hasattr(value, "__len__") or len(value) == 0:
            return False
        try:
            [as_member(m) for m in value]
        except (HeadError, KeyError, TypeError, ValueError):
            return False
        return True


class EnsembleHead(Head):
    """Non-negative, sum-to-one blend of member heads fitted on inner out-of-fold predictions."""

    param_constraints = {"members": Members(), "n_folds": Int(2), "balance_genes": Bool(),
                         "weights": NoneOr(RealList(NON_NEGATIVE)), "seed": SEED}

    search_space: dict = {}

    def __init__(self, members=("ridge", "knn"), n_folds: int = 3, balance_genes: bool = True,
                 weights=None, seed: int = 0):
        self.members = members
        self.n_folds = n_folds
        self.balance_genes = balance_genes
        self.weights = weights
        self.seed = seed

    @property
    def min_samples(self) -> int:
        return int(self.n_folds)    # one row per inner fold at least

    def fit(self, X, Y, *, groups=None, reference_targets=None, inverse_targets=None):
        """``groups`` keep the inner folds grouped; ``reference_targets`` (untransformed targets)
        and ``inverse_targets`` are passed on to members that use them."""
        X, Y = self._start_fit(X, Y)
        reference = None if reference_targets is None else np.asarray(reference_targets, dtype=np.float64)
        members = [as_member(m) for m in self.members]
        if not members:
            raise ValueError("an ensemble needs at least one member head")
        groups = None if groups is None else np.asarray(groups)
        if self.weights is not None:
            self.weights_ = self._fixed_weights(len(members))
        else:
            folds = make_folds(X.shape[0], *self._inner_folds(groups), seed=self.seed)
            oof = [np.zeros_like(Y) for _ in members]
            for train, test in folds:
                for j, member in enumerate(members):
                    model = fit_with_supported(clone(member), X[train], Y[train], inverse_targets=inverse_targets,
                                               reference_targets=None if reference is None else reference[train],
                                               groups=None if groups is None else groups[train])
                    oof[j][test] = model.predict(X[test])
            scale = Y.std(axis=0) if self.balance_genes else np.ones(Y.shape[1])
            scale = np.where(scale > 0, scale, 1.0)
            self.weights_ = simplex_weights([p / scale for p in oof], Y / scale)
        self.member_names_ = [type(m).name or type(m).__name__ for m in members]
        self.members_ = [fit_with_supported(clone(m), X, Y, reference_targets=reference, groups=groups,
                                            inverse_targets=inverse_targets) if w > 0 else None
                         for m, w in zip(members, self.weights_)]
        return self

    def _fixed_weights(self, n_members: int) -> np.ndarray:
        weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        if len(weights) != n_members or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {n_members} non-negative numbers (one per member) with a positive sum, "
                             f"got {list(self.weights)}")
        return weights / weights.sum()

    def _inner_folds(self, groups):
        """(k, groups) for the inner CV: as many grouped folds as there are groups (at most
        ``n_folds``); plain K-fold when fewer than two groups remain."""
        if groups is None:
            return int(self.n_folds), None
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            return int(self.n_folds), None
        return min(int(self.n_folds), n_groups), np.asarray(groups)

    def _predict(self, X):
        return sum(w * m.predict(X) for w, m in zip(self.weights_, self.members_) if m is not None)

