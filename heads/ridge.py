"""Linear heads: ridge with its penalty chosen in closed form (on held-out groups, or per gene), and
HEST-Benchmark's recipe.

``ridge``: features standardized (optionally reduced to ``n_components`` principal components by
the shared ``FeaturePCA`` step). One eigendecomposition (of Z'Z, or of ZZ' when there are fewer rows
than features) gives the whole regularisation path: for every alpha of the grid and every gene at
once, an error is computed in closed form and the alpha with the smallest error is kept.

How alpha is chosen (``alpha_selection``):

* ``"grouped"``: each gene keeps its GCV alpha, moved by a number of grid steps shared by all
  genes (``alpha_shift_``) that is chosen on held-out groups: each group (slide, section, patient:
  the ``groups`` given to ``fit``) is held out in turn (at most ``MAX_GROUP_FOLDS`` grouped folds),
  GCV picks each gene's alpha on the other groups, and the shift whose moved alphas give the
  smallest held-out squared error summed over genes wins (over the ``MAX_SHIFT_GENES`` most
  variable genes when there are more: one number needs no more, and it bounds the cost). Neighbouring spots of one section are
  alike, so errors measured within the training sections (GCV, leave-one-out) favour too little
  shrinkage for a new section; held-out sections do not. GCV keeps what it does well (which genes
  need more shrinkage than others); the held-out groups set the overall level.
* ``"gcv"``: generalised cross-validation, one alpha per gene; ``"loo"``: exact leave-one-out, one
  alpha per gene.
* ``"auto"`` (default): ``"grouped"`` when ``fit`` gets ``groups`` with at least two distinct
  labels (``hexpr fit-head`` passes the sections or slides), else ``"gcv"``.

``within_groups=True``: the within-groups (fixed-effects) estimator. Each group's mean feature vector
and mean target are replaced by the overall ones before the fit, so the coefficients and the
penalty come from what varies within a slide, and a shift shared by every spot of a slide (stain,
scanner, a patient's overall expression level) is not learned as if it were biology. Prediction
applies the coefficients to the features as they are: within a slide the pattern is the same as
a fit on slide-centred features, so every within-slide Pearson r is too; the slide's overall level
follows its mean features. ``fit-head --centre-slides`` sets it; ``--head auto`` tries it.

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
ALPHA_SELECTIONS = ("auto", "grouped", "gcv", "loo")
MAX_GROUP_FOLDS = 5
MAX_SHIFT_GENES = 1024   # the grouped shift is estimated on at most this many genes (the most variable)
_GENE_CHUNK = 512


def replace_group_means(Y: np.ndarray, groups) -> np.ndarray:
    """``Y`` with each group's mean (per column) replaced by the overall mean."""
    labels, index = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.zeros((len(labels), Y.shape[1]))
    np.add.at(sums, index, Y)
    means = sums / np.bincount(index, minlength=len(labels))[:, None]
    return Y - means[index] + Y.mean(axis=0)


def _eigen_path(Z: np.ndarray, Yc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s2, V, Q): the non-zero eigenvalues s2 (k,) of Z'Z, their eigenvectors V (D, k) and Q = V'Z'Yc
    (k, G). With fewer rows than features the (N, N) matrix ZZ' is decomposed instead (same s2)."""
    if Z.shape[0] < Z.shape[1]:
        s2, U = np.linalg.eigh(Z @ Z.T)
        keep = s2 > 1e-10 * max(float(s2.max()), 1e-300)
        s2, U = s2[keep], U[:, keep]
        V = (Z.T @ U) / np.sqrt(s2)
    else:
        s2, V = np.linalg.eigh(Z.T @ Z)
        keep = s2 > 1e-10 * max(float(s2.max()), 1e-300)
        s2, V = s2[keep], V[:, keep]
    Q = V.T @ (Z.T @ Yc)
    return s2, V, Q


def group_folds(groups, max_folds: int = MAX_GROUP_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs holding out whole groups: one fold per group up to ``max_folds``
    (then groups are dealt round-robin in sorted order, so the folds do not depend on a seed)."""
    labels, codes = np.unique(np.asarray(groups), return_inverse=True)
    k = min(len(labels), max_folds)
    fold_of = codes % k
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def grouped_shift(X, Y, folds, alphas, intercept: bool, make_step, extra=None, subtile_features=None,
                  subtile_bags=None) -> tuple[int, np.ndarray]:
    """How many steps of the alpha grid to add to every gene's GCV alpha, chosen on held-out groups:
    (shift, held-out error per gene at the shifted alphas, for the genes it was estimated on: all, or
    the ``MAX_SHIFT_GENES`` most variable). In each fold (``folds``: whole groups
    held out) the feature step (``make_step()``: standardization, PCA) is fitted on the training
    rows (or their sub-tiles, when X holds bag means) and each gene's alpha is chosen by GCV there;
    the shift is the one whose shifted alphas give the smallest held-out squared error summed over
    genes and folds. ``extra`` (n_alphas, G), e.g. the sub-tile spread, is added to both criteria."""
    if Y.shape[1] > MAX_SHIFT_GENES:   # one number for all genes: the most variable ones set it, at a fraction of the cost
        keep = np.sort(np.argsort(-Y.var(axis=0), kind="stable")[:MAX_SHIFT_GENES])
        Y = Y[:, keep]
        extra = None if extra is None else extra[:, keep]
    n_alphas, n_genes = len(alphas), Y.shape[1]
    extra = np.zeros((n_alphas, n_genes)) if extra is None else extra
    genes = np.arange(n_genes)
    fold_best, fold_errors = [], []
    for train, test in folds:
        step_rows = X[train] if subtile_features is None else subtile_features[np.isin(subtile_bags, train)]
        step = make_step().fit(step_rows)
        offset = Y[train].mean(axis=0) if intercept else np.zeros(n_genes)
        Z, Yc = step.transform(X[train]), Y[train] - offset
        s2, V, Q = _eigen_path(Z, Yc)
        fold_best.append(np.argmin(gcv_errors(s2, Q, (Yc * Yc).sum(axis=0), Z.shape[0], alphas, intercept) + extra,
                                   axis=0))
        P = step.transform(X[test]) @ V                   # held-out rows in the eigenbasis (n_test, k)
        errors = np.empty((n_alphas, n_genes))
        for i, alpha in enumerate(alphas):
            for g0 in range(0, n_genes, _GENE_CHUNK):
                g = slice(g0, g0 + _GENE_CHUNK)
                resid = P @ (Q[:, g] / (s2[:, None] + alpha)) + offset[g] - Y[test][:, g]
                errors[i, g] = (resid * resid).mean(axis=0)
        fold_errors.append((errors + extra) * len(test))
    n_held_out = sum(len(test) for _, test in folds)

    def held_out(shift):   # per gene, over all held-out rows, at each fold's GCV alphas moved by ``shift``
        return sum(err[np.clip(best + shift, 0, n_alphas - 1), genes]
                   for best, err in zip(fold_best, fold_errors)) / n_held_out

    shift = min(range(-(n_alphas - 1), n_alphas), key=lambda k: (float(held_out(k).sum()), abs(k)))
    return shift, held_out(shift)


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
    """Ridge regression with one alpha per gene: by GCV ("gcv"), leave-one-out ("loo"), or GCV moved
    by the grid steps held-out groups prefer ("grouped"); "auto": grouped when ``fit`` gets groups."""

    param_constraints = {"alphas": RealList(POSITIVE), "n_components": N_COMPONENTS,
                         "alpha_selection": Options(*ALPHA_SELECTIONS), "fit_intercept": Bool(), "within_groups": Bool(),
                         "seed": SEED}

    search_space = {"n_components": [None, 128, 256, 512]}
    bag_fit = "mean_features"      # affine in X: fitted on each bag's mean feature (heads.bags)

    def __init__(self, alphas=DEFAULT_ALPHAS, n_components: int | None = None,
                 alpha_selection: str = "auto", fit_intercept: bool = True, within_groups: bool = False, seed: int = 0):
        self.alphas = alphas
        self.n_components = n_components
        self.alpha_selection = alpha_selection
        self.fit_intercept = fit_intercept
        self.within_groups = within_groups
        self.seed = seed

    def seed_changes_fit(self) -> bool:
        return self._feature_step().uses_seed

    def _feature_step(self) -> FeaturePCA:
        return FeaturePCA(self.n_components, standardize=True, seed=self.seed)

    def fit(self, X, Y, subtile_features=None, subtile_bags=None, groups=None):
        """``groups``: one label per row (slide, section): alpha is then chosen on held-out groups
        (``alpha_selection`` "auto" or "grouped").

        ``subtile_features``: when X holds bag means (heads.bags), the sub-tiles themselves: the
        standardization (and PCA) is fitted on them, so a feature that varies between sub-tiles but
        averages out over a bag is not blown up when single sub-tiles are predicted.
        ``subtile_bags`` (the row of X each sub-tile belongs to): alpha is then chosen for the
        sub-tiles, by the GCV error of the bag means plus the spread of the sub-tile predictions
        around their bag's prediction (``subtile_spread``), moved by the grouped shift with groups.

        ``within_groups`` (with ``groups``): the within-groups (fixed-effects) fit: each group's mean
        feature vector and mean target are replaced by the overall ones before fitting, so the
        coefficients and the penalty come from the variation within groups alone; what differs
        between whole slides (stain, scanner, a patient's overall level) is not learned."""
        X, Y = self._start_fit(X, Y)
        selection = self._selection(groups, X.shape[0])
        if self.within_groups and groups is not None:
            X, Y = replace_group_means(X, groups), replace_group_means(Y, groups)
        alphas = np.asarray(sorted(self.alphas), dtype=np.float64)
        if alphas.size == 0 or (alphas <= 0).any():
            raise ValueError("alphas must be a non-empty list of positive numbers")
        self.features_ = self._feature_step().fit(X if subtile_features is None else subtile_features)
        Z = self.features_.transform(X)
        self.intercept_ = Y.mean(axis=0) if self.fit_intercept else np.zeros(Y.shape[1])
        Yc = Y - self.intercept_
        s2, V, Q = _eigen_path(Z, Yc)
        spread = None
        if subtile_features is not None and subtile_bags is not None:
            spread = subtile_spread(self.features_.transform(subtile_features), np.asarray(subtile_bags), Z,
                                    s2, V, Q, alphas)
        if selection == "loo":
            errors = loo_errors(Z, Yc, s2, V, Q, alphas, self.fit_intercept)
        else:
            errors = gcv_errors(s2, Q, (Yc * Yc).sum(axis=0), Z.shape[0], alphas, self.fit_intercept)
        errors = errors if spread is None else errors + spread
        best = np.argmin(errors, axis=0)
        self.alpha_shift_ = 0
        self.cv_errors_ = errors[best, np.arange(errors.shape[1])]
        if selection == "grouped":   # every gene's GCV alpha moved by the steps that held-out groups prefer
            self.alpha_shift_, self.shift_errors_ = grouped_shift(
                X, Y, group_folds(groups), alphas, self.fit_intercept, self._feature_step, spread, subtile_features,
                None if subtile_bags is None else np.asarray(subtile_bags))
            best = np.clip(best + self.alpha_shift_, 0, len(alphas) - 1)
            self.cv_errors_ = errors[best, np.arange(errors.shape[1])]
        self.alpha_selection_ = selection
        self.alphas_ = alphas
        self.alpha_ = alphas[best]
        self.coef_ = V @ (Q / (s2[:, None] + self.alpha_[None, :]))   # (D', G)
        return self

    def _selection(self, groups, n_rows: int) -> str:
        """The rule used for this fit: "grouped" needs groups with two labels or more."""
        if self.alpha_selection not in ALPHA_SELECTIONS:
            raise ValueError(f"alpha_selection must be one of {', '.join(map(repr, ALPHA_SELECTIONS))}, "
                             f"got {self.alpha_selection!r}")
        n_groups = 0
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (n_rows,):
                raise ValueError(f"groups must hold one label per row ({n_rows}), got shape {groups.shape}")
            n_groups = len(np.unique(groups))
        if self.alpha_selection == "grouped" and n_groups < 2:
            raise ValueError("alpha_selection='grouped' holds out whole groups and needs groups with at least "
                             f"two labels; got {'no groups' if groups is None else f'{n_groups} label'}")
        if self.alpha_selection == "auto":
            return "grouped" if n_groups >= 2 else "gcv"
        return self.alpha_selection

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
