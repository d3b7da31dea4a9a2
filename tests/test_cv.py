import numpy as np
import pytest

import hexpr.heads.cv as cv
import hexpr.heads.mlp as mlp
from hexpr.heads.cv import cross_validate, make_folds, training_panels
from hexpr.heads.metrics import top_genes
from hexpr.heads.sweep import model_factory


def test_kfold_partitions_all_spots():
    folds = make_folds(23, 4, seed=3)
    tests = np.concatenate([test for _, test in folds])
    assert sorted(tests) == list(range(23))
    for train, test in folds:
        assert not set(train) & set(test)
        assert len(train) + len(test) == 23
    assert [t.tolist() for _, t in make_folds(23, 4, seed=3)] == [t.tolist() for _, t in folds]


def test_group_folds_never_split_a_group():
    groups = np.repeat(["s1", "s2", "s3", "s4", "s5", "s6", "s7"], [5, 9, 3, 12, 7, 4, 6])
    folds = make_folds(len(groups), 3, groups=groups, seed=1)
    seen = set()
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        seen |= set(test)
    assert seen == set(range(len(groups)))


def test_too_few_groups_is_a_clear_error():
    groups = np.repeat(["a", "b", "c"], 4)
    with pytest.raises(ValueError, match="only 3 groups.*at most 3 folds"):
        make_folds(12, 5, groups=groups)


def test_bad_fold_arguments():
    with pytest.raises(ValueError, match="at least 2"):
        make_folds(10, 1)
    with pytest.raises(ValueError, match="one label per spot"):
        make_folds(10, 2, groups=np.zeros(9))


def _data_where_heldout_panels_differ():
    """Training rows favour genes 0-4, the last fold's rows favour genes 5-9 (by sum and variance)."""
    rng = np.random.default_rng(0)
    n, g = 40, 12
    X = rng.standard_normal((n, 4))
    Y = rng.random((n, g))
    Y[:30, :5] += 5 + 3 * rng.random((30, 5))
    Y[30:, 5:10] += 50 + 30 * rng.random((10, 5))
    blocks = [np.arange(30, 40), np.arange(0, 10), np.arange(10, 20), np.arange(20, 30)]
    folds = [(np.setdiff1d(np.arange(n), test), test) for test in blocks]
    return X, Y, folds


def test_cv_panels_come_from_training_fold_only(monkeypatch):
    X, Y, folds = _data_where_heldout_panels_differ()
    calls = []
    real = cv.challenge_score

    def spy(pred, truth, n_top=50, heg_genes=None, hvg_genes=None):
        calls.append((np.asarray(heg_genes), np.asarray(hvg_genes)))
        return real(pred, truth, n_top, heg_genes, hvg_genes)

    monkeypatch.setattr(cv, "challenge_score", spy)
    cross_validate(model_factory("ridge"), X, Y, folds, n_top=5)
    train, test = folds[0]
    expected_heg, expected_hvg = top_genes(Y[train], 5, "sum"), top_genes(Y[train], 5, "variance")
    assert set(top_genes(Y[test], 5, "sum")) != set(expected_heg)          # the trap is real
    assert set(top_genes(Y[test], 5, "variance")) != set(expected_hvg)
    for heg, hvg in calls[:2]:   # model and mean head on fold 0
        assert set(heg) == set(expected_heg) and set(hvg) == set(expected_hvg)


def test_weighted_loss_panels_come_from_training_rows_only(monkeypatch):
    X, Y, folds = _data_where_heldout_panels_differ()
    seen = []
    real = mlp.panel_gene_weights

    def spy(reference, n_top, boost):
        seen.append(np.array(reference))
        return real(reference, n_top, boost)

    monkeypatch.setattr(mlp, "panel_gene_weights", spy)
    factory = model_factory("mlp", {"loss": "weighted_mse", "epochs": 2, "hidden": [8], "n_top": 5,
                                    "device": "cpu", "n_threads": 1}, "standardize")
    cross_validate(factory, X, Y, folds[:1], n_top=5)
    train, test = folds[0]
    assert seen, "weighted loss never asked for gene weights"
    train_rows = {tuple(r) for r in Y[train]}
    assert all(tuple(r) in train_rows for r in seen[0])      # raw training targets, no held-out row
    assert not any(tuple(r) in train_rows for r in Y[test])


def test_cross_validate_report_shape():
    X, Y, folds = _data_where_heldout_panels_differ()
    result = cross_validate(model_factory("ridge"), X, Y, folds, n_top=5)
    assert result.oof.shape == Y.shape and np.isfinite(result.oof).all()
    report = result.report
    assert report["n_folds"] == 4 and len(report["folds"]) == 4
    for key in ("score", "mean_corr_cells", "max_corr_genes", "heg_corr", "hvg_corr",
                "pearson_all_genes", "pearson_hvg", "score_std"):
        assert key in report["model"] and key in report["mean_head"]
    assert report["mean_head"]["pearson_all_genes"] == 0.0     # a constant prediction
    assert "mean_head_score" in report["folds"][0]


def test_training_panels_sizes():
    Y = np.random.default_rng(1).random((20, 30))
    panels = training_panels(Y, 7)
    assert len(panels["heg"]) == 7 and len(panels["hvg"]) == 7
