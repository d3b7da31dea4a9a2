"""Retrieval heads: predict a spot as the weighted mean expression of its nearest training spots.

``knn`` (untrained): cosine neighbours in standardized feature space.
``bleep`` (trained, after BLEEP, Xie et al. 2023): an image projection and an expression
projection are trained into a shared space with a symmetric InfoNCE loss on the cached features;
a query image is projected and matched against the projected expression of the training spots
(``match="expression"``, BLEEP's choice) or their projected images (``match="image"``).
Neighbour weights: ``softmax`` of similarity / temperature, ``similarity`` (clipped at 0), or
``uniform``.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from hexpr.heads.base import FeaturePCA, Head
from hexpr.heads.mlp import TorchStateMixin, as_widths, build_mlp, minibatches, predict_in_chunks, resolve_device, torch_session
from hexpr.heads.params import N_THREADS, NON_NEGATIVE, POSITIVE, SEED, Device, Int, Options, Real, Widths

WEIGHTINGS = ("softmax", "similarity", "uniform")
_QUERY_CHUNK = 512


def l2_normalize(Z: np.ndarray) -> np.ndarray:
    """Unit-norm rows in float64: similarities then do not depend, beyond float64 rounding, on which
    rows are predicted together (float32 BLAS blocking changes last bits with the batch)."""
    Z = np.asarray(Z, dtype=np.float64)
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    return Z / np.where(norms > 0, norms, 1.0)


def neighbour_weights(sim: np.ndarray, weighting: str, temperature: float) -> np.ndarray:
    """Row-normalised weights (c, k) from the similarities of each query's k neighbours."""
    if weighting == "softmax":
        w = np.exp((sim - sim.max(axis=1, keepdims=True)) / temperature)
    elif weighting == "similarity":
        w = np.clip(sim, 0.0, None)
        w[w.sum(axis=1) <= 0] = 1.0          # no positive similarity: fall back to uniform
    elif weighting == "uniform":
        w = np.ones_like(sim)
    else:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    return w / w.sum(axis=1, keepdims=True)


def retrieve_average(query: np.ndarray, reference: np.ndarray, values: np.ndarray, k: int,
                     weighting: str, temperature: float) -> np.ndarray:
    """For unit-norm ``query`` rows, the weighted mean of ``values`` over the ``k`` most
    cosine-similar ``reference`` rows. Works in query chunks through a sparse weight matrix."""
    k = int(min(k, reference.shape[0]))
    out = np.empty((query.shape[0], values.shape[1]))
    for start in range(0, query.shape[0], _QUERY_CHUNK):
        sim = query[start:start + _QUERY_CHUNK] @ reference.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        w = neighbour_weights(np.take_along_axis(sim, idx, axis=1).astype(np.float64), weighting, temperature)
        rows = np.repeat(np.arange(sim.shape[0]), k)
        W = sp.csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(sim.shape[0], reference.shape[0]))
        out[start:start + sim.shape[0]] = W @ values
    return out


class _RetrievalHead(Head):
    """Shared fitted state: unit-norm reference embeddings and the reference expression."""

    def _set_reference(self, embeddings: np.ndarray, Y: np.ndarray):
        self.reference_ = l2_normalize(embeddings)
        self.reference_targets_ = Y.astype(np.float64)

    def _retrieve(self, query_embeddings: np.ndarray) -> np.ndarray:
        return retrieve_average(l2_normalize(query_embeddings), self.reference_, self.reference_targets_,
                                self.k, self.weighting, self.temperature)


class KNNHead(_RetrievalHead):
    """Untrained cosine k-nearest-neighbour retrieval in standardized feature space."""

    param_constraints = {"k": Int(1), "weighting": Options(*WEIGHTINGS), "temperature": POSITIVE}

    search_space = {
        "k": [5, 10, 20, 50, 100],
        "weighting": list(WEIGHTINGS),
        "temperature": {"log": [0.01, 1.0]},
    }

    def __init__(self, k: int = 20, weighting: str = "softmax", temperature: float = 0.1):
        self.k = k
        self.weighting = weighting
        self.temperature = temperature

    def fit(self, X, Y):
        X, Y = self._start_fit(X, Y)
        self.features_ = FeaturePCA(None, standardize=True).fit(X)
        self._set_reference(self.features_.transform(X), Y)
        return self

    def _predict(self, X):
        return self._retrieve(self.features_.transform(X))


def info_nce(image_z: torch.Tensor, expr_z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: matching (image, expression) pairs are positives, the batch negatives."""
    logits = nn.functional.normalize(image_z, dim=1) @ nn.functional.normalize(expr_z, dim=1).T
    logits = logits / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))


class BleepHead(TorchStateMixin, _RetrievalHead):
    """Contrastively trained image/expression projections, then retrieval in the shared space."""

    param_constraints = {
        "dim": Int(1), "hidden": Widths(), "expression_hidden": Widths(), "dropout": Real(0, 1, high_open=True),
        "contrastive_temperature": POSITIVE, "epochs": Int(1), "batch_size": Int(2), "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE, "k": Int(1), "weighting": Options(*WEIGHTINGS), "temperature": POSITIVE,
        "match": Options("expression", "image"), "seed": SEED, "device": Device(), "n_threads": N_THREADS,
    }

    _torch_modules = ("image_encoder_",)
    # scikit-learn tag: on one-target regression data (the estimator checks') the contrastive
    # image/expression alignment has nothing to align, so the fit is poor; BLEEP needs many genes
    poor_score = True
    search_space = {
        "dim": [64, 128, 256],
        "hidden": [[], [512]],
        "contrastive_temperature": [0.05, 0.1, 0.2],
        "k": [10, 20, 50],
        "lr": {"log": [3e-4, 3e-3]},
        "epochs": [20, 40, 80],
    }

    def __init__(self, dim: int = 128, hidden=(), expression_hidden=(), dropout: float = 0.0,
                 contrastive_temperature: float = 0.1, epochs: int = 40, batch_size: int = 256,
                 lr: float = 1e-3, weight_decay: float = 1e-4, k: int = 20, weighting: str = "softmax",
                 temperature: float = 0.1, match: str = "expression", seed: int = 0,
                 device: str = "auto", n_threads: int | None = None):
        self.dim = dim
        self.hidden = hidden
        self.expression_hidden = expression_hidden
        self.dropout = dropout
        self.contrastive_temperature = contrastive_temperature
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.k = k
        self.weighting = weighting
        self.temperature = temperature
        self.match = match
        self.seed = seed
        self.device = device
        self.n_threads = n_threads

    def _build_module(self, attr):
        return build_mlp(self.n_features_in_, as_widths(self.hidden), int(self.dim), self.dropout)

    def fit(self, X, Y):
        X, Y = self._start_fit(X, Y)
        if self.match not in ("expression", "image"):
            raise ValueError(f"match must be 'expression' or 'image', got {self.match!r}")
        self.features_ = FeaturePCA(None, standardize=True).fit(X)
        Zx = self.features_.transform(X)
        Zy = FeaturePCA(None, standardize=True).fit_transform(Y)      # encoder input only
        device = resolve_device(self.device)
        with torch_session(self.seed, self.n_threads) as generator:
            self.image_encoder_ = self._build_module("image_encoder_").to(device)
            expression_encoder = build_mlp(Y.shape[1], as_widths(self.expression_hidden), int(self.dim),
                                           self.dropout).to(device)
            self.loss_history_ = self._train(Zx, Zy, expression_encoder, device, generator)
            reference = Zy if self.match == "expression" else Zx
            encoder = expression_encoder if self.match == "expression" else self.image_encoder_
            self._set_reference(predict_in_chunks(encoder, reference, device), Y)
        return self

    def _train(self, Zx, Zy, expression_encoder, device, generator) -> list[float]:
        Xt = torch.as_tensor(Zx, dtype=torch.float32, device=device)
        Yt = torch.as_tensor(Zy, dtype=torch.float32, device=device)
        params = list(self.image_encoder_.parameters()) + list(expression_encoder.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        history = []
        for _ in range(int(self.epochs)):
            self.image_encoder_.train()
            expression_encoder.train()
            total = 0.0
            for idx in minibatches(Xt.shape[0], int(self.batch_size), generator):
                idx = idx.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = info_nce(self.image_encoder_(Xt[idx]), expression_encoder(Yt[idx]),
                                self.contrastive_temperature)
                loss.backward()
                optimizer.step()
                total += loss.detach().item() * len(idx)
            history.append(total / Xt.shape[0])
        self.image_encoder_.eval()
        return history

    def _predict(self, X):
        device = next(self.image_encoder_.parameters()).device
        return self._retrieve(predict_in_chunks(self.image_encoder_, self.features_.transform(X), device))
