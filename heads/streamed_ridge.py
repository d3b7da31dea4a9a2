"""``ridge_streamed``: the ``ridge`` head fitted from streamed sufficient statistics.

``RidgeHead`` needs only, from the training rows, the count n, the feature and target means, the
centred cross-products ``Sxx = sum (x - mx)(x - mx)'`` (D, D) and ``Sxy`` (D, G), the per-gene
``syy = sum (y - my)^2`` and the largest |x| (the constant-column test of ``FeaturePCA``). One pass
over row chunks accumulates them (``heads.streaming.RunningMoments``); then, exactly as
``RidgeHead``:

  * standardization: ``mean_ = mx``, ``scale_ = sqrt(diag(Sxx) / n)`` -> ``Z'Z = S^-1 Sxx S^-1``,
    ``Z'Yc = S^-1 Sxy`` (principal components, if ``n_components``, from the same Z'Z);
  * one eigendecomposition ``Z'Z = V diag(s2) V'``; ``Q = V' Z'Yc``;
  * GCV per gene and alpha from the spectrum: ``RSS = syy - sum_k Q_k^2 (1 - shrink_k^2) / s2_k``
    and ``df = sum s2/(s2 + alpha) + intercept`` -- the very ``heads.ridge.gcv_errors``;
  * coefficients ``V diag(1/(s2 + alpha_g)) Q`` per gene.

So with ``alpha_selection="gcv"`` (the streamed head's default, and ``RidgeHead``'s when its ``fit`` gets
no groups) the fit is *the same computation* as ``RidgeHead`` on the concatenated rows, differing only by floating-point rounding of the sums
(tested: predictions agree to ~1e-10 relative). ``alpha_selection="loo"`` (exact leave-one-out,
``RidgeHead``'s other criterion) needs the residual of every row, so it costs a second pass over
the chunks (and ``n_alphas`` (chunk, D, G) products per chunk): equal to ``RidgeHead(alpha_selection
="loo")`` as well, but slow on millions of rows -- GCV is the streaming choice.

Memory: O(D^2 + D*G) for the sums plus one chunk (and its float64 working copy); independent of
the number of rows. Time: one pass of ``2 n D (D + G)`` flops (``precision="float32"`` halves it,
at ~1e-6 relative accuracy of the per-chunk products; the running sums stay float64).
"""
from __future__ import annotations

import numpy as np

from hexpr.heads.base import Head
from hexpr.heads.params import Int, Options
from hexpr.heads.ridge import DEFAULT_ALPHAS, RidgeHead, gcv_errors
from hexpr.heads.streaming import DEFAULT_CHUNK_ROWS, ArrayChunks, RunningMoments, accumulate, is_reiterable, iterate_chunks


class StreamedRidgeHead(Head):
    """Ridge with a per-gene alpha (GCV or LOO), fitted from row chunks in bounded memory."""

    param_constraints = {**{k: v for k, v in RidgeHead.param_constraints.items() if k != "within_groups"},  # no groups
                         "chunk_rows": Int(1),
                         "precision": Options("float64", "float32")}

    search_space = {"n_components": [None, 128, 256, 512]}

    def __init__(self, alphas=DEFAULT_ALPHAS, n_components: int | None = None,
                 alpha_selection: str = "gcv", fit_intercept: bool = True,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, precision: str = "float64", seed: int = 0):
        self.alphas = alphas
        self.n_components = n_components
        self.alpha_selection = alpha_selection
        self.fit_intercept = fit_intercept
        self.chunk_rows = chunk_rows
        self.precision = precision
        self.seed = seed

    def seed_changes_fit(self) -> bool:
        return False    # the seed reaches only the exact principal components of the moments

    # -- options ---------------------------------------------------------------------------------
    def _alpha_grid(self) -> np.ndarray:
        if self.alpha_selection not in ("gcv", "loo"):
            raise ValueError(f"alpha_selection must be 'gcv' or 'loo', got {self.alpha_selection!r}")
        if self.precision not in ("float64", "float32"):
            raise ValueError(f"precision must be 'float64' or 'float32', got {self.precision!r}")
        alphas = np.asarray(sorted(self.alphas), dtype=np.float64)
        if alphas.size == 0 or (alphas <= 0).any():
            raise ValueError("alphas must be a non-empty list of positive numbers")
        return alphas

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, X, Y):
        """Fit on in-memory arrays, streamed through row blocks of ``chunk_rows``."""
        X, Y = self._start_fit(X, Y)
        single_output = self.single_output_
        self.fit_stream(ArrayChunks(X, Y, self.chunk_rows))
        self.single_output_ = single_output
        return self

    def fit_stream(self, source):
        """Fit from a chunk source of ``(X_chunk, Y_chunk)`` (see ``heads.streaming``): one pass
        for GCV, two for LOO (which then needs a re-iterable source)."""
        alphas = self._alpha_grid()
        if self.alpha_selection == "loo" and not is_reiterable(source):
            raise ValueError("alpha_selection='loo' reads the chunks twice; pass a re-iterable "
                             "source (a ChunkSource, a list, or a callable returning an iterator)")
        moments = accumulate(source, cross=True, dtype=np.dtype(self.precision))
        return self.fit_moments(moments, alphas=alphas, source=source)

    def fit_moments(self, moments: RunningMoments, *, alphas=None, source=None):
        """Fit from accumulated moments (``source`` is needed again only for LOO)."""
        alphas = self._alpha_grid() if alphas is None else alphas
        if moments.mean_y is None or not moments.cross:
            raise ValueError("ridge needs full feature moments with targets (RunningMoments(cross=True) fed Y)")
        n = moments.n
        self.single_output_ = False
        self.n_features_in_ = moments.mean_x.shape[0]
        self.n_targets_ = moments.mean_y.shape[0]
        self.n_samples_seen_ = n
        self.features_ = moments.feature_step(self.n_components, seed=self.seed)
        scale = self.features_.scale_
        gram = moments.Sxx / np.outer(scale, scale)           # Z'Z
        zty = moments.Sxy / scale[:, None]                     # Z'Yc (= Z'Y: Z is centred)
        if self.features_.components_ is not None:
            P = self.features_.components_
            gram = P.T @ gram @ P
            zty = P.T @ zty
        gram = (gram + gram.T) / 2.0
        if self.fit_intercept:
            self.intercept_ = moments.mean_y.copy()
            total_ss = moments.syy.copy()
        else:
            self.intercept_ = np.zeros(self.n_targets_)
            total_ss = moments.syy + n * moments.mean_y ** 2
        s2, V = np.linalg.eigh(gram)
        keep = s2 > 1e-10 * max(float(s2.max()), 1e-300)
        s2, V = s2[keep], V[:, keep]
        Q = V.T @ zty
        if self.alpha_selection == "gcv":
            errors = gcv_errors(s2, Q, total_ss, n, alphas, self.fit_intercept)
        else:
            if source is None:
                raise ValueError("alpha_selection='loo' needs the chunk source for its second pass")
            errors = self._loo_errors(source, s2, V, Q, alphas, n)
        best = np.argmin(errors, axis=0)
        self.alphas_ = alphas
        self.alpha_ = alphas[best]
        self.cv_errors_ = errors.min(axis=0)
        self.coef_ = V @ (Q / (s2[:, None] + self.alpha_[None, :]))
        return self

    def _loo_errors(self, source, s2, V, Q, alphas, n) -> np.ndarray:
        """Exact leave-one-out squared error (n_alphas, G), summed chunk by chunk (second pass):
        LOO residual_i = (y_i - yhat_i) / (1 - h_ii), h_ii = sum_k (ZV)_ik^2 d_k / s2_k (+ 1/n)."""
        errors = np.zeros((len(alphas), Q.shape[1]))
        for X, Y in iterate_chunks(source):
            ZV = self.features_.transform(X) @ V
            Yc = np.asarray(Y, dtype=np.float64) - self.intercept_
            del X, Y
            U2 = ZV * ZV / s2
            for i, alpha in enumerate(alphas):
                h = U2 @ (s2 / (s2 + alpha)) + (1.0 / n if self.fit_intercept else 0.0)
                resid = Yc - ZV @ (Q / (s2 + alpha)[:, None])
                resid /= (1.0 - h)[:, None]
                errors[i] += np.einsum("ij,ij->j", resid, resid)
                del resid
            del ZV, Yc, U2
        return errors / n

    def _predict(self, X):
        return self.features_.transform(X) @ self.coef_ + self.intercept_


__all__ = ["StreamedRidgeHead", "ArrayChunks"]
