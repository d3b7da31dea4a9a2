"""workflow/prediction.py: loading a fitted model and predicting new patches as CSV or .h5ad."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import TINY_BACKBONE, write_challenge_dataset

from hexpr.embedder.backbones import parse_backbone
from hexpr.embedder.datasets import open_dataset
from hexpr.embedder.errors import UsageError
from hexpr.embedder.features import ensure_features
from hexpr.heads.fitting import FittedModel
from hexpr.workflow.fit import fit_head
from hexpr.workflow.prediction import load_predictor, predict, predictor_meta


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("prediction")
    train = write_challenge_dataset(root / "train", n=12, n_genes=3, groups=3)
    fit_head(train, [parse_backbone(TINY_BACKBONE)], folds=3, out_dir=root / "model", cache_dir=root / "cache",
             progress=False, n_jobs=1, num_workers=0)
    test = write_challenge_dataset(root / "test", n=5, n_genes=3, with_targets=False, seed=9)
    return root, root / "model", test


def test_load_predictor_takes_the_folder_or_the_model_file(fitted):
    _, model_dir, _ = fitted
    by_dir, by_file = load_predictor(model_dir), load_predictor(model_dir / "config.json")
    assert isinstance(by_dir, FittedModel) and by_dir.genes == by_file.genes == ["G0", "G1", "G2"]
    assert predictor_meta(by_dir) == by_dir.feature_meta
    assert predictor_meta(by_dir)["backbones"][0]["name"] == "resnet18"


def test_predict_csv_is_the_head_applied_to_the_cached_embeddings(fitted, tmp_path):
    root, model_dir, test = fitted
    result = predict(model_dir, test, out=tmp_path / "pred.csv", cache_dir=root / "cache", progress=False, num_workers=0,
                     clip=False)
    assert {k: result[k] for k in ("out", "n_spots", "n_genes", "format")} == {
        "out": str(tmp_path / "pred.csv"), "n_spots": 5, "n_genes": 3, "format": "csv"}
    frame = pd.read_csv(tmp_path / "pred.csv", index_col="ID")
    features = ensure_features(open_dataset(test), [parse_backbone(TINY_BACKBONE)], root / "cache", progress=False)
    expected = load_predictor(model_dir).predict(features.X)
    np.testing.assert_allclose(frame.loc[features.ids].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_predict_h5ad_by_suffix_records_provenance(fitted, tmp_path):
    root, model_dir, test = fitted
    result = predict(model_dir, test, out=tmp_path / "pred.h5ad", cache_dir=root / "cache", progress=False, num_workers=0)
    assert result["format"] == "h5ad"
    a = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert a.shape == (5, 3) and list(a.var_names) == ["G0", "G1", "G2"]
    assert a.uns["hexpr"]["dataset_fingerprint"] == open_dataset(test).fingerprint()
    assert a.uns["hexpr"]["model"] == str(model_dir)


def test_predict_default_output_goes_beside_the_model(fitted):
    root, model_dir, test = fitted
    result = predict(model_dir, test, cache_dir=root / "cache", progress=False, num_workers=0)
    assert result["out"] == str(model_dir / "predictions" / f"{open_dataset(test).name}.csv")


def test_an_unknown_format_is_a_usage_error_and_writes_nothing(fitted, tmp_path):
    root, model_dir, test = fitted
    with pytest.raises(UsageError, match="--format 'xlsx'.*csv.*h5ad"):
        predict(model_dir, test, out=tmp_path / "pred.xlsx", fmt="xlsx", cache_dir=root / "cache", progress=False)
    assert not list(tmp_path.iterdir())
