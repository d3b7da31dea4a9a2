"""Seed bagging (``bagged`` head, ``fit-head --bag``) and ``fit-head --head auto``."""
import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_BACKBONE, write_challenge_dataset
from test_heads import synthetic_expression
from typer.testing import CliRunner

from hexpr.heads.model_files import load_head, save_head
from hexpr.heads import make_head
from hexpr.heads.base import HeadError
from hexpr.heads.fitting import fit_head, load_model
from hexpr.heads.sweep import auto_candidates, model_factory
from hexpr.pipeline import app

runner = CliRunner()
FAST_MLP = {"hidden": [16], "epochs": 15, "lr": 3e-3, "device": "cpu", "n_threads": 1}


@pytest.fixture(scope="module")
def data():
    X, Y, _ = synthetic_expression(160, 10, 12, rank=3, n_dominant=2, noise=0.5, seed=3)
    return X[:120], Y[:120], X[120:]


def test_bagged_head_is_the_mean_of_its_seeded_members_and_steadier_than_one_seed(data):
    X, Y, X_test = data
    bag = make_head("bagged", head="mlp", params=FAST_MLP, n_seeds=3, seed=4).fit(X, Y)
    members = [make_head("mlp", **FAST_MLP, seed=s).fit(X, Y).predict(X_test) for s in (4, 5, 6)]
    assert bag.seeds_ == [4, 5, 6]
    np.testing.assert_allclose(bag.predict(X_test), np.mean(members, axis=0), rtol=1e-12, atol=1e-12)
    # two disjoint bags disagree less than two single seeds do
    singles = [make_head("mlp", **FAST_MLP, seed=s).fit(X, Y).predict(X_test) for s in range(6)]
    single_spread = np.mean([np.abs(singles[i] - singles[j]).mean() for i in range(6) for j in range(i + 1, 6)])
    bag_spread = np.abs(np.mean(singles[:3], axis=0) - np.mean(singles[3:], axis=0)).mean()
    assert bag_spread < 0.8 * single_spread


def test_bagged_head_round_trips_and_fit_head_bag_saves_it(data, tmp_path):
    X, Y, X_test = data
    bag = make_head("bagged", head="mlp", params=FAST_MLP, n_seeds=2).fit(X, Y)
    save_head(bag, tmp_path / "bag")
    np.testing.assert_array_equal(load_head(tmp_path / "bag").predict(X_test), bag.predict(X_test))
    genes = [f"g{i}" for i in range(Y.shape[1])]
    report = fit_head(X, Y, genes, head="mlp", params={**FAST_MLP, "seed": 7}, bag=3, folds=2, out_dir=tmp_path / "m",
                      feature_meta={}, progress=False)
    assert report["head"] == "bagged" and report["params"]["n_seeds"] == 3 and report["params"]["seed"] == 7
    fitted = load_model(tmp_path / "m")
    assert fitted.config["params"]["head"] == "mlp" and "seed" not in fitted.config["params"]["params"]
    assert [m.seed for m in fitted.model.head_.members_] == [7, 8, 9]
    assert json.loads((tmp_path / "m" / "model.json").read_text())["config"]["head"] == "bagged"


def test_bad_bags_are_clear_errors():
    with pytest.raises(HeadError, match="head must be the name of a head whose fit depends on its seed"):
        make_head("bagged", head="ridge")
    with pytest.raises(HeadError, match="without seed"):
        make_head("bagged", params={"seed": 1})
    with pytest.raises(HeadError, match="epochs=0 is not accepted"):
        make_head("bagged", params={"epochs": 0}).fit(np.ones((4, 2)), np.ones((4, 2)))


def test_auto_candidates_share_params_out_to_the_heads_that_have_them():
    configs = auto_candidates(["plain", "k6"], params={"epochs": 5, "alphas": [1.0]}, transform="log1p", seed=2)
    assert [c["recipe"] for c in configs] == ["ridge on plain", "mlp bag5 on plain", "ridge on k6", "mlp bag5 on k6"]
    ridge, mlp = configs[0], configs[1]
    assert ridge["params"] == {"alphas": [1.0]} and ridge["transform"] == "log1p"
    assert mlp["head"] == "bagged" and mlp["params"] == {"head": "mlp", "params": {"epochs": 5}, "n_seeds": 5, "seed": 2}
    assert auto_candidates(["plain"], bag=1)[1]["head"] == "mlp"
    with pytest.raises(HeadError, match="none has parameter"):
        auto_candidates(["plain"], params={"alhpa": 1})
    with pytest.raises(HeadError, match="epochs=0 is not accepted"):
        auto_candidates(["plain"], params={"epochs": 0})


def test_auto_scores_every_candidate_on_grouped_folds_and_refits_the_best(data, tmp_path, monkeypatch):
    import hexpr.heads.fitting as fitting_module

    X, Y, X_test = data
    groups = np.repeat(["a", "b", "c", "d"], 30)
    seen = {}
    original = fitting_module.score_configs
    original_cv = fitting_module.cross_validate

    def spy(configs, features, Y, folds, **kwargs):
        seen["folds"], seen["n"] = folds, len(configs)
        return original(configs, features, Y, folds, **kwargs)

    monkeypatch.setattr(fitting_module, "score_configs", spy)
    reruns = []
    monkeypatch.setattr(fitting_module, "cross_validate", lambda *a, **k: reruns.append(k) or original_cv(*a, **k))
    X_sets = {"plain": X, "k6": np.hstack([X, X[::-1]])}
    report = fit_head(X_sets, Y, [f"g{i}" for i in range(Y.shape[1])], head="auto", params=FAST_MLP, bag=2, folds=4,
                      groups=groups, out_dir=tmp_path / "m", feature_meta={"plain": {"neighbours": 0}, "k6": {"neighbours": 6}},
                      progress=False, n_jobs=1)
    # grouped folds: a group is never on both sides of a split
    assert seen["n"] == 6 and len(seen["folds"]) == 4   # with groups: ridge within slides too
    for train, test in seen["folds"]:
        assert not set(groups[train]) & set(groups[test])
    board = pd.read_csv(tmp_path / "m" / "leaderboard.csv")
    recipes = [f"{head} on {s}" for s in ("plain", "k6") for head in
               ("ridge", "ridge within slides", "mlp bag2", "ridge + mlp bag2", "ridge within slides + mlp bag2")]
    assert sorted(board["recipe"]) == sorted(recipes)
    assert board["score"].is_monotonic_decreasing and board["error"].isna().all()
    assert report["auto"]["n_candidates"] == 6 and report["auto"]["n_blends"] == 4
    within = json.loads(board.loc[board["recipe"] == "ridge within slides + mlp bag2 on k6", "config"].iloc[0])
    assert within["params"]["members"][0]["params"]["within_groups"] is True
    # a blend is scored from its members' out-of-fold predictions: the same score as cross-validating
    # the fixed-weight ensemble of the two from scratch on the same folds
    blend = json.loads(board.loc[board["recipe"] == "ridge + mlp bag2 on k6", "config"].iloc[0])
    assert blend["head"] == "ensemble" and blend["params"]["weights"] == [1.0, 1.0]
    fresh = original_cv(model_factory(blend["head"], blend["params"], blend["transform"]), X_sets["k6"], Y,
                        seen["folds"], groups=groups)
    assert board.loc[board["recipe"] == "ridge + mlp bag2 on k6", "score"].iloc[0] == pytest.approx(
        fresh.report["model"]["score"], rel=1e-5)
    assert report["auto"]["chosen"] == board["recipe"].iloc[0]
    # the winner's CV (score, out-of-fold predictions) comes from the candidate scoring, not a rerun
    assert reruns == []
    assert report["cv"]["score"] == pytest.approx(board["score"].iloc[0])
    assert not pd.read_csv(tmp_path / "m" / "oof_predictions.csv", index_col=0).isna().any().any()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(
        ["config.json", "cv_report.json", "leaderboard.csv", "model.json", "model.safetensors", "oof_predictions.csv"])
    fitted = load_model(tmp_path / "m")
    assert fitted.config["recipe"] == board["recipe"].iloc[0]
    assert fitted.feature_meta == {"neighbours": 6 if "k6" in fitted.config["recipe"] else 0}
    assert fitted.n_features == X_sets[fitted.config["features"]].shape[1]


def test_a_blend_refits_as_the_fixed_weight_mean_of_its_members_and_reloads(data, tmp_path):
    X, Y, X_test = data
    groups = np.repeat(["a", "b", "c"], 40)
    mlp = {"head": "bagged", "params": {"head": "mlp", "params": FAST_MLP, "n_seeds": 2, "seed": 0}}
    blend = make_head("ensemble", members=[{"head": "ridge", "params": {}}, mlp], weights=[1.0, 1.0]).fit(X, Y, groups=groups)
    ridge = make_head("ridge").fit(X, Y, groups=groups)
    bagged = make_head(mlp["head"], **mlp["params"]).fit(X, Y)
    np.testing.assert_allclose(blend.weights_, [0.5, 0.5])
    np.testing.assert_allclose(blend.predict(X_test), (ridge.predict(X_test) + bagged.predict(X_test)) / 2, rtol=1e-6, atol=1e-6)
    save_head(blend, tmp_path / "blend")
    np.testing.assert_array_equal(load_head(tmp_path / "blend").predict(X_test), blend.predict(X_test))
    with pytest.raises(ValueError, match="one per member"):
        make_head("ensemble", members=["ridge", "mean"], weights=[1.0]).fit(X, Y)


def _with_coords(csv):
    frame = pd.read_csv(csv)
    frame["x"] = (np.arange(len(frame)) % 6) * 100.0
    frame["y"] = (np.arange(len(frame)) // 6) * 100.0
    frame.to_csv(csv, index=False)
    return csv


def test_cli_fit_head_auto_end_to_end(tmp_path):
    train = _with_coords(write_challenge_dataset(tmp_path / "train", n=36, n_genes=4, groups=3))
    model, cache = tmp_path / "model", tmp_path / "cache"
    r = runner.invoke(app, ["fit-head", str(train), "--head", "auto", "-b", TINY_BACKBONE, "-p", "epochs=5", "-p", "hidden=[8]",
                            "--bag", "2", "--jobs", "1", "--out", str(model), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "auto chose" in r.output and "grouped" in r.output
    board = pd.read_csv(model / "leaderboard.csv")
    # on plain and k6: ridge, ridge within slides (3 slides), mlp, and each ridge blended with the mlp
    assert len(board) == 10 and set(board["features"]) == {"plain", "k6"}
    assert {"ridge within slides on k6", "ridge within slides + mlp bag2 on k6", "ridge + mlp bag2 on k6"} <= set(board["recipe"])
    report = json.loads((model / "cv_report.json").read_text())
    assert report["auto"]["chosen"] == board["recipe"].iloc[0]
    assert report["auto"]["chosen"] in " ".join(r.output.split())
    info = json.loads((model / "model.json").read_text())
    assert info["feature_meta"]["neighbours"] == (6 if "k6" in report["auto"]["chosen"] else 0)
    assert info["feature_meta"]["slide_centred"] is False   # auto centres no features; its within-slides ridge needs none
    assert "patch" in info["feature_meta"]  # what predict-slide reads
    r = runner.invoke(app, ["predict", str(model), str(train), "--out", str(tmp_path / "p.csv"), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    assert pd.read_csv(tmp_path / "p.csv").shape == (36, 5)


def test_cli_auto_without_coordinates_tries_plain_features_only_and_predicts(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=24, n_genes=4)
    model, cache = tmp_path / "model", tmp_path / "cache"
    args = ["fit-head", str(train), "--head", "auto", "-b", TINY_BACKBONE, "-p", "epochs=3", "-p", "hidden=[8]", "--bag", "2",
            "--folds", "3", "--jobs", "1", "--out", str(model), "--cache-dir", str(cache), "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "no spot coordinates" in " ".join(r.output.split())
    assert set(pd.read_csv(model / "leaderboard.csv")["features"]) == {"plain"}
    assert json.loads((model / "model.json").read_text())["feature_meta"]["neighbours"] == 0
    r = runner.invoke(app, args)  # refit into the same folder: the same backbones, so no replacement warning
    assert r.exit_code == 0 and "will be replaced" not in r.output, r.output
    r = runner.invoke(app, ["predict", str(model), str(train), "--out", str(tmp_path / "p.csv"), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, message", [
    (["--head", "mlp", "--bag", "0"], "--bag must be a number of seeds >= 1"),
    (["--head", "ridge", "--bag", "3"], "head 'ridge' is deterministic"),
    (["--head", "mlp", "--bag", "3", "-p", "epochs=0"], "epochs=0 is not accepted"),
    (["--head", "auto", "--bag", "0"], "--bag must be a number of seeds >= 1"),
    (["--head", "auto", "-p", "alhpa=1"], "none has parameter(s) alhpa"),
    (["--head", "auto", "-p", "epochs=0"], "epochs=0 is not accepted"),
    (["--head", "auto", "--trials", "3"], "head 'auto' runs its own small search"),
    (["--head", "auto", "--sweep-backbones"], "do not combine"),
])
def test_bad_bag_and_auto_options_fail_before_embedding(tmp_path, args, message):
    train = write_challenge_dataset(tmp_path / "train", n=10)
    r = runner.invoke(app, ["fit-head", str(train), "-b", TINY_BACKBONE, *args, "--out", str(tmp_path / "model"),
                            "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert r.output.count("Error:") == 1 and "Traceback" not in r.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "model").exists()
