"""The challenge metric against a case worked by hand and against scipy."""
import numpy as np
import pytest
from scipy.stats import pearsonr

from hexpr.heads.metrics import challenge_score, pearson_per_gene, pearson_rows, top_genes


def test_hand_worked_case():
    # 3 spots x 3 genes.
    truth = np.array([[1.0, 0.0, 5.0], [2.0, 1.0, 5.0], [3.0, 5.0, 6.0]])
    pred = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 2.0], [3.0, 1.0, 3.0]])
    # per gene: g0 identical -> 1; g1 truth (0,1,5) vs (1,0,1): centred t=(-2,-1,3), p=(1/3,-2/3,1/3)
    #   cov = -2/3+2/3+1 = 1, |t|^2 = 14, |p|^2 = 1/9+4/9+1/9 = 6/9 -> r = 1/sqrt(14*6/9) = 0.327327
    # g2 truth (5,5,6) vs (1,2,3): t=(-1/3,-1/3,2/3), p=(-1,0,1): cov=1, |t|^2=2/3, |p|^2=2 -> r = 1/sqrt(4/3) = 0.86603
    r = pearson_per_gene(pred, truth)
    assert r == pytest.approx([1.0, 0.327327, 0.866025], abs=1e-5)
    # per spot: s0 truth (1,0,5) vs pred (1,1,1) constant -> 0 (counted)
    s = challenge_score(pred, truth, n_top=2)
    assert s["n_constant_spots"] == 1
    # HEG top-2 by sum: g2 (16), g0 (6) -> (0.866025 + 1)/2 ; HVG top-2 by variance: g1 (var 4.67), g0 (0.67) vs g2 (0.22)
    assert s["heg_corr"] == pytest.approx((0.866025 + 1) / 2, abs=1e-5)
    assert s["hvg_corr"] == pytest.approx((0.327327 + 1) / 2, abs=1e-5)
    assert s["max_corr_genes"] == pytest.approx(1.0)
    # spots s1: truth (2,1,5) pred (2,0,2); s2: truth (3,5,6) pred (3,1,3)
    s1 = pearsonr([2, 1, 5], [2, 0, 2])[0]
    s2 = pearsonr([3, 5, 6], [3, 1, 3])[0]
    assert s["mean_corr_cells"] == pytest.approx((0 + s1 + s2) / 3, abs=1e-9)
    expected = (s["mean_corr_cells"] + 1.0 + (0.866025 + 1) / 2 + (0.327327 + 1) / 2) / 4
    assert s["score"] == pytest.approx(expected, abs=1e-5)


def test_matches_scipy_on_random_data():
    rng = np.random.default_rng(1)
    truth = rng.gamma(2.0, 1.0, (40, 25))
    pred = truth + rng.normal(0, 1.5, truth.shape)
    ours = pearson_per_gene(pred, truth)
    theirs = [pearsonr(pred[:, j], truth[:, j])[0] for j in range(25)]
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    rows = pearson_rows(pred, truth)
    np.testing.assert_allclose(rows, [pearsonr(pred[i], truth[i])[0] for i in range(40)], atol=1e-12)
    s = challenge_score(pred, truth, n_top=10)
    hvg = np.argsort(-truth.var(axis=0))[:10]
    heg = np.argsort(-truth.sum(axis=0))[:10]
    assert s["hvg_corr"] == pytest.approx(np.mean(np.array(theirs)[hvg]))
    assert s["heg_corr"] == pytest.approx(np.mean(np.array(theirs)[heg]))
    assert s["max_corr_genes"] == pytest.approx(max(theirs))


def test_constant_prediction_scores_zero_never_nan():
    truth = np.random.default_rng(0).random((10, 5))
    pred = np.ones_like(truth)
    s = challenge_score(pred, truth)
    assert s["score"] == 0.0 and s["n_constant_genes"] == 5 and s["n_constant_spots"] == 10
    assert all(np.isfinite(v) for v in s.values() if isinstance(v, float))


def test_negative_mean_is_clipped_to_zero():
    truth = np.random.default_rng(0).random((20, 6))
    s = challenge_score(-truth, truth, n_top=3)
    assert s["mean_corr_cells"] < 0 and s["score"] == 0.0


def test_top_genes_by_sum_and_variance():
    truth = np.array([[0, 10, 1], [0, 10, 9], [0, 10, 5]], dtype=float)
    assert top_genes(truth, 1, "sum").tolist() == [1]
    assert top_genes(truth, 1, "variance").tolist() == [2]


def test_panels_can_come_from_elsewhere():
    rng = np.random.default_rng(2)
    truth = rng.random((30, 8))
    pred = truth.copy()
    pred[:, 0] = rng.random(30)
    s = challenge_score(pred, truth, hvg_genes=[0], heg_genes=[1, 2])
    assert s["heg_corr"] == pytest.approx(1.0)
    assert s["hvg_corr"] == pytest.approx(pearson_per_gene(pred, truth)[0])


def test_shape_mismatch_and_nan_rejected():
    with pytest.raises(ValueError, match="shape"):
        challenge_score(np.zeros((3, 2)), np.zeros((3, 3)))
    bad = np.ones((3, 2))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="spot row 1, gene column 1"):
        challenge_score(bad, np.ones((3, 2)))
