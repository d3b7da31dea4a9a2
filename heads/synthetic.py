"""Synthetic features and expression with a known low-rank signal: the data of the head tests and benchmarks."""
from __future__ import annotations

import numpy as np


def synthetic_expression(n_spots: int = 6992, n_features: int = 1664, n_genes: int = 3467, *,
                         rank: int = 16, n_dominant: int = 10, noise: float = 1.0, seed: int = 0,
                         groups: int = 0):
    """(X, Y, groups): features and non-negative expression sharing a low-rank latent signal.

    X = latent @ A + noise; Y = clip(gene mean + tanh(latent) @ B + noise, 0), where
    ``n_dominant`` genes have much larger means and loadings (the highly expressed genes).
    ``groups`` > 0 adds a per-group shift of the latent factors (slides) and returns the labels.
    """
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n_spots, rank))
    group_labels = None
    if groups:
        group_labels = rng.integers(groups, size=n_spots)
        latent += 0.5 * rng.standard_normal((groups, rank))[group_labels]
    X = latent @ rng.standard_normal((rank, n_features)) / np.sqrt(rank)
    X += 0.5 * rng.standard_normal((n_spots, n_features))
    gene_mean = rng.gamma(1.5, 1.0, size=n_genes)
    loadings = rng.standard_normal((rank, n_genes)) * rng.gamma(1.0, 0.3, size=n_genes)
    dominant = rng.choice(n_genes, size=min(n_dominant, n_genes), replace=False)
    gene_mean[dominant] *= 8.0
    loadings[:, dominant] *= 4.0
    Y = gene_mean + np.tanh(latent) @ loadings + noise * rng.standard_normal((n_spots, n_genes))
    return X.astype(np.float32), np.clip(Y, 0.0, None), group_labels
