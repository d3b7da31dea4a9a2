import json

import numpy as np
import pandas as pd
import pytest
from test_heads import synthetic_expression

from hexpr.heads import fit_head, load_model, make_folds, run_sweep
from hexpr.heads.sweep import expand_grid, make_configs, sample_configs


@pytest.fixture(scope="module")
def data():
    X, Y, groups = synthetic_expression(90, 8, 12, rank=3, n_dominant=2, noise=0.3, seed=5, groups=4)
    return X, Y, groups


def test_grid_and_random_configs():
    assert expand_grid({"a": [1, 2], "b": ["x", "y", "z"], "c": 7}) == [
        {"a": a, "b": b, "c": 7} for a in (1, 2) for b in ("x", "y", "z")]
    draws = sample_configs({"lr": {"log": [1e-4, 1e-2]}, "k": {"int": [1, 3]}, "w": ["a", "b"]}, 30, seed=1)
    assert len(draws) == 30
    assert all(1e-4 <= d["lr"] <= 1e-2 and d["k"] in (1, 2, 3) and d["w"] in ("a", "b") for d in draws)
    assert sample_configs({"a": [1, 2]}, 10) == [{"a": 1}, {"a": 2}]     # finite space: no repeats
    with pytest.raises(ValueError, match="random search"):
        expand_grid({"lr": {"log": [1e-4, 1e-2]}})
    with pytest.raises(ValueError, match="no parameter"):
        make_configs("knn", {"kk": [1]}, n_trials=None, feature_names=["f"])


def test_sweep_leaderboard_sorted_with_best_config(data):
    X, Y, _ = data
    folds = make_folds(len(X), 3, seed=0)
    result = run_sweep("knn", {"good": X, "noise": np.random.default_rng(0).standard_normal(X.shape)},
                       Y, folds, space={"k": [3, 15], "weighting": ["uniform", "softmax"]},
                       n_jobs=1, progress=False)
    board = result.leaderboard
    assert len(board) == 8 and list(board["rank"]) == list(range(1, 9))
    assert board["score"].is_monotonic_decreasing
    assert set(board["features"]) == {"good", "noise"}
    best = result.best
    assert best["features"] == "good" and best["head"] == "knn"
    assert best["params"]["k"] == board["k"].iloc[0] and best["params"]["weighting"] == board["weighting"].iloc[0]
    assert board["ratio_to_mean"].iloc[0] > 1


def test_parallel_random_sweep_over_default_space(data):
    X, Y, _ = data
    folds = make_folds(len(X), 2, seed=0)
    result = run_sweep("ridge", X, Y, folds, n_trials=3, n_jobs=2, progress=False)
    assert len(result.leaderboard) == 3 and result.leaderboard["error"].isna().all()
    assert result.best["features"] == "features"


def test_failing_config_is_reported_not_raised(data):
    X, Y, _ = data
    folds = make_folds(len(X), 2, seed=0)
    result = run_sweep("knn", X, Y, folds, space={"weighting": ["softmax", "bogus"]}, n_jobs=1, progress=False)
    board = result.leaderboard
    assert board["error"].iloc[-1].startswith("HeadError") and "weighting" in board["error"].iloc[-1] and np.isnan(board["score"].iloc[-1])
    assert result.best["params"]["weighting"] == "softmax"


def test_fit_head_end_to_end(data, tmp_path):
    X, Y, groups = data
    genes = [f"g{i}" for i in range(Y.shape[1])]
    ids = [f"spot{i}" for i in range(len(X))]
    meta = {"blocks": [{"key": "abc123", "spec": {"name": "toy"}, "start": 0, "stop": 8}], "dim": 8}
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text("k: [3, 10]\nweighting: [uniform]\ntransform: [none, minmax]\n")
    report = fit_head(X, Y, genes, head="knn", folds=3, groups=groups, seed=1, out_dir=tmp_path / "run",
                      feature_meta=meta, sweep=str(sweep_file), n_jobs=1, progress=False, ids=ids)
    run = tmp_path / "run"
    on_disk = json.loads((run / "cv_report.json").read_text())
    assert on_disk.pop("hexpr_version") and on_disk == report          # the file also records the hexpr version
    assert report["grouped"] and report["n_folds"] == 3 and report["sweep"]["n_configs"] == 4
    board = pd.read_csv(run / "leaderboard.csv")
    assert board["score"].is_monotonic_decreasing
    assert report["cv"]["score"] == pytest.approx(board["score"].iloc[0])
    oof = pd.read_csv(run / "oof_predictions.csv", index_col=0)
    assert list(oof.index) == ids and list(oof.columns) == genes
    model = load_model(run)
    assert model.genes == genes and model.feature_meta == meta and model.n_features == 8
    assert model.transform == report["transform"]
    pred = model.predict(X)
    assert pred.shape == Y.shape
    with pytest.raises(ValueError, match="expects 8 features.*abc123"):
        model.predict(X[:, :6])
    assert not list(run.glob("*.tmp"))


def test_fit_head_without_sweep_and_trials_only(data, tmp_path):
    X, Y, _ = data
    genes = [f"g{i}" for i in range(Y.shape[1])]
    report = fit_head(X, Y, genes, head="ridge", transform="log1p", folds=2, out_dir=tmp_path / "a",
                      feature_meta={}, progress=False)
    assert report["sweep"] is None and report["transform"] == "log1p"
    assert not (tmp_path / "a" / "leaderboard.csv").exists()
    assert report["cv"]["score"] > report["mean_head"]["score"]
    report = fit_head({"x1": X, "x2": X[:, :4]}, Y, genes, head="knn", folds=2, out_dir=tmp_path / "b",
                      feature_meta={"x1": {"dim": 8}, "x2": {"dim": 4}}, trials=2, n_jobs=1, progress=False)
    assert report["sweep"]["search"] == "random" and report["sweep"]["n_configs"] == 2
    assert load_model(tmp_path / "b").feature_meta == {"dim": report["n_features"]}


def test_fit_head_input_errors(data, tmp_path):
    X, Y, groups = data
    with pytest.raises(ValueError, match="gene names"):
        fit_head(X, Y, ["a"], out_dir=tmp_path, feature_meta={}, progress=False)
    with pytest.raises(ValueError, match="only 4 groups"):
        fit_head(X, Y, [f"g{i}" for i in range(12)], folds=6, groups=groups, out_dir=tmp_path,
                 feature_meta={}, progress=False)


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", ["oof", "model", "report"])
def test_interrupted_fit_leaves_the_existing_model_folder_as_it_was(data, tmp_path, monkeypatch, stage):
    import hexpr.heads.fitting as fitting_module

    X, Y, _ = data
    genes = [f"g{i}" for i in range(Y.shape[1])]
    run = tmp_path / "run"
    fit_head(X, Y, genes, head="ridge", folds=2, out_dir=run, feature_meta={}, progress=False)
    before = _snapshot(run)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    # Ctrl-C after the out-of-fold predictions, while saving the model, or at the last file (report)
    target = {"oof": "cross_validate", "model": "write_folder", "report": "write_json"}[stage]
    if stage == "report":
        real = fitting_module.write_json
        monkeypatch.setattr(fitting_module, "write_json",
                            lambda path, obj: interrupt() if path.name == "cv_report.json" else real(path, obj))
    else:
        monkeypatch.setattr(fitting_module, target, interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit_head(X, Y, genes, head="knn", folds=2, out_dir=run, feature_meta={}, trials=2, n_jobs=1, progress=False)
    assert _snapshot(run) == before                       # not one new or changed file (no leaderboard)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # and no temporary folder left beside it


def test_fit_head_never_replaces_a_folder_that_holds_no_model(data, tmp_path):
    X, Y, _ = data
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="holds no fitted model"):
        fit_head(X, Y, [f"g{i}" for i in range(Y.shape[1])], head="ridge", folds=2, out_dir=tmp_path / "mine",
                 feature_meta={}, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
