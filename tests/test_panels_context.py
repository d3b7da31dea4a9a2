"""Gene panels chosen on training data and saved with the model; neighbour context features; import CLI."""
import numpy as np
import pandas as pd
import pytest
from conftest import HER2ST, TINY_BACKBONE, needs_shared, write_challenge_dataset
from typer.testing import CliRunner

from hexpr.embedder.features import FeatureSet, add_neighbour_context
from hexpr.pipeline import app
from hexpr.workflow.fit import select_gene_panel

runner = CliRunner()


def test_panel_hvg_and_heg_from_training_targets(tmp_path):
    targets = pd.DataFrame({"low": [1.0, 1.1, 0.9, 1.0], "var": [0.0, 10.0, 0.0, 10.0], "big": [100.0, 101, 100, 101]})
    assert select_gene_panel(targets, "hvg:1") == ["var"]
    assert select_gene_panel(targets, "heg:1") == ["big"]
    assert select_gene_panel(targets, None) == ["low", "var", "big"]
    (tmp_path / "genes.txt").write_text("big\nlow\n")
    assert select_gene_panel(targets, tmp_path / "genes.txt") == ["big", "low"]
    (tmp_path / "bad.txt").write_text("nope\n")
    with pytest.raises(ValueError, match="not in the training data"):
        select_gene_panel(targets, tmp_path / "bad.txt")


def test_panel_is_saved_with_model_and_applied_at_predict(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=20, n_genes=5)
    model = tmp_path / "model"
    r = runner.invoke(app, ["fit-head", str(train), "-b", TINY_BACKBONE, "--genes", "hvg:2", "--folds", "2",
                            "--out", str(model), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert r.exit_code == 0, r.output
    expected = select_gene_panel(pd.read_csv(train).drop(columns=["ID", "path"]), "hvg:2")
    r = runner.invoke(app, ["predict", str(model), str(train), "--out", str(tmp_path / "p.csv"),
                            "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert list(pd.read_csv(tmp_path / "p.csv").columns) == ["ID", *expected]


def test_neighbour_context_is_mean_of_nearest_spots_within_a_slide():
    coords = np.array([[0, 0], [1, 0], [2, 0], [10, 0], [0, 0], [1, 0]], dtype=float)
    groups = np.array(["a", "a", "a", "a", "b", "b"])
    X = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    fs = FeatureSet([str(i) for i in range(6)], X, [{"key": "k", "spec": {"name": "m"}, "identity": {}, "start": 0, "stop": 2}])
    out = add_neighbour_context(fs, coords, groups, k=2)
    assert out.X.shape == (6, 4)
    context = out.X[:, 2]
    assert context[0] == pytest.approx((1 + 2) / 2)   # spot 0's two nearest in slide a: 1 and 2
    assert context[1] == pytest.approx((0 + 2) / 2)
    assert context[3] == pytest.approx((2 + 1) / 2)   # the far spot still takes its nearest two
    assert context[4] == pytest.approx(5) and context[5] == pytest.approx(4)  # slide b only has each other
    assert out.meta()["backbones"] == [{"name": "m"}]  # context is not mistaken for a backbone


def test_neighbours_need_coordinates(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=10)
    r = runner.invoke(app, ["fit-head", str(train), "-b", TINY_BACKBONE, "--neighbours", "3", "--folds", "2",
                            "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert r.exit_code == 2 and "needs spot coordinates" in r.output


@needs_shared
def test_import_cli_her2st_section(tmp_path):
    r = runner.invoke(app, ["import", str(HER2ST), "--out", str(tmp_path / "imp"), "--sample", "C3", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "180 patches of 224 px" in r.output.replace("\n", " ")
    from hexpr.embedder.datasets import open_dataset

    ds = open_dataset(tmp_path / "imp")
    assert len(ds) == 180 and ds.coords is not None and set(ds.groups) == {"C3"}
