"""Linear heads: ridge with a per-gene penalty chosen in closed form, and HEST-Benchmark's recipe.

``ridge``: features standardized (optionally reduced to ``n_components`` principal components by
the shared ``FeaturePCA`` step). One eigendecomposition of the (D, D) Gram matrix Z'Z gives the
whole regularisation path: for every alpha of the grid and every gene at once, the generalised
cross-validation error (default) or the exact leave-one-out error is computed in closed form, and
each gene keeps the alpha with the smallest error.

``hest``: StandardScaler -> PCA(256) -> Ridge(alpha = 100 / (n_features * n_genes),
fit_intercept=False) as in HEST-Benchmark (Jaume et al. 2024), so results can be compared with
published numbers. HEST solves it with ``solver="lsqr"`` (iterative, per gene: ~75 s for 3,467
genes on 2 cores); the default here is the exact closed-form solution of the same problem
(``solver="cholesky"``, about a second); pass ``solver="lsqr"`` to replicate HEST's solver too. Targets are centred before the fit and the mean added back on
prediction; with centred PCA scores this leaves the coefficients -- hence every Pearson r --
unchanged and only removes the constant offset the intercept-free recipe would otherwise miss.
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import Ridge

from hexpr.heads.base import FeaturePCA, Head
from hexpr.heads.params import N_COMPONENTS, POSITIVE, SEED, Bool, Int, NoneOr, Options, RealList

DEFAULT_ALPHAS = tuple(np.logspace(-2, 7, 19))
_GENE_CHUNK = 512


def _eigen_path(Z: np.ndarray, Yc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s2, V, Q): eigenvalues s2 (k,) and eigenvectors V (D, k) of Z'Z with s2 > 0, Q = V'Z'Yc (k, G)."""
    s2, V = np.linalg.eigh(Z.T @ Z)
    keep = s2 > 1e-10 * max(float(s2.max()), 1e-300)
    s2, V = s2[keep], V[:, keep]
    Q = V.T @ (Z.T @ Yc)
    return s2, V, Q


def gcv_errors(s2, Q, total_ss, n, alphas, intercept: bool) -> np.ndarray:
    """GCV error (n_alphas, G): n * RSS / (n - df)^2, RSS from the spectrum (no (N, G) products)."""
    Q2 = Q * Q
    errors = np.empty((len(alphas), Q.shape[1]))
    for i, alpha in enumerate(alphas):
        shrink = alpha / (s2 + alpha)
        # RSS = |Yc|^2 - sum_k (U'y)_k^2 (1 - shrink_k^2), with (U'y)_k^2 = Q_k^2 / s2_k
        rss = total_ss - ((1.0 - shrink ** 2) / s2) @ Q2
        df = float((s2 / (s2 + alpha)).sum()) + intercept
        if df >= n - 1e-9:          # the fit interpolates: GCV is undefined, never pick this alpha
            errors[i] = np.inf
            continue
        errors[i] = n * np.maximum(rss, 0.0) / (n - df) ** 2
    return errors


def loo_errors(Z, Yc, s2, V, Q, alphas, intercept: bool) -> np.ndarray:
    """Exact leave-one-out squared error (n_alphas, G) from the hat-matrix diagonal."""
    s = np.sqrt(s2)
    U = (Z @ V) / s                                   # (N, k) left singular vectors
    U2 = U * U
    UtY = Q / s[:, None]
    n = Z.shape[0]
    errors = np.empty((len(alphas), Q.shape[1]))
    for i, alpha in enumerate(alphas):
        d = s2 / (s2 + alpha)
        h = U2 @ d + (1.0 / n if intercept else 0.0)   # hat diagonal (N,)
        for g0 in range(0, Q.shape[1], _GENE_CHUNK):
            g = slice(g0, g0 + _GENE_CHUNK)
            resid = Yc[:, g] - U @ (d[:, None] * UtY[:, g])
            errors[i, g] = ((resid / (1.0 - h)[:, None]) ** 2).mean(axis=0)
    return errors


def subtile_spread(Z_sub, bag_of, Z_mean, s2, V, Q, alphas) -> np.ndarray:
    """(n_alphas, G): the mean squared deviation of sub-tile predictions from their bag's prediction,
    for every alpha, from the within-bag scatter in the eigenbasis (no per-alpha (N, G) products)."""
    D = (Z_sub - Z_mean[bag_of]) @ V                  # (n_sub, k) within-bag deviations
    B = (D.T @ D) / D.shape[0]                        # (k, k)
    spread = np.empty((len(alphas), Q.shape[1]))
    for i, alpha in enumerate(alphas):
        C = Q / (s2[:, None] + alpha)                 # coefficients in the eigenbasis (k, G)
        spread[i] = (C * (B @ C)).sum(axis=0)
    return spread


class RidgeHead(Head):
    """Ridge regression with one alpha per gene chosen by GCV ("gcv") or leave-one-out ("loo")."""

    param_constraints = {"alphas": RealList(POSITIVE), "n_components": N_COMPONENTS,
                         "alpha_selection": Options("gcv", "loo"), "fit_intercept": Bool(), "seed": SEED}

    search_space = {"n_components": [None, 128, 256, 512]}
    bag_fit = "mean_features"      # affine in X: fitted on each bag's mean feature (heads.bags)

    def __init__(self, alphas=DEFAULT_ALPHAS, n_components: int | None = None,
                 alpha_selection: str = "gcv", fit_intercept: bool = True, seed: int = 0):
        self.alphas = alphas
        self.n_components = n_components
        self.alpha_selection = alpha_selection
        self.fit_intercept = fit_intercept
        self.seed = seed

    def seed_changes_fit(self) -> bool:
        return self._feature_step().uses_seed

    def _feature_step(self) -> FeaturePCA:
        return FeaturePCA(self.n_components, standardize=True, seed=self.seed)

    def fit(self, X, Y, subtile_features=None, subtile_bags=None):
        """``subtile_features``: when X holds bag means (heads.bags), the sub-tiles themselves: the
        standardization (and PCA) is fitted on them, so a feature that varies between sub-tiles but
        averages out over a bag is not blown up when single sub-tiles are predicted.
        ``subtile_bags`` (the row of X each sub-tile belongs to): alpha is then chosen for the
        sub-tiles, by the GCV error of the bag means plus the spread of the sub-tile predictions
        around their bag's prediction (``subtile_spread``)."""
        X, Y = self._start_fit(X, Y)
        if self.alpha_selection not in ("gcv", "loo"):
            raise ValueError(f"alpha_selection must be 'gcv' or 'loo', got {self.alpha_selection!r}")
        alphas = np.asarray(sorted(self.alphas), dtype=np.float64)
        if alphas.size == 0 or (alphas <= 0).any():
            raise ValueError("alphas must be a non-empty list of positive numbers")
        self.features_ = self._feature_step().fit(X if subtile_features is None else subtile_features)
        Z = self.features_.transform(X)
        self.intercept_ = Y.mean(axis=0) if self.fit_intercept else np.zeros(Y.shape[1])
        Yc = Y - self.intercept_
        s2, V, Q = _eigen_path(Z, Yc)
        if self.alpha_selection == "gcv":
            errors = gcv_errors(s2, Q, (Yc * Yc).sum(axis=0), Z.shape[0], alphas, self.fit_intercept)
        else:
            errors = loo_errors(Z, Yc, s2, V, Q, alphas, self.fit_intercept)
        if subtile_features is not None and subtile_bags is not None:
            errors = errors + subtile_spread(self.features_.transform(subtile_features), np.asarray(subtile_bags), Z,
                                             s2, V, Q, alphas)
        best = np.argmin(errors, axis=0)
        self.alphas_ = alphas
        self.alpha_ = alphas[best]
        self.cv_errors_ = errors.min(axis=0)
        self.coef_ = V @ (Q / (s2[:, None] + self.alpha_[None, :]))   # (D', G)
        return self

    def _predict(self, X):
        return self.features_.transform(X) @ self.coef_ + self.intercept_


class HestRidgeHead(Head):
    """HEST-Benchmark's fixed linear probe (no tuning): scaler, PCA, intercept-free ridge."""

    param_constraints = {"n_components": N_COMPONENTS, "alpha": NoneOr(POSITIVE),
                         "solver": Options("auto", "svd", "cholesky", "lsqr", "sparse_cg", "sag", "saga", "lbfgs"),
                         "max_iter": Int(1), "seed": SEED}

    search_space: dict = {}
    bag_fit = "mean_features"

    def __init__(self, n_components: int = 256, alpha: float | None = None,
                 solver: str = "cholesky", max_iter: int = 1000, seed: int = 0):
        self.n_components = n_components
        self.alpha = alpha
        self.solver = solver
        self.max_iter = max_iter
        self.seed = seed

    def seed_changes_fit(self) -> bool:
        # the seed reaches an exact FeaturePCA and Ridge's random_state, which only sag/saga use
        return self._feature_step().uses_seed or self.solver in ("sag", "saga")

    def _feature_step(self) -> FeaturePCA:
        return FeaturePCA(self.n_components, standardize=True, seed=self.seed)

    def fit(self, X, Y, subtile_features=None):
        """``subtile_features``: see ``RidgeHead.fit``."""
        X, Y = self._start_fit(X, Y)
        self.features_ = self._feature_step().fit(X if subtile_features is None else subtile_features)
        Z = self.features_.transform(X)
        self.target_mean_ = Y.mean(axis=0)
        self.alpha_ = (self.alpha if self.alpha is not None
                       else 100.0 / (Z.shape[1] * Y.shape[1]))
        self.ridge_ = Ridge(alpha=self.alpha_, fit_intercept=False, solver=self.solver,
                            max_iter=self.max_iter, random_state=self.seed)
        self.ridge_.fit(Z, Y - self.target_mean_)
        self.n_iter_ = self.ridge_.n_iter_      # None for the direct solvers (cholesky, svd)
        return self

    def _predict(self, X):
        return self.ridge_.predict(self.features_.transform(X)) + self.target_mean_
