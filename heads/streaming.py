"""Fitting heads on more rows than fit in memory: chunk sources and streamed statistics.

A *chunk source* hands a head the training data as row blocks ``(X_chunk, Y_chunk)``; a head
fitted from one (``StreamedRidgeHead.fit_stream``, ``ChunkedMLPHead.fit_stream``) keeps memory
bounded by the chunk size, never by the number of spots. Accepted sources:

  * a ``ChunkSource`` (``ArrayChunks`` over in-memory arrays, ``H5Chunks`` over HDF5 files):
    re-iterable, with random access ``read_chunk(i)`` (the MLP shuffles the chunk order with it);
  * any re-iterable of ``(X, Y)`` pairs (a list, an object whose ``__iter__`` starts over);
  * a callable returning a fresh iterator of pairs each time it is called.

A one-shot iterator (a generator object) is accepted only where a single pass suffices.

``RunningMoments`` accumulates, chunk by chunk, the count, means and centred second moments
(``sum (x - mean)(x - mean)'``, ``sum (x - mean)(y - mean)'``, ``sum (y - mean)^2``) with the
pairwise update of Chan, Golub & LeVeque (1979): each chunk is centred on its own mean before
its products are taken, so the result does not suffer from the cancellation of
``X'X - n mean mean'`` and does not depend (beyond rounding) on where the chunk boundaries fall.

Nothing here opens HDF5 files itself: ``H5Chunks`` reads through ``embedder.cache``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hexpr.embedder.cache import CacheError, dataset_shape, read_feature_rows, read_ids, read_rows
from hexpr.heads.base import FeaturePCA

DEFAULT_CHUNK_ROWS = 65536


# --------------------------------------------------------------------------------------------
# chunk sources
# --------------------------------------------------------------------------------------------
class ChunkSource:
    """Row blocks ``(X_chunk, Y_chunk)`` with random access; iterating reads them in order.

    Subclasses set ``n_chunks`` and implement ``read_chunk(i)``. Every call returns fresh arrays
    (or views the caller may drop), so a consumer that drops a chunk before asking for the next
    holds one chunk at a time.
    """

    n_chunks: int = 0

    def read_chunk(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:  # pragma: no cover
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self.n_chunks)

    def __iter__(self):
        for i in range(len(self)):
            # yielded without a local name: the generator frame keeps no reference to the chunk
            yield self.read_chunk(i)


def _bounds(n_rows: int, chunk_rows: int | None, bounds) -> np.ndarray:
    if bounds is not None:
        bounds = np.asarray(bounds, dtype=np.int64)
        if bounds[0] != 0 or bounds[-1] != n_rows or (np.diff(bounds) <= 0).any():
            raise ValueError(f"bounds must increase strictly from 0 to {n_rows}, got {bounds.tolist()}")
        return bounds
    chunk_rows = int(chunk_rows or DEFAULT_CHUNK_ROWS)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    return np.append(np.arange(0, n_rows, chunk_rows), n_rows)


class ArrayChunks(ChunkSource):
    """In-memory arrays served in row blocks of ``chunk_rows`` (or at the given ``bounds``, e.g.
    ``[0, 7, 50, 200]`` for uneven blocks). ``rows`` (optional index array) selects and orders
    the rows first. Chunks are fresh float copies, as a disk reader would return."""

    def __init__(self, X, Y=None, chunk_rows: int | None = DEFAULT_CHUNK_ROWS, *, bounds=None,
                 rows=None, dtype=np.float64):
        self.X = X
        self.Y = Y
        self.rows = None if rows is None else np.asarray(rows)
        self.dtype = dtype
        n = len(X) if self.rows is None else len(self.rows)
        if Y is not None and len(Y) != len(X):
            raise ValueError(f"X has {len(X)} rows but Y has {len(Y)}; they must describe the same spots")
        self.bounds = _bounds(n, chunk_rows, bounds)
        self.n_chunks = len(self.bounds) - 1

    def _take(self, a, i):
        a0, b0 = int(self.bounds[i]), int(self.bounds[i + 1])
        part = a[a0:b0] if self.rows is None else a[self.rows[a0:b0]]
        return np.array(part, dtype=self.dtype)

    def read_chunk(self, i: int):
        return self._take(self.X, i), (None if self.Y is None else self._take(self.Y, i))


class H5Chunks(ChunkSource):
    """Features from embedding cache file(s) and targets from a 2-D dataset of an HDF5 file,
    read ``chunk_rows`` rows at a time (rows ``[start, stop)``; float32).

    Rows are matched by position: the feature files and the target file must list the same ids
    in the same order (checked block by block when ``check_ids``; every file written with
    ``embedder.cache.write_feature_file`` has an ``ids`` dataset). ``target_path=None`` serves
    features only (``Y_chunk`` is None).
    """

    def __init__(self, feature_paths, target_path=None, target_dataset: str = "targets", *,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, start: int = 0, stop: int | None = None,
                 check_ids: bool = True):
        single = isinstance(feature_paths, (str, Path))
        self.feature_paths = [Path(p) for p in ([feature_paths] if single else feature_paths)]
        self.target_path = None if target_path is None else Path(target_path)
        self.target_dataset = target_dataset
        self.check_ids = check_ids
        n_rows = dataset_shape(self.feature_paths[0], "features")[0]
        if self.target_path is not None:
            n_targets = dataset_shape(self.target_path, target_dataset)[0]
            if n_targets != n_rows:
                raise ValueError(f"{self.target_path} holds {n_targets} target rows but "
                                 f"{self.feature_paths[0]} holds {n_rows} feature rows")
        stop = n_rows if stop is None else int(stop)
        if not 0 <= start < stop <= n_rows:
            raise ValueError(f"row range [{start}, {stop}) is outside the {n_rows} rows")
        self.start, self.stop = int(start), stop
        self.bounds = start + _bounds(stop - start, chunk_rows, None)
        self.n_chunks = len(self.bounds) - 1

    @property
    def n_rows(self) -> int:
        return self.stop - self.start

    def read_chunk(self, i: int):
        a, b = int(self.bounds[i]), int(self.bounds[i + 1])
        X = read_feature_rows(self.feature_paths, a, b, check_ids=self.check_ids)
        if self.target_path is None:
            return X, None
        if self.check_ids and read_ids(self.target_path, a, b) != read_ids(self.feature_paths[0], a, b):
            raise CacheError(f"{self.target_path} and {self.feature_paths[0]} hold different spot ids "
                             f"in rows [{a}, {b}); write the targets in the order of the features")
        return X, read_rows(self.target_path, self.target_dataset, a, b)


def is_reiterable(source) -> bool:
    return callable(source) or isinstance(source, ChunkSource) or iter(source) is not source


def iterate_chunks(source):
    """A fresh iterator of ``(X_chunk, Y_chunk)`` over ``source`` (see the module docstring)."""
    if isinstance(source, ChunkSource):
        return iter(source)
    if callable(source):
        return iter(source())
    return iter(source)


def predict_stream(head, x_chunks):
    """Yield ``head.predict(X_chunk)`` for each features block of ``x_chunks`` (arrays, or
    ``(start, stop, X)`` triples as ``embedder.cache.iter_feature_chunks`` yields them)."""
    for item in x_chunks:
        X = item[2] if isinstance(item, tuple) and len(item) == 3 else item
        yield head.predict(X)


# --------------------------------------------------------------------------------------------
# streamed statistics
# --------------------------------------------------------------------------------------------
def _working_copy(a, name: str, dtype) -> np.ndarray:
    """A fresh, finite, 2-D ``dtype`` copy of ``a`` (ValueError naming ``name`` otherwise)."""
    arr = np.array(a, dtype=dtype, copy=True)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        row, col = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} holds NaN/inf (first at row {row}, column {col} of the chunk)")
    return arr


class RunningMoments:
    """Count, means and centred second moments of X (and Y), merged chunk by chunk.

    ``cross=True`` keeps the full (D, D) ``Sxx`` and (D, G) ``Sxy``; otherwise only the diagonal
    ``sxx`` (per-feature sums of squares about the mean). ``syy`` (per target) is always kept
    when Y is given. ``dtype`` is the precision of the per-chunk products (float64 by default;
    float32 halves their cost -- the merged sums are always float64).
    """

    def __init__(self, cross: bool = True, dtype=np.float64):
        self.cross = cross
        self.dtype = np.dtype(dtype)
        self.n = 0
        self.mean_x = self.mean_y = None
        self.Sxx = self.Sxy = self.sxx = self.syy = None
        self.max_abs_x = 0.0

    def update(self, X, Y=None) -> "RunningMoments":
        """Merge one chunk (X: (m, D); Y: (m, G) or None) into the moments."""
        # one working copy per array, centred in place (the caller's arrays are never modified)
        Xc = _working_copy(X, "X chunk (features)", self.dtype)
        Yc = None if Y is None else _working_copy(Y, "Y chunk (targets)", self.dtype)
        if Yc is not None and Yc.shape[0] != Xc.shape[0]:
            raise ValueError(f"a chunk has {Xc.shape[0]} feature rows but {Yc.shape[0]} target rows")
        if self.mean_x is not None:
            if Xc.shape[1] != self.mean_x.shape[0]:
                raise ValueError(f"a chunk has {Xc.shape[1]} features, earlier chunks {self.mean_x.shape[0]}")
            if (Yc is None) != (self.mean_y is None) or (Yc is not None and Yc.shape[1] != self.mean_y.shape[0]):
                raise ValueError("every chunk must carry targets with the same number of genes")
        m = Xc.shape[0]
        self.max_abs_x = max(self.max_abs_x, float(np.abs(Xc).max()))
        mx = Xc.mean(axis=0, dtype=np.float64)
        Xc -= mx.astype(self.dtype)
        cxx = (Xc.T @ Xc).astype(np.float64) if self.cross else (Xc * Xc).sum(axis=0, dtype=np.float64)
        my = cyy = cxy = None
        if Yc is not None:
            my = Yc.mean(axis=0, dtype=np.float64)
            Yc -= my.astype(self.dtype)
            cyy = np.einsum("ij,ij->j", Yc, Yc, dtype=np.float64)
            cxy = (Xc.T @ Yc).astype(np.float64) if self.cross else None
        del Xc, Yc
        if self.n == 0:
            self.n, self.mean_x, self.mean_y, self.syy, self.Sxy = m, mx, my, cyy, cxy
            if self.cross:
                self.Sxx = cxx
            else:
                self.sxx = cxx
            return self
        n_new = self.n + m
        f = self.n * m / n_new
        dx = mx - self.mean_x
        if self.cross:
            self.Sxx += cxx + f * np.outer(dx, dx)
        else:
            self.sxx += cxx + f * dx * dx
        if my is not None:
            dy = my - self.mean_y
            self.syy += cyy + f * dy * dy
            if self.cross:
                self.Sxy += cxy + f * np.outer(dx, dy)
            self.mean_y = self.mean_y + dy * (m / n_new)
        self.mean_x = self.mean_x + dx * (m / n_new)
        self.n = n_new
        return self

    # -- derived quantities ------------------------------------------------------------------
    @property
    def var_x(self) -> np.ndarray:
        """Population variance of each feature (as ``numpy.var``, ddof=0)."""
        diag = np.diag(self.Sxx) if self.cross else self.sxx
        return np.maximum(diag, 0.0) / self.n

    @property
    def var_y(self) -> np.ndarray:
        return np.maximum(self.syy, 0.0) / self.n

    def feature_step(self, n_components: int | None = None, seed: int = 0) -> FeaturePCA:
        """The ``FeaturePCA`` (standardize, optionally project on the leading principal components)
        that ``FeaturePCA(n_components).fit(X)`` would give on all rows seen, from the moments.
        ``n_components`` needs ``cross=True``."""
        step = FeaturePCA(n_components, standardize=True, seed=seed)
        step.mean_ = self.mean_x.copy()
        std = np.sqrt(self.var_x)
        step.scale_ = np.where(std > 1e-12 * max(1.0, self.max_abs_x), std, 1.0)
        step.components_ = None
        if n_components is not None:
            if not self.cross:
                raise ValueError("principal components need the full feature moments (cross=True)")
            gram = self.Sxx / np.outer(step.scale_, step.scale_)
            k = int(min(n_components, self.n, gram.shape[0]))
            eigval, eigvec = np.linalg.eigh(gram)
            top = np.argsort(eigval)[::-1][:k]
            eigvec = eigvec[:, top]
            eigvec *= np.where(eigvec[np.abs(eigvec).argmax(axis=0), range(k)] < 0, -1.0, 1.0)
            step.components_ = eigvec
            step.explained_variance_ = np.clip(eigval[top], 0, None) / max(1, self.n - 1)
        return step


def accumulate(source, cross: bool = True, dtype=np.float64, need_targets: bool = True) -> RunningMoments:
    """One pass over a chunk source into a ``RunningMoments``."""
    moments = RunningMoments(cross=cross, dtype=dtype)
    n_chunks = 0
    for X, Y in iterate_chunks(source):
        if need_targets and Y is None:
            raise ValueError("the chunk source gives no targets (Y_chunk is None); fitting needs them")
        if len(X):
            moments.update(X, Y)
            n_chunks += 1
        del X, Y
    if moments.n == 0:
        raise ValueError("the chunk source gave no rows")
    return moments
