"""Gradient boosting on the leading principal components of the targets.

Boosting one model per gene (3,467 genes) takes hours; expression is strongly correlated across
genes, so the head compresses the targets with PCA (``n_components``, default 16), boosts one
LightGBM regressor per component with early stopping on an internal validation split, and maps
the predicted components back to genes with the PCA inverse. The binned LightGBM dataset is built
once and reused for every component (only the label changes).

``n_jobs`` defaults to 1 thread: LightGBM's OpenMP threads spin-wait, and on a machine whose cores
are shared they slowed a fit down 6x in our measurements; raise it only on an idle machine.
"""
from __future__ import annotations

import lightgbm as lgb
import numpy as np
from sklearn.decomposition import PCA

from hexpr.heads.base import Head, rng_split
from hexpr.heads.params import FRACTION, NON_NEGATIVE, POSITIVE, SEED, Int, Real


def lgb_params(head: "GBMHead") -> dict:
    """LightGBM training parameters from the head's hyper-parameters."""
    return {
        "objective": "l2", "learning_rate": head.learning_rate, "num_leaves": head.num_leaves,
        "min_data_in_leaf": head.min_child_samples, "feature_fraction": head.feature_fraction,
        "bagging_fraction": head.bagging_fraction, "bagging_freq": 1 if head.bagging_fraction < 1 else 0,
        "lambda_l2": head.lambda_l2, "max_bin": head.max_bin, "seed": head.seed,
        "num_threads": int(head.n_jobs or 0), "deterministic": True, "force_row_wise": True,
        "feature_pre_filter": False, "verbose": -1,
    }


def binned_datasets(X_tr, X_val, params: dict) -> tuple[lgb.Dataset, lgb.Dataset]:
    """LightGBM's binned training and validation datasets, built once and relabelled per target."""
    dataset_params = {k: params[k] for k in ("max_bin", "verbose", "feature_pre_filter", "seed")}
    zeros_tr, zeros_val = np.zeros(len(X_tr)), np.zeros(len(X_val))
    train_set = lgb.Dataset(X_tr, label=zeros_tr, params=dataset_params, free_raw_data=False).construct()
    val_set = lgb.Dataset(X_val, label=zeros_val, reference=train_set, params=dataset_params,
                          free_raw_data=False).construct()
    return train_set, val_set


def boost_columns(train_set: lgb.Dataset, val_set: lgb.Dataset, T_tr, T_val, params: dict,
                  n_estimators: int, early_stopping_rounds: int) -> list[lgb.Booster]:
    """One early-stopped booster per column of ``T_tr`` on the shared binned datasets."""
    boosters = []
    for j in range(T_tr.shape[1]):
        train_set.set_label(T_tr[:, j])
        val_set.set_label(T_val[:, j])
        boosters.append(lgb.train(
            params, train_set, num_boost_round=int(n_estimators), valid_sets=[val_set],
            callbacks=[lgb.early_stopping(int(early_stopping_rounds), verbose=False)]))
    return boosters


def predict_columns(boosters: list[lgb.Booster], X) -> np.ndarray:
    return np.column_stack([b.predict(X, num_iteration=b.best_iteration or None) for b in boosters])


class GBMHead(Head):
    """LightGBM per target principal component, mapped back to genes."""

    param_constraints = {
        "n_components": Int(1), "n_estimators": Int(1), "learning_rate": POSITIVE, "num_leaves": Int(2),
        "min_child_samples": Int(1), "feature_fraction": Real(0, 1, low_open=True),
        "bagging_fraction": Real(0, 1, low_open=True), "lambda_l2": NON_NEGATIVE, "max_bin": Int(2),
        "early_stopping_rounds": Int(1), "val_fraction": FRACTION, "seed": SEED, "n_jobs": Int(-1),
    }

    search_space = {
        "n_components": [16, 32, 64],
        "learning_rate": {"log": [0.02, 0.2]},
        "num_leaves": [7, 15, 31],
        "min_child_samples": [10, 20, 50],
        "feature_fraction": [0.1, 0.2, 0.5],
        "lambda_l2": {"log": [1e-3, 10.0]},
    }

    min_samples = 3     # the internal validation split needs two training rows and one held out

    def __init__(self, n_components: int = 16, n_estimators: int = 300, learning_rate: float = 0.1,
                 num_leaves: int = 15, min_child_samples: int = 20, feature_fraction: float = 0.2,
                 bagging_fraction: float = 0.8, lambda_l2: float = 1.0, max_bin: int = 63,
                 early_stopping_rounds: int = 20, val_fraction: float = 0.1, seed: int = 0,
                 n_jobs: int = 1):
        self.n_components = n_components
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.feature_fraction = feature_fraction
        self.bagging_fraction = bagging_fraction
        self.lambda_l2 = lambda_l2
        self.max_bin = max_bin
        self.early_stopping_rounds = early_stopping_rounds
        self.val_fraction = val_fraction
        self.seed = seed
        self.n_jobs = n_jobs

    def fit(self, X, Y):
        X, Y = self._start_fit(X, Y)
        train, val = rng_split(X.shape[0], self.val_fraction, self.seed)
        k = int(min(self.n_components, len(train) - 1, Y.shape[1]))
        self.target_pca_ = PCA(n_components=k, svd_solver="randomized" if k < min(Y.shape) // 2 else "full",
                               random_state=self.seed).fit(Y[train])
        self.explained_variance_ratio_ = float(self.target_pca_.explained_variance_ratio_.sum())
        components = self.target_pca_.transform(Y)
        params = lgb_params(self)
        train_set, val_set = binned_datasets(X[train].astype(np.float32), X[val].astype(np.float32), params)
        self.boosters_ = boost_columns(train_set, val_set, components[train], components[val], params,
                                       self.n_estimators, self.early_stopping_rounds)
        self.best_iterations_ = [int(b.best_iteration or b.current_iteration()) for b in self.boosters_]
        return self

    def _predict(self, X):
        return self.target_pca_.inverse_transform(predict_columns(self.boosters_, X.astype(np.float32)))
