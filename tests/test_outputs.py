"""workflow/outputs: CSV tables, AnnData (.h5ad) and QuPath GeoJSON written by predict / predict-slide."""
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from hexpr.workflow.outputs.anndata import write_anndata
from hexpr.workflow.outputs.geojson import tile_features, write_tile_geojson
from hexpr.workflow.outputs.tables import write_table


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.normal(size=(5, 3)) * 1000, index=[f"spot{i}" for i in range(5)], columns=["A", "B", "C"])


def test_write_table_has_an_id_column_and_six_significant_digits(tmp_path, predictions):
    path = write_table(tmp_path / "out" / "pred.csv", predictions)
    back = pd.read_csv(path, index_col="ID")
    assert list(back.index) == list(predictions.index) and list(back.columns) == ["A", "B", "C"]
    np.testing.assert_allclose(back.to_numpy(), predictions.to_numpy(), rtol=5e-6)
    assert not np.array_equal(back.to_numpy(), predictions.to_numpy())       # rounded, not full repr
    assert sorted(p.name for p in path.parent.iterdir()) == ["pred.csv"]


def test_write_anndata_round_trips_expression_coordinates_groups_and_provenance(tmp_path, predictions):
    coords = np.arange(10, dtype=float).reshape(5, 2)
    provenance = {"model": "m", "missing": None, "panel": ["A", "B"], "blocks": [{"k": 1}, {"k": 2}], "mixed": [1, "x"]}
    path = write_anndata(tmp_path / "p.h5ad", predictions, coords, ["s1", "s1", "s2", "s2", "s2"], provenance)
    a = ad.read_h5ad(path)
    assert list(a.obs_names) == list(predictions.index) and list(a.var_names) == ["A", "B", "C"]
    np.testing.assert_allclose(a.X, predictions.to_numpy(np.float32))
    np.testing.assert_array_equal(a.obsm["spatial"], coords)
    assert list(a.obs["group"].cat.categories) == ["s1", "s2"]
    hexpr = a.uns["hexpr"]
    assert hexpr["model"] == "m" and "missing" not in hexpr and list(hexpr["panel"]) == ["A", "B"]
    assert hexpr["blocks"]["1"]["k"] == 2 and [json.loads(v) for v in hexpr["mixed"]] == [1, "x"]


def test_write_anndata_without_coordinates_or_groups(tmp_path, predictions):
    a = ad.read_h5ad(write_anndata(tmp_path / "p.h5ad", predictions, None, None, {}))
    assert "spatial" not in a.obsm and "group" not in a.obs


def test_geojson_features_are_squares_with_measurements():
    pred = pd.DataFrame({"A": [1.0, 2.5], "B": [0.0, -1.0]}, index=["tile_r0_c0", "tile_r0_c1"])
    fc = tile_features(pred, np.array([[50.0, 50.0], [150.0, 50.0]]), 100)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2
    f = fc["features"][1]
    assert f["geometry"]["type"] == "Polygon"
    ring = f["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and ring[0] == [100.0, 0.0] and ring[2] == [200.0, 100.0]
    assert f["properties"]["objectType"] == "tile" and f["properties"]["measurements"] == {"A": 2.5, "B": -1.0}


def test_geojson_file_has_one_square_per_tile_centred_on_it(tmp_path, predictions):
    centres = np.random.default_rng(1).uniform(0, 1000, (5, 2))
    path = write_tile_geojson(tmp_path / "tiles.geojson", predictions, centres, 64)
    collection = json.loads(path.read_text())
    assert [f["id"] for f in collection["features"]] == list(predictions.index)
    for feature, (cx, cy), row in zip(collection["features"], centres, predictions.to_numpy()):
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert ring.shape == (5, 2)
        np.testing.assert_allclose(ring[:4].mean(axis=0), [cx, cy], atol=0.01)
        np.testing.assert_allclose(np.ptp(ring, axis=0), [64, 64], atol=0.01)
        np.testing.assert_allclose(list(feature["properties"]["measurements"].values()), row, rtol=1e-5)
    with pytest.raises(ValueError, match="5 prediction rows for 4 tile centres"):
        write_tile_geojson(tmp_path / "bad.geojson", predictions, centres[:4], 64)
    assert not (tmp_path / "bad.geojson").exists()
