"""Cross-validation of heads with the challenge score, gene panels chosen on training folds only.

``make_folds`` gives (train, test) index pairs: grouped (a slide/patient never straddles folds)
when ``groups`` is given, shuffled K-fold otherwise. ``cross_validate`` fits a fresh model per
fold and returns out-of-fold predictions with a JSON-ready report. Every gene panel -- the
challenge's highly expressed (HEG) and highly variable (HVG) genes, and any panel a weighted loss
uses -- is picked from the training part of the fold; the held-out truth is only scored.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupKFold, KFold

from hexpr.heads.bags import as_bags, fit_on_bags, predict_bags_with_spread
from hexpr.heads.base import HeadError, as_matrix, check_pair, fit_with_supported, progress_task
from hexpr.heads.mean import MeanHead
from hexpr.heads.metrics import N_TOP_DEFAULT, challenge_score, top_genes
from hexpr.heads.uncertainty import predict_with_spread

METRICS = ("score", "mean_corr_cells", "max_corr_genes", "heg_corr", "hvg_corr",
           "pearson_all_genes", "pearson_hvg")


def make_folds(n: int, k: int, groups=None, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train_idx, test_idx) pairs over ``n`` spots; groups are never split across folds."""
    n, k = int(n), int(k)
    if k < 2:
        raise HeadError(f"cross-validation needs at least 2 folds, got {k}")
    if k > n:
        raise HeadError(f"cannot make {k} folds from {n} spots")
    index = np.arange(n)
    if groups is None:
        splits = KFold(n_splits=k, shuffle=True, random_state=seed).split(index)
    else:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise HeadError(f"groups must hold one label per spot ({n}), got shape {groups.shape}")
        labels = np.unique(groups)
        if len(labels) < k:
            shown = ", ".join(map(str, labels[:10]))
            raise HeadError(
                f"cannot make {k} grouped folds: there are only {len(labels)} groups ({shown}) and a "
                f"group is never split across folds; use at most {len(labels)} folds "
                f"(e.g. folds={len(labels)}) or give finer groups")
        splits = GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(index, groups=groups)
    return [(np.sort(train), np.sort(test)) for train, test in splits]


def training_panels(train_truth, n_top: int = N_TOP_DEFAULT) -> dict[str, np.ndarray]:
    """The challenge's gene panels chosen on training targets: top ``n_top`` by sum and by variance."""
    return {"heg": top_genes(train_truth, n_top, by="sum"),
            "hvg": top_genes(train_truth, n_top, by="variance")}


def score_with_panels(pred, truth, panels: dict[str, np.ndarray]) -> dict[str, float]:
    """Challenge score and terms of ``pred`` vs ``truth`` on given (training-chosen) panels,
    plus mean per-gene Pearson over all genes and over the HVG panel."""
    s = challenge_score(pred, truth, n_top=len(panels["hvg"]),
                        heg_genes=panels["heg"], hvg_genes=panels["hvg"])
    return {"score": s["score"], "mean_corr_cells": s["mean_corr_cells"],
            "max_corr_genes": s["max_corr_genes"], "heg_corr": s["heg_corr"], "hvg_corr": s["hvg_corr"],
            "pearson_all_genes": s["mean_corr_genes"], "pearson_hvg": s["hvg_corr"]}


def summarize_folds(fold_rows: list[dict], prefix: str = "") -> dict[str, float]:
    """Mean of each metric over folds (keys ``prefix + metric``), plus the score's spread."""
    summary = {m: float(np.mean([r[prefix + m] for r in fold_rows])) for m in METRICS}
    summary["score_std"] = float(np.std([r[prefix + "score"] for r in fold_rows]))
    return summary


def ratio(score: float, floor: float) -> float | None:
    return float(score / floor) if floor > 0 else None


@dataclass
class CVResult:
    oof: np.ndarray          # (N, G) out-of-fold predictions in the scale of Y (NaN: never held out)
    report: dict             # JSON-serialisable: summary, mean-head summary, per-fold rows
    spread: np.ndarray | None = None  # (N, G) out-of-fold std of a bagged head's members (None: no members)


def cross_validate(make_model, X, Y, folds, *, n_top: int = N_TOP_DEFAULT, groups=None,
                   progress: bool = False, description: str = "cross-validation", bags=None) -> CVResult:
    """Fit ``make_model()`` on each training fold, predict its held-out fold, score both the model
    and the ``mean`` head with panels chosen on the training fold.

    ``folds``: list of (train_idx, test_idx), usually from ``make_folds``; spots in no test fold
    (e.g. a single hold-out split) keep NaN out-of-fold predictions. ``groups`` (optional) is passed,
    restricted to the training fold, to heads whose ``fit`` takes it (the ensemble's inner CV).
    ``bags`` (``heads.bags.Bags``): X holds sub-tiles, Y, folds and groups observations; each fold
    fits on its training observations' bags and predicts the held-out observations as the mean of
    their sub-tile predictions (a bag is never split across folds).
    """
    bags = as_bags(bags, np.shape(Y)[0])
    if bags is None:
        X, Y = check_pair(X, Y)
    else:
        X, Y = as_matrix(X, "X (features)"), as_matrix(Y, "Y (targets)")
        if X.shape[0] != bags.n_patches or Y.shape[0] != bags.n_obs:
            raise HeadError(f"bags of {bags.n_patches} patches / {bags.n_obs} observations do not match X with "
                            f"{X.shape[0]} rows and Y with {Y.shape[0]} rows")
    groups = None if groups is None else np.asarray(groups)
    oof = np.full(Y.shape, np.nan)
    spread = None
    rows = []
    with progress_task(description, len(folds), progress) as advance:
        for i, (train, test) in enumerate(folds):
            panels = training_panels(Y[train], n_top)
            start = time.perf_counter()
            fold_groups = None if groups is None else groups[train]
            if bags is None:
                model = fit_with_supported(make_model(), X[train], Y[train], groups=fold_groups)
                fit_seconds = time.perf_counter() - start
                oof[test], fold_spread = predict_with_spread(model, X[test])
            else:
                rows_train, bags_train = bags.subset(train)
                rows_test, bags_test = bags.subset(test)
                model = fit_on_bags(make_model(), X[rows_train], Y[train], bags_train, groups=fold_groups)
                fit_seconds = time.perf_counter() - start
                oof[test], fold_spread = predict_bags_with_spread(model, X[rows_test], bags_test)
            if fold_spread is not None:
                spread = np.full(Y.shape, np.nan) if spread is None else spread
                spread[test] = fold_spread
            rows.append(_fold_row(i, train, test, oof, Y, groups, panels, fit_seconds))
            advance()
    return CVResult(oof=oof, report=_cv_report(rows, oof, n_top), spread=spread)


def _fold_row(i, train, test, oof, Y, groups, panels, fit_seconds: float) -> dict:
    """One fold's scores: the model's held-out predictions and the mean head's, on the training panels."""
    floor = np.tile(MeanHead().fit(Y[train], Y[train]).mean_, (len(test), 1))
    row = {"fold": i, "n_train": int(len(train)), "n_test": int(len(test)), "fit_seconds": round(fit_seconds, 3)}
    if groups is not None:   # which slides / sections this fold held out
        row["held_out"] = [str(g) for g in dict.fromkeys(groups[test].tolist())]
    row.update(score_with_panels(oof[test], Y[test], panels))
    row.update({"mean_head_" + k: v for k, v in score_with_panels(floor, Y[test], panels).items()})
    return row


def score_oof(oof, Y, folds, *, n_top: int = N_TOP_DEFAULT, groups=None, fit_seconds=None) -> CVResult:
    """The CV report of out-of-fold predictions made elsewhere (e.g. a blend of two heads' OOF
    predictions over the same ``folds``), scored exactly as ``cross_validate`` scores its own."""
    oof, Y = np.asarray(oof, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    groups = None if groups is None else np.asarray(groups)
    seconds = list(fit_seconds) if fit_seconds is not None else [0.0] * len(folds)
    rows = [_fold_row(i, train, test, oof, Y, groups, training_panels(Y[train], n_top), seconds[i])
            for i, (train, test) in enumerate(folds)]
    return CVResult(oof=oof, report=_cv_report(rows, oof, n_top), spread=None)


def _cv_report(rows: list[dict], oof: np.ndarray, n_top: int) -> dict:
    model_summary = summarize_folds(rows)
    floor_summary = summarize_folds(rows, prefix="mean_head_")
    return {
        "n_folds": len(rows), "n_top": int(n_top),
        "n_predicted_spots": int((~np.isnan(oof[:, 0])).sum()),
        "model": model_summary,
        "mean_head": floor_summary,
        "ratio_to_mean": ratio(model_summary["score"], floor_summary["score"]),
        "fit_seconds": float(sum(r["fit_seconds"] for r in rows)),
        "folds": rows,
    }
