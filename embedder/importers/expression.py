"""Expression matrices: raw counts as CSR, normalisation (log1p of counts per 10k, or none)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import ImporterError, warn

NORMALIZATIONS = ("log1p_cp10k", "none")
DENSE_X_MAX_ELEMENTS = 50_000_000       # .h5ad X is dense float32 up to this many values


def counts_to_csr(values: Any) -> tuple[sp.csr_matrix, bool]:
    """Raw counts as CSR (int32/int64 when integral, else float32) + integrality flag."""
    m = sp.csr_matrix(values)
    m.eliminate_zeros()
    data = m.data
    integral = bool(data.size == 0 or np.all(np.mod(data, 1) == 0))
    if data.size and np.any(data < 0):
        raise ImporterError("count matrix holds negative values; raw (non-negative) counts are needed")
    if integral:
        mx = data.max() if data.size else 0
        m = m.astype(np.int32 if mx < 2**31 else np.int64)
    else:
        m = m.astype(np.float32)
    return m, integral


def normalize_counts(counts: sp.csr_matrix, cols: np.ndarray | None, method: str,
                     messages: list[str] | None = None, name: str = "") -> tuple[Any, sp.csr_matrix, dict]:
    """Returns (X float32 normalised, raw counts subset, details).

    The library size of log1p_cp10k is the spot's total over ALL genes of the sample (before any
    gene intersection), as with scanpy's normalize_total run before gene selection.
    """
    if method not in NORMALIZATIONS:
        raise ImporterError(f"normalize={method!r} is not one of {NORMALIZATIONS}")
    lib = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
    sub = counts[:, cols] if cols is not None else counts
    sub = sp.csr_matrix(sub)
    details: dict = {"method": method}
    if method == "none":
        Xs = sub.astype(np.float32)
    else:
        zero = int((lib <= 0).sum())
        if zero:
            warn(messages, f"{name}: {zero} spot(s) have zero total counts; their normalised "
                           f"expression is all zeros")
        scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
        Xs = sp.csr_matrix(sp.diags(scale) @ sub.astype(np.float64))
        Xs.data = np.log1p(Xs.data)
        Xs = Xs.astype(np.float32)
        details.update(target_sum=1e4, library_size="total counts over all genes of the sample",
                       transform="log1p")
    n, g = Xs.shape
    if n * g <= DENSE_X_MAX_ELEMENTS:
        X = Xs.toarray()
    else:
        X = Xs
    details["X_storage"] = "dense" if isinstance(X, np.ndarray) else "csr"
    return X, sub, details


def gene_columns(sample_genes: list[str], genes: list[str]) -> np.ndarray:
    """Column of each of ``genes`` in a sample whose count columns are ``sample_genes``."""
    col_of = {g: j for j, g in enumerate(sample_genes)}
    return np.array([col_of[g] for g in genes], dtype=np.int64)
