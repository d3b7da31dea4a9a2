"""Scores for predicted expression: the 2024 challenge score and per-gene Pearson.

All functions take ``pred`` and ``truth`` as (N spots, G genes) arrays in the same gene order.
A constant vector has no defined Pearson correlation; it scores 0.0 here (never NaN) and the
number of such vectors is reported so a user can see when it happened.
"""
from __future__ import annotations

import numpy as np

N_TOP_DEFAULT = 50


def _as_2d_float(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (spots x genes) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} holds NaN/inf (first at spot row {bad[0]}, gene column {bad[1]})")
    return arr


def _check_pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    pred = _as_2d_float(pred, "pred")
    truth = _as_2d_float(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} differs from truth shape {truth.shape}")
    if pred.shape[0] < 2:
        raise ValueError("need at least 2 spots to compute correlations")
    return pred, truth


def _pearson_along(a: np.ndarray, b: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """Pearson r of matching slices along ``axis``; constant slices give 0. Returns (r, n_constant)."""
    a_c = a - a.mean(axis=axis, keepdims=True)
    b_c = b - b.mean(axis=axis, keepdims=True)
    num = (a_c * b_c).sum(axis=axis)
    ss_a = (a_c * a_c).sum(axis=axis)
    ss_b = (b_c * b_c).sum(axis=axis)
    # a slice whose spread is at floating-point noise level is constant
    tol_a = (np.abs(a).max(axis=axis) ** 2 + 1e-300) * 1e-24 * a.shape[axis]
    tol_b = (np.abs(b).max(axis=axis) ** 2 + 1e-300) * 1e-24 * b.shape[axis]
    constant = (ss_a <= tol_a) | (ss_b <= tol_b)
    denom = np.sqrt(np.where(constant, 1.0, ss_a * ss_b))
    r = np.where(constant, 0.0, num / denom)
    return np.clip(r, -1.0, 1.0), int(constant.sum())


def pearson_rows(a, b) -> np.ndarray:
    """Per-row Pearson r between two (N, G) arrays (one value per spot)."""
    a = _as_2d_float(a, "a")
    b = _as_2d_float(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return _pearson_along(a, b, axis=1)[0]


def pearson_per_gene(pred, truth) -> np.ndarray:
    """Per-gene (column) Pearson r across spots, shape (G,)."""
    pred, truth = _check_pair(pred, truth)
    return _pearson_along(pred, truth, axis=0)[0]


def top_genes(truth, n: int = N_TOP_DEFAULT, by: str = "variance") -> np.ndarray:
    """Column indices of the ``n`` genes with the largest variance or sum of ``truth``.

    Ties are broken by column order (stable), so the selection is reproducible.
    """
    truth = _as_2d_float(truth, "truth")
    if by == "variance":
        stat = truth.var(axis=0)
    elif by == "sum":
        stat = truth.sum(axis=0)
    else:
        raise ValueError(f"by must be 'variance' or 'sum', got {by!r}")
    n = min(int(n), truth.shape[1])
    return np.argsort(-stat, kind="stable")[:n]


def challenge_score(pred, truth, n_top: int = N_TOP_DEFAULT, heg_genes=None, hvg_genes=None) -> dict:
    """The 2024 challenge score and its four terms.

    score = max(0, (MeanCorr_cells + MaxCorr_genes + HEG_corr + HVG_corr) / 4)

    ``heg_genes`` / ``hvg_genes`` (column indices) override the gene panels; by default they are
    the ``n_top`` genes with the largest sum / variance of ``truth`` (the challenge's rule). Pass
    panels chosen on training data to keep the held-out truth out of gene selection.
    """
    pred, truth = _check_pair(pred, truth)
    r_cells, n_const_cells = _pearson_along(pred, truth, axis=1)
    r_genes, n_const_genes = _pearson_along(pred, truth, axis=0)
    heg = np.asarray(top_genes(truth, n_top, "sum") if heg_genes is None else heg_genes, dtype=int)
    hvg = np.asarray(top_genes(truth, n_top, "variance") if hvg_genes is None else hvg_genes, dtype=int)
    terms = {
        "mean_corr_cells": float(r_cells.mean()),
        "max_corr_genes": float(r_genes.max()),
        "heg_corr": float(r_genes[heg].mean()),
        "hvg_corr": float(r_genes[hvg].mean()),
    }
    raw = sum(terms.values()) / 4.0
    return {
        "score": float(max(0.0, raw)),
        **terms,
        "mean_corr_genes": float(r_genes.mean()),
        "n_spots": int(pred.shape[0]),
        "n_genes": int(pred.shape[1]),
        "n_top": int(len(hvg)),
        "n_constant_spots": n_const_cells,
        "n_constant_genes": n_const_genes,
    }

