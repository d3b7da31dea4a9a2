"""--centre-slides: each slide's mean embedding is subtracted from its spots, at fit and at predict time."""
import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_BACKBONE, write_challenge_dataset
from typer.testing import CliRunner

from hexpr.embedder.backbones import parse_backbone
from hexpr.embedder.datasets import open_dataset
from hexpr.embedder.features import MIN_CENTRING_ROWS, FeatureSet, centre_per_slide, ensure_features
from hexpr.heads.finetune import FinetuneError, _load_head_init
from hexpr.pipeline import app
from hexpr.workflow.fit import fit_head
from hexpr.workflow.prediction import load_predictor, predict

runner = CliRunner()
EMBED = {"progress": False, "num_workers": 0}


def _features(X) -> FeatureSet:
    return FeatureSet([f"s{i}" for i in range(len(X))], X,
                      [{"key": "k", "spec": {"name": "m"}, "identity": {}, "start": 0, "stop": X.shape[1]}])


def test_each_slide_loses_its_own_mean():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 5)).astype(np.float32) + np.repeat(rng.normal(0, 5, (3, 5)), 30, axis=0).astype(np.float32)
    groups = np.repeat(["a", "b", "c"], 30)
    out = centre_per_slide(_features(X), groups)
    expected = X - pd.DataFrame(X).groupby(groups).transform("mean").to_numpy()
    np.testing.assert_allclose(out.X, expected, atol=1e-5)
    assert out.ids == [f"s{i}" for i in range(90)] and out.blocks[0]["stop"] == 5 and out.warnings == []
    np.testing.assert_allclose(centre_per_slide(_features(X), None).X, X - X.mean(axis=0), atol=1e-4)  # no groups: one slide
    few = centre_per_slide(_features(X[:MIN_CENTRING_ROWS - 1]), None)
    assert len(few.warnings) == 1 and f"fewer than {MIN_CENTRING_ROWS} spots" in few.warnings[0]


@pytest.fixture(scope="module")
def centred_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("centring")
    train = write_challenge_dataset(root / "train", n=24, n_genes=4, groups=3)
    model = root / "model"
    fit_head(train, [parse_backbone(TINY_BACKBONE)], head="ridge", folds=3, centre_slides=True, out_dir=model,
             cache_dir=root / "cache", n_jobs=1, **EMBED)
    return {"root": root, "model": model, "cache": root / "cache"}


def test_the_model_records_centring_and_its_card_says_so(centred_model):
    info = json.loads((centred_model["model"] / "model.json").read_text())
    assert info["feature_meta"]["slide_centred"] is True
    assert "slide centring: yes" in (centred_model["model"] / "README.md").read_text()


def test_predict_centres_each_new_slide_by_its_own_mean(centred_model):
    root = centred_model["root"]
    test = write_challenge_dataset(root / "test", n=12, groups=2, seed=3, with_targets=False)
    with pytest.warns(UserWarning, match="fewer than 30 spots"):
        result = predict(centred_model["model"], test, out=root / "both.csv", cache_dir=centred_model["cache"],
                         clip=False, **EMBED)
    both = pd.read_csv(result["out"], index_col="ID")
    # the same spots, by hand: cached features minus their slide's mean, through the fitted head
    dataset = open_dataset(test)
    model = load_predictor(centred_model["model"])
    X = ensure_features(dataset, [parse_backbone(TINY_BACKBONE)], centred_model["cache"], **EMBED).X
    slides = pd.read_csv(test)["group"].to_numpy()
    by_hand = model.predict(X - pd.DataFrame(X).groupby(slides).transform("mean").to_numpy())
    np.testing.assert_allclose(both.loc[dataset.ids].to_numpy(), by_hand, rtol=1e-4, atol=1e-4)
    pooled = model.predict(X - X.mean(axis=0))   # one mean for both slides: not what predict does
    assert np.abs(both.loc[dataset.ids].to_numpy() - pooled).max() > 1e-3
    # one slide alone gets the same predictions as with the other slide beside it
    one = pd.read_csv(test)
    one[one["group"] == "slide0"].to_csv(root / "test" / "one.csv", index=False)
    with pytest.warns(UserWarning, match="fewer than 30 spots"):
        alone = pd.read_csv(predict(centred_model["model"], root / "test" / "one.csv", out=root / "one_pred.csv",
                                    cache_dir=centred_model["cache"], clip=False, **EMBED)["out"], index_col="ID")
    np.testing.assert_allclose(alone.to_numpy(), both.loc[alone.index].to_numpy(), rtol=1e-4, atol=1e-4)


def test_cli_flag_and_finetune_refusal(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=40, groups=2)
    model = tmp_path / "mlp"
    r = runner.invoke(app, ["fit-head", str(train), "-b", TINY_BACKBONE, "--head", "mlp", "-p", "epochs=2", "-p", "hidden=[8]",
                            "--folds", "2", "--centre-slides", "--out", str(model), "--cache-dir", str(tmp_path / "cache"),
                            "--quiet", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert json.loads((model / "model.json").read_text())["feature_meta"]["slide_centred"] is True
    with pytest.raises(FinetuneError, match="slide-centred features"):
        _load_head_init(model, [parse_backbone(TINY_BACKBONE)])


def _slides_with_offsets(seed=0, n_slides=4, per_slide=40, n_features=12, n_genes=5):
    """Features centred per slide; targets = a linear signal + a large per-slide offset the features cannot see."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_slides), per_slide)
    X = rng.normal(size=(len(groups), n_features))
    X -= pd.DataFrame(X).groupby(groups).transform("mean").to_numpy()
    W = rng.normal(size=(n_features, n_genes))
    Y = X @ W * 0.3 + rng.normal(0, 5, (n_slides, n_genes))[groups] + rng.normal(0, 1, (len(groups), n_genes))
    return X, Y, groups


def test_ridge_within_groups_keeps_the_coefficients_of_centred_features():
    from hexpr.heads.base import make_head

    X, Y, groups = _slides_with_offsets()
    plain = make_head("ridge", alphas=[3.0], alpha_selection="gcv").fit(X, Y, groups=groups)
    within = make_head("ridge", alphas=[3.0], alpha_selection="gcv", within_groups=True).fit(X, Y, groups=groups)
    np.testing.assert_allclose(within.coef_, plain.coef_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(within.intercept_, Y.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(within.predict(X), plain.predict(X), rtol=1e-8, atol=1e-8)


def test_ridge_within_groups_chooses_alpha_on_within_slide_variation():
    """GCV on the targets with each slide's mean replaced by the overall mean, as scikit-learn's RidgeCV
    computes it (per gene) on standardized features."""
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    from hexpr.heads.base import make_head

    X, Y, groups = _slides_with_offsets(seed=1)
    alphas = list(np.logspace(-2, 4, 13))
    head = make_head("ridge", alphas=alphas, alpha_selection="gcv", within_groups=True).fit(X, Y, groups=groups)
    within = Y - pd.DataFrame(Y).groupby(groups).transform("mean").to_numpy() + Y.mean(axis=0)
    reference = RidgeCV(alphas=alphas, alpha_per_target=True).fit(StandardScaler().fit_transform(X), within)
    np.testing.assert_allclose(head.alpha_, reference.alpha_)
    ignored = make_head("ridge", alphas=alphas, alpha_selection="gcv").fit(X, Y, groups=groups)
    assert (ignored.alpha_ > head.alpha_).any()   # the slides' offsets, counted as error, push the penalty up


def test_ridge_within_groups_is_the_fixed_effects_fit():
    """On raw features, ridge within groups learns the coefficients of a fit on slide-centred features:
    within each slide its predictions differ from that fit's by one constant per gene."""
    from hexpr.heads.base import make_head

    X, Y, groups = _slides_with_offsets(seed=2)
    shifted = X + np.random.default_rng(3).normal(0, 4, (4, X.shape[1]))[groups]   # each slide shifted alike
    within = make_head("ridge", alphas=[3.0], within_groups=True).fit(shifted, Y, groups=groups)
    centred = make_head("ridge", alphas=[3.0], within_groups=True).fit(X, Y, groups=groups)
    np.testing.assert_allclose(within.coef_, centred.coef_, rtol=1e-6, atol=1e-9)
    gap = within.predict(shifted) - centred.predict(X)
    for g in range(4):
        np.testing.assert_allclose(gap[groups == g], np.broadcast_to(gap[groups == g][0], gap[groups == g].shape),
                                   atol=1e-8)
    plain = make_head("ridge", alphas=[3.0]).fit(shifted, Y, groups=groups)   # learns the slides' shifts too
    assert np.abs(plain.predict(shifted) - within.predict(shifted)).max() > 1e-2


def test_auto_with_centre_slides_centres_every_feature_set(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=36, groups=3)
    model = tmp_path / "auto"
    r = runner.invoke(app, ["fit-head", str(train), "-b", TINY_BACKBONE, "--head", "auto", "--centre-slides", "--bag", "2",
                            "-p", "epochs=2", "-p", "hidden=[8]", "--jobs", "1", "--out", str(model),
                            "--cache-dir", str(tmp_path / "cache"), "--quiet", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert json.loads((model / "model.json").read_text())["feature_meta"]["slide_centred"] is True
    assert "ridge within slides on plain" in set(pd.read_csv(model / "leaderboard.csv")["recipe"])
