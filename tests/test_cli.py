"""The hexpr command end to end: demo, fit-head -> predict -> evaluate, refusals and clean errors."""
import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_BACKBONE, write_challenge_dataset
from typer.testing import CliRunner

from hexpr.pipeline import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    result = run("demo", "--workdir", work, "--n-train", 60, "--n-test", 20, "--n-genes", 12, "--size", 48,
                 "-b", "resnet18:size=48", "--folds", 3, "--quiet")
    assert result.exit_code == 0, result.output
    return work, result.output


def test_demo_end_to_end_beats_training_mean(demo_run):
    work, output = demo_run
    assert "random init" in output and "training mean" in output
    assert output.count("random init") == 1 and "randomly initialised" not in output     # said once, in the NOTE
    scores = json.loads((work / "predictions.scores.json").read_text())
    truth = pd.read_csv(work / "data" / "test_truth.csv")
    pred = pd.read_csv(work / "predictions.csv")
    assert list(pred["ID"]) == list(pd.read_csv(work / "data" / "sample_submission.csv")["ID"])
    assert list(pred.columns) == list(truth.columns)
    # the planted image signal is learnable: the head beats the training-mean profile on held-out spots
    from hexpr.workflow.expression_tables import evaluate_tables

    mean_profile = pd.read_csv(work / "data" / "train.csv").drop(columns=["ID", "path", "group"]).mean()
    truth = truth.set_index("ID")
    floor = pd.DataFrame(np.tile(mean_profile.to_numpy(), (len(truth), 1)), index=truth.index, columns=truth.columns)
    baseline, _ = evaluate_tables(floor, truth)
    assert scores["score"] > baseline["score"] + 0.1
    assert scores["hvg_corr"] > 0.1


def test_fit_head_predict_evaluate_with_template_order(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=30, n_genes=4, groups=3)
    test = write_challenge_dataset(tmp_path / "test", n=8, n_genes=4, with_targets=False, seed=5)
    pd.DataFrame({"ID": [f"spot{i}" for i in range(8)][::-1], "G3": 0, "G1": 0, "G0": 0, "G2": 0}).to_csv(
        tmp_path / "test" / "sample_submission.csv", index=False)
    model_dir, cache = tmp_path / "model", tmp_path / "cache"
    r = run("fit-head", train, "--head", "ridge", "-b", TINY_BACKBONE, "--folds", 3, "--out", model_dir, "--cache-dir", cache, "--quiet")
    assert r.exit_code == 0, r.output
    assert "mean head" in r.output and "grouped" in r.output
    oof = pd.read_csv(model_dir / "oof_predictions.csv")
    assert len(oof) == 30
    r = run("predict", model_dir, test, "--out", tmp_path / "sub.csv", "--cache-dir", cache, "--quiet")
    assert r.exit_code == 0, r.output
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert list(sub.columns) == ["ID", "G3", "G1", "G0", "G2"]
    assert sorted(sub["ID"]) == sorted(f"spot{i}" for i in range(8))
    r = run("evaluate", model_dir / "oof_predictions.csv", train, "--n-top", 2)
    assert r.exit_code == 0, r.output
    report = json.loads((model_dir / "oof_predictions.scores.json").read_text())
    assert report["n_spots"] == 30 and 0 <= report["score"] <= 1
    per_gene = pd.read_csv(model_dir / "oof_predictions.per_gene.csv")
    assert set(per_gene["gene"]) == {"G0", "G1", "G2", "G3"}


def test_predict_writes_anndata(tmp_path):
    import anndata

    train = write_challenge_dataset(tmp_path / "train", n=20, n_genes=3)
    model_dir, cache = tmp_path / "model", tmp_path / "cache"
    assert run("fit-head", train, "-b", TINY_BACKBONE, "--folds", 2, "--out", model_dir, "--cache-dir", cache, "--quiet").exit_code == 0
    r = run("predict", model_dir, train, "--out", tmp_path / "pred.h5ad", "--cache-dir", cache, "--quiet")
    assert r.exit_code == 0, r.output
    adata = anndata.read_h5ad(tmp_path / "pred.h5ad")
    assert adata.shape == (20, 3) and list(adata.obs_names[:2]) == ["spot0", "spot1"]
    assert adata.uns["hexpr"]["feature_meta"]["backbones"]["0"]["name"] == "resnet18"


def test_predict_refuses_features_from_other_weights(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), weights)
    train = write_challenge_dataset(tmp_path / "train", n=16, n_genes=3)
    model_dir, cache = tmp_path / "model", tmp_path / "cache"
    spec = f"resnet18:weights={weights},size=48"
    assert run("fit-head", train, "-b", spec, "--folds", 2, "--out", model_dir, "--cache-dir", cache, "--quiet").exit_code == 0
    torch.manual_seed(99)
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), weights)  # same path, other weights
    r = run("predict", model_dir, train, "--out", tmp_path / "p.csv", "--cache-dir", cache, "--quiet")
    assert r.exit_code == 2
    assert "fitted on features from" in r.output and not (tmp_path / "p.csv").exists()


def test_bad_input_exits_2_with_message_and_writes_nothing(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=10)
    frame = pd.read_csv(train)
    frame.loc[3, "G0"] = np.nan
    frame.to_csv(train, index=False)
    r = run("fit-head", train, "-b", TINY_BACKBONE, "--out", tmp_path / "model", "--cache-dir", tmp_path / "cache", "--quiet")
    assert r.exit_code == 2
    assert "line 5, column 'G0'" in r.output
    assert not (tmp_path / "model").exists() and not (tmp_path / "cache").exists()


def test_test_data_cannot_train(tmp_path):
    test = write_challenge_dataset(tmp_path / "t", n=5, with_targets=False)
    r = run("fit-head", test, "-b", TINY_BACKBONE, "--cache-dir", tmp_path / "cache", "--quiet")
    assert r.exit_code == 2 and "needs training data" in r.output


def test_sweep_backbones_ranks_each_backbone_and_their_concatenation(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=24, n_genes=3)
    model_dir = tmp_path / "model"
    r = run("fit-head", train, "-b", "test_resnet:weights=none,size=32", "-b", "resnet18:weights=none,size=32",
            "--sweep-backbones", "--folds", 2, "--jobs", 1, "--out", model_dir, "--cache-dir", tmp_path / "cache", "--quiet")
    assert r.exit_code == 0, r.output
    board = pd.read_csv(model_dir / "leaderboard.csv")
    assert set(board["features"]) == {"test_resnet", "resnet18", "test_resnet+resnet18"}
    assert board["score"].is_monotonic_decreasing
    best = json.loads((model_dir / "cv_report.json").read_text())["features"]
    assert best == board["features"].iloc[0]
    r = run("predict", model_dir, train, "--out", tmp_path / "p.csv", "--cache-dir", tmp_path / "cache", "--quiet")
    assert r.exit_code == 0, r.output  # the saved model asks only for the backbones of the winning set


def test_finetune_command_exports_a_model_predict_uses(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=16, n_genes=3, size=32)
    out_dir = tmp_path / "ft"
    r = run("finetune", train, "-b", "test_resnet:weights=none,size=32", "--out", out_dir, "--epochs", 2,
            "--batch-size", 8, "--folds", 4, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    assert "epoch   1" in r.output and "best epoch" in r.output
    card = (out_dir / "README.md").read_text()          # the model card, as fit-head writes one
    assert "library_name: hexpr" in card and f"hexpr predict-slide {out_dir} SLIDE.svs" in card and "test_resnet" in card
    r = run("predict", out_dir, train, "--out", tmp_path / "p.csv", "--quiet")
    assert r.exit_code == 0, r.output
    pred = pd.read_csv(tmp_path / "p.csv")
    assert list(pred.columns) == ["ID", "G0", "G1", "G2"] and len(pred) == 16
    r = run("finetune", train, "-b", "test_resnet:weights=none,size=32", "--out", out_dir, "--epochs", 2, "--quiet")
    assert r.exit_code == 2  # an existing run is never overwritten silently (use --resume)


def test_finetune_without_validation_fold_says_so(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=12, n_genes=3, size=32)
    r = run("finetune", train, "-b", "test_resnet:weights=none,size=32", "--out", tmp_path / "ft", "--epochs", 1,
            "--val-fold", -1, "--batch-size", 8, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    assert "nan" not in r.output
    assert "epoch   1" in r.output and "no validation fold" in r.output
    assert "no validation fold: exported the last epoch (1)" in " ".join(r.output.split())


@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "lr=-1.0 is not accepted; lr must be a number > 0"),
    (["--epochs", "-2"], "epochs must be an integer >= 0"),
    (["--val-fold", "5", "--folds", "5"], "val_fold must be between 0 and 4"),
    (["--patience", "0"], "patience must be null or an integer >= 1"),
])
def test_bad_finetune_options_fail_before_anything_is_written(tmp_path, args, message):
    train = write_challenge_dataset(tmp_path / "train", n=10, size=32)
    r = run("finetune", train, "-b", "test_resnet:weights=none,size=32", "--out", tmp_path / "ft", *args, "--quiet")
    assert r.exit_code == 2 and message in " ".join(r.output.split())
    assert r.output.count("Error:") == 1 and not (tmp_path / "ft").exists()


def test_finetune_from_a_gene_panel_head_trains_that_panel(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=40, n_genes=5, size=32)
    spec = "test_resnet:weights=none,size=32"
    head_dir, out_dir = tmp_path / "mlp", tmp_path / "ft"
    r = run("fit-head", train, "--head", "mlp", "-b", spec, "--genes", "hvg:2", "-p", "epochs=3", "-p", "hidden=[8]", "-p", "val_fraction=0.25",
            "--folds", 2, "--quiet", "--out", head_dir, "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    r = run("finetune", train, "-b", spec, "--head-init", head_dir, "--out", out_dir, "--epochs", 1,
            "--batch-size", 8, "--folds", 4, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    r = run("predict", out_dir, train, "--out", tmp_path / "p.csv", "--quiet")
    assert r.exit_code == 0, r.output
    head_genes = json.loads((head_dir / "model.json").read_text())["genes"]
    assert list(pd.read_csv(tmp_path / "p.csv").columns) == ["ID", *head_genes] and len(head_genes) == 2


@pytest.mark.parametrize("args, message", [
    (["--head", "nope"], "unknown head 'nope'"),
    (["-p", "bogus=1"], "has no parameter(s) bogus"),
    (["--transform", "sqrt"], "unknown target transform 'sqrt'"),
    (["--head", "mlp", "-p", "epochs=abc"], "epochs='abc' is not accepted; epochs must be an integer >= 1"),
    (["--head", "mlp", "-p", "epochs=0"], "epochs=0 is not accepted; epochs must be an integer >= 1"),
    (["-p", "alphas=[-1]"], "alphas must be a non-empty list of numbers, each > 0"),
    (["--head", "mlp", "-p", "lr=-1"], "lr must be a number > 0"),
    (["--head", "mlp", "-p", "dropout=2"], "dropout must be a number >= 0 and < 1"),
    (["--head", "mlp", "-p", "loss=mse+pearsn"], "loss must be one of 'mse', 'huber'"),
    (["-p", "n_components=-5"], "n_components must be null or an integer >= 1"),
    (["--head", "gbm", "-p", "feature_fraction=0"], "feature_fraction must be a number > 0 and <= 1"),
    (["--head", "knn", "-p", "weighting=cosine"], "weighting must be one of 'softmax'"),
    (["--head", "ensemble", "-p", 'members=["ridge", "svm"]'], "members must be a non-empty list of head names"),
    (["--head", "mlp", "--trials", "0"], "--trials must be a number of configs >= 1"),
    (["--sweep", "SWEEP:{\"alphas\": [[1.0], [0]]}"], "alphas=[0] is not accepted"),
    (["--sweep", "SWEEP:{\"n_components\": {\"log\": [0, 10]}}"], "needs [low, high] with low <= high and low > 0"),
])
def test_bad_head_options_fail_before_embedding(tmp_path, args, message):
    train = write_challenge_dataset(tmp_path / "train", n=10)
    if args[0] == "--sweep":  # a sweep file with a value the head refuses
        (tmp_path / "sweep.json").write_text(args[1].removeprefix("SWEEP:"))
        args = ["--sweep", tmp_path / "sweep.json"]
    r = run("fit-head", train, "-b", TINY_BACKBONE, *args, "--out", tmp_path / "model", "--cache-dir", tmp_path / "cache", "--quiet")
    assert r.exit_code == 2 and message in " ".join(r.output.split())
    # a bad choice (typer's usage error) and the library's refusal read alike: one Error: line
    assert r.output.count("Error:") == 1 and "Traceback" not in r.output and "Usage:" not in r.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "model").exists()  # failed before embedding


@pytest.mark.parametrize("args, message", [
    (["--n-train", "0"], "n_train (--n-train) must be an integer >= 4, got 0"),
    (["--size", "8"], "size (--size) must be an integer >= 16, got 8"),
    (["--n-genes", "1"], "n_genes (--n-genes) must be an integer >= 2"),
])
def test_demo_data_refuses_bad_sizes_with_one_line(tmp_path, args, message):
    r = run("demo-data", tmp_path / "demo", *args)
    assert r.exit_code == 2 and message in " ".join(r.output.split())
    assert r.output.count("Error:") == 1 and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_demo_data_into_a_non_empty_folder_names_overwrite(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("x")
    small = ["--n-train", 6, "--n-test", 2, "--n-genes", 3, "--size", 16]
    r = run("demo-data", tmp_path / "demo", *small)
    assert r.exit_code == 2 and "--overwrite" in r.output and (tmp_path / "demo" / "keep.txt").exists()
    r = run("demo-data", tmp_path / "demo", *small, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "demo" / "keep.txt").exists() and (tmp_path / "demo" / "train.csv").is_file()


def test_sweeps_get_their_own_default_folder_and_backbone_changes_are_announced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = write_challenge_dataset(tmp_path / "train", n=16, n_genes=3)
    models = tmp_path / "cache" / "models"
    r = run("fit-head", train, "-b", TINY_BACKBONE, "--folds", 2, "--quiet")
    assert r.exit_code == 0, r.output
    plain = models / "data__ridge"
    assert f"model saved in {plain.relative_to(tmp_path)}" in " ".join(r.output.split())
    before = (plain / "model.safetensors").read_bytes()
    r = run("fit-head", train, "-b", TINY_BACKBONE, "--folds", 2, "--trials", 2, "--jobs", 1, "--quiet")
    assert r.exit_code == 0, r.output
    assert "model saved in cache/models/data__ridge__sweep" in " ".join(r.output.split())
    assert (models / "data__ridge__sweep" / "leaderboard.csv").is_file()
    assert (plain / "model.safetensors").read_bytes() == before and not (plain / "leaderboard.csv").exists()
    # the same folder with another backbone: said before fitting, and in the final line
    other = "resnet18:weights=none,size=48"
    r = run("fit-head", train, "-b", other, "--folds", 2, "--out", plain, "--quiet")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"holds a model fitted on {TINY_BACKBONE}; it will be replaced by one fitted on {other}" in text
    assert "it replaced a model fitted on" in text
    r = run("fit-head", train, "-b", other, "--folds", 2, "--out", plain, "--quiet")  # same backbone again: quiet
    assert r.exit_code == 0 and "replaced" not in r.output
