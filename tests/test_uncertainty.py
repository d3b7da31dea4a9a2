"""Prediction uncertainty: conformal quantiles, bagged members' spread, clipping to the training range, outputs."""
from __future__ import annotations

import math
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import TINY_BACKBONE, write_challenge_dataset
from typer.testing import CliRunner

from hexpr.heads.base import make_head
from hexpr.heads.bagging import SeedBagged
from hexpr.heads.fitting import fit_head, load_model
from hexpr.heads.synthetic import synthetic_expression
from hexpr.heads.targets import TargetTransformed
from hexpr.heads.uncertainty import (
    CONFORMAL_KEY,
    RANGE_KEY,
    UncertaintyWarning,
    calibrate,
    conformal_quantiles,
    predict_uncertain,
    predict_with_spread,
)
from hexpr.pipeline import app

runner = CliRunner()


# --------------------------------------------------------------------------------------------
# conformal quantiles
# --------------------------------------------------------------------------------------------
def test_quantile_is_the_ceil_n_plus_1_level_th_smallest_score():
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.arange(1.0, 10.0))[:, None]          # 9 scores: 1..9
    q = conformal_quantiles(scores, levels=(0.5, 0.8, 0.9, 0.95))
    expected = [math.ceil(10 * level) for level in (0.5, 0.8, 0.9)]   # the k-th smallest of 1..9 is k
    np.testing.assert_array_equal(q[:3, 0], expected)
    assert q[3, 0] == np.inf                                           # ceil(10 * 0.95) = 10 > 9 scores


def _heteroscedastic(n, rng, n_genes=3):
    """Truth = signal + noise whose known scale varies by spot; a perfect model predicts the signal."""
    signal = rng.normal(size=(n, n_genes))
    scale = rng.uniform(0.1, 2.0, size=(n, n_genes))
    return signal + scale * rng.standard_normal((n, n_genes)), signal, scale


@pytest.mark.parametrize("normalised", [False, True])
def test_conformal_intervals_cover_fresh_draws_at_the_nominal_level(normalised):
    rng = np.random.default_rng(1)
    truth, pred, scale = _heteroscedastic(400, rng)
    calibration = calibrate(truth, pred, scale if normalised else None)
    assert calibration["normalised"] is normalised and calibration["n_calibration"] == 400
    fresh_truth, fresh_pred, fresh_scale = _heteroscedastic(20000, rng)
    widths = {}
    for level in (0.8, 0.9, 0.95):
        q = calibration["quantiles"][calibration["levels"].index(level)]
        half = q * (fresh_scale + calibration["eps"]) if normalised else np.broadcast_to(q, fresh_pred.shape)
        covered = np.abs(fresh_truth - fresh_pred) <= half
        assert abs(covered.mean() - level) < 0.03, (level, covered.mean())
        widths[level] = half
    if normalised:  # intervals widen where the spread is large
        assert np.corrcoef(fresh_scale.ravel(), widths[0.9].ravel())[0, 1] > 0.99
    assert (widths[0.95] >= widths[0.8]).all()


def test_calibration_skips_spots_never_held_out_and_clips_like_predictions():
    truth = np.array([[0.0], [1.0], [2.0], [3.0]])
    oof = np.array([[-5.0], [1.5], [np.nan], [3.0]])
    calibration = calibrate(truth, oof, levels=(0.5,), value_range={"min": np.array([0.0]), "max": np.array([3.0])})
    assert calibration["n_calibration"] == 3
    # scores after clipping -5 -> 0: 0, 0.5, 0; the ceil(4 * 0.5) = 2nd smallest is 0
    assert calibration["quantiles"][0, 0] == 0


# --------------------------------------------------------------------------------------------
# members' spread
# --------------------------------------------------------------------------------------------
def _bag_of_ridges(X, Y, disagreement: float) -> SeedBagged:
    """A fitted bag whose 3 members are ridges fitted on targets moved apart by ``disagreement``."""
    bag = SeedBagged(head="mlp", params={"hidden": [4], "epochs": 1, "device": "cpu"}, n_seeds=3).fit(X, Y)
    rng = np.random.default_rng(5)
    bag.members_ = [make_head("ridge").fit(X, Y + disagreement * rng.normal(size=Y.shape[1])) for _ in range(3)]
    return bag


def test_spread_is_zero_for_identical_members_and_grows_with_disagreement():
    X, Y, _ = synthetic_expression(120, 8, 5, seed=2)
    spreads = []
    for disagreement in (0.0, 0.5, 2.0):
        bag = _bag_of_ridges(X, Y, disagreement)
        mean, std = predict_with_spread(bag, X)
        np.testing.assert_allclose(mean, bag.predict(X))
        spreads.append(std.mean())
    assert spreads[0] < 1e-9 and spreads[0] < spreads[1] < spreads[2]
    assert predict_with_spread(make_head("ridge").fit(X, Y), X)[1] is None        # no members: no spread


def test_spread_is_in_the_targets_scale_behind_a_transform():
    X, Y, _ = synthetic_expression(120, 8, 5, seed=3)
    model = TargetTransformed(make_head("bagged", head="mlp", params={"hidden": [8], "epochs": 3, "device": "cpu"},
                                        n_seeds=3), "log1p").fit(X, Y)
    mean, std = predict_with_spread(model, X)
    np.testing.assert_allclose(mean, model.predict(X), rtol=1e-6)
    members = np.stack([np.expm1(m.predict(X)) for m in model.head_.members_])
    np.testing.assert_allclose(std, members.std(axis=0), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# fitted models: recorded range, clipping, old models
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ridge_model(tmp_path_factory):
    X, Y, groups = synthetic_expression(300, 16, 6, groups=3, seed=4)
    out = tmp_path_factory.mktemp("ridge") / "model"
    fit_head(X, Y, [f"g{i}" for i in range(6)], head="ridge", folds=3, groups=groups, out_dir=out, feature_meta={},
             progress=False, n_jobs=1)
    return out, X, Y


def test_fit_records_the_training_range_and_per_gene_quantiles(ridge_model):
    out, X, Y = ridge_model
    fitted = load_model(out)
    np.testing.assert_array_equal(fitted.extra[RANGE_KEY]["min"], Y.min(axis=0))
    np.testing.assert_array_equal(fitted.extra[RANGE_KEY]["max"], Y.max(axis=0))
    calibration = fitted.extra[CONFORMAL_KEY]
    assert calibration["quantiles"].shape == (len(calibration["levels"]), 6) and not calibration["normalised"]
    assert (np.diff(calibration["quantiles"], axis=0) >= 0).all()        # wider for higher coverage


def test_clipping_respects_the_recorded_range_and_raw_returns_raw_values(ridge_model):
    out, X, Y = ridge_model
    fitted = load_model(out)
    far = X * 8.0                                                         # extrapolates out of the range
    raw = fitted.predict(far)
    lo, hi = Y.min(axis=0), Y.max(axis=0)
    assert ((raw < lo) | (raw > hi)).any()
    clipped = predict_uncertain(fitted, far)
    assert clipped.clipped and (clipped.mean >= lo).all() and (clipped.mean <= hi).all()
    np.testing.assert_array_equal(clipped.mean, np.clip(raw, lo, hi))
    assert (clipped.lower <= clipped.mean).all() and (clipped.mean <= clipped.upper).all()
    assert (clipped.lower >= lo).all() and (clipped.upper <= hi).all()
    unclipped = predict_uncertain(fitted, far, clip=False)
    assert not unclipped.clipped
    np.testing.assert_array_equal(unclipped.mean, raw)


def test_a_model_saved_without_ranges_predicts_raw_with_a_warning(ridge_model, tmp_path):
    out, X, _ = ridge_model
    old = load_model(out)
    old.extra = {}                                                        # what models fitted before this change hold
    old.save(tmp_path)
    old = load_model(tmp_path)
    with pytest.warns(UncertaintyWarning) as caught:
        result = predict_uncertain(old, X * 8.0)
    messages = " ".join(str(w.message) for w in caught)
    assert "not clipped" in messages and "no prediction intervals" in messages
    np.testing.assert_array_equal(result.mean, old.predict(X * 8.0))
    assert result.lower is None and result.upper is None and not result.clipped


# --------------------------------------------------------------------------------------------
# command line: h5ad layers, --raw, bad --interval
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bagged_cli_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train = write_challenge_dataset(root / "train", n=20, n_genes=4, groups=2)
    test = write_challenge_dataset(root / "test", n=10, n_genes=4, seed=1, with_targets=False)
    r = runner.invoke(app, ["fit-head", str(train), "-b", TINY_BACKBONE, "--head", "mlp", "--bag", "2",
                            "-p", "hidden=[8]", "-p", "epochs=3", "-p", "val_fraction=0.25", "-p", "device=\"cpu\"", "--folds", "2",
                            "--out", str(root / "model"), "--cache-dir", str(root / "cache"), "--quiet"])
    assert r.exit_code == 0, r.output
    return root, test


def test_h5ad_holds_std_lower_upper_layers_shaped_like_the_predictions(bagged_cli_model):
    root, test = bagged_cli_model
    out = root / "pred.h5ad"
    r = runner.invoke(app, ["predict", str(root / "model"), str(test), "--out", str(out), "--interval", "0.8",
                            "--cache-dir", str(root / "cache"), "--quiet"])
    assert r.exit_code == 0, r.output
    adata = ad.read_h5ad(out)
    assert adata.shape == (10, 4)
    assert set(adata.layers) == {"std", "lower", "upper"}
    for name in ("std", "lower", "upper"):
        assert adata.layers[name].shape == adata.shape
    assert (adata.layers["std"] >= 0).all() and (adata.layers["std"] > 0).any()
    assert (adata.layers["lower"] <= adata.X + 1e-6).all() and (adata.X <= adata.layers["upper"] + 1e-6).all()
    assert adata.uns["hexpr"]["config"]["uncertainty"]["interval"] == 0.8


def test_raw_flag_gives_unclipped_values_default_is_clipped(bagged_cli_model):
    root, test = bagged_cli_model
    fitted = load_model(root / "model")
    frames = {}
    for flag in ((), ("--raw",), ("--no-clip",)):
        out = root / f"pred{''.join(flag)}.csv"
        r = runner.invoke(app, ["predict", str(root / "model"), str(test), "--out", str(out),
                                "--cache-dir", str(root / "cache"), "--quiet", *flag])
        assert r.exit_code == 0, r.output
        frames[flag] = pd.read_csv(out, index_col="ID")[fitted.genes].to_numpy()
    lo, hi = fitted.extra[RANGE_KEY]["min"], fitted.extra[RANGE_KEY]["max"]
    np.testing.assert_allclose(frames[()], np.clip(frames[("--raw",)], lo, hi), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(frames[("--raw",)], frames[("--no-clip",)])
    assert (frames[()] >= lo - 1e-6).all() and (frames[()] <= hi + 1e-6).all()


@pytest.mark.parametrize("command", ["predict", "predict-slide"])
@pytest.mark.parametrize("level", ["0", "1", "1.5"])
def test_bad_interval_is_one_error_line_before_any_work(tmp_path, command, level):
    out = tmp_path / ("pred.h5ad" if command == "predict" else "maps")
    (tmp_path / "no-model").mkdir()              # paths that exist (a missing one is reported first, by typer)
    (tmp_path / "no-data").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = runner.invoke(app, [command, str(tmp_path / "no-model"), str(tmp_path / "no-data"), "--out", str(out),
                                "--interval", level, "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--interval" in errors[0] and "Traceback" not in r.output
    assert not out.exists() and not (tmp_path / "cache").exists()
