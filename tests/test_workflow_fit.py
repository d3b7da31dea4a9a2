"""workflow/fit.py: the gene panel, CV groups, model folders, and fit_head on a small generated dataset."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_BACKBONE, write_challenge_dataset

from hexpr.embedder.backbones import parse_backbone
from hexpr.embedder.datasets import DatasetError
from hexpr.embedder.errors import OutputExistsError
from hexpr.workflow.fit import DEFAULT_MODELS_DIR, cv_groups, default_model_dir, fit_head, select_gene_panel, warn_if_backbones_change


@pytest.fixture
def targets():
    rng = np.random.default_rng(4)
    scales = rng.uniform(0.1, 5, 30)                  # each gene its own spread and level
    levels = rng.uniform(0, 100, 30)
    values = levels + rng.normal(size=(50, 30)) * scales
    return pd.DataFrame(values, columns=[f"G{i}" for i in range(30)])


@pytest.mark.parametrize("n", [1, 5, 12])
def test_hvg_panel_is_the_n_most_variable_genes(targets, n):
    variances = {g: float(np.var(targets[g].to_numpy())) for g in targets.columns}
    expected = sorted(variances, key=variances.get, reverse=True)[:n]
    panel = select_gene_panel(targets, f"hvg:{n}")
    assert set(panel) == set(expected) and len(panel) == n
    assert panel == [g for g in targets.columns if g in set(expected)]      # in the data's column order


def test_heg_panel_is_the_n_most_expressed_genes(targets):
    totals = targets.sum().sort_values(ascending=False)
    assert set(select_gene_panel(targets, "heg:7")) == set(totals.index[:7])


def test_a_panel_file_or_nothing_and_bad_panels_are_named(targets, tmp_path):
    assert select_gene_panel(targets, None) == list(targets.columns)
    (tmp_path / "genes.txt").write_text("G3\nG1, G7\n")
    assert select_gene_panel(targets, tmp_path / "genes.txt") == ["G3", "G1", "G7"]
    (tmp_path / "bad.txt").write_text("G3\nNOPE\n")
    with pytest.raises(DatasetError, match="bad.txt: 1 genes are not in the training data.*NOPE"):
        select_gene_panel(targets, tmp_path / "bad.txt")
    with pytest.raises(DatasetError, match="give hvg:N, heg:N or a file"):
        select_gene_panel(targets, "hvg:many")


def test_cv_groups_use_the_groups_fall_back_to_leave_one_out_and_warn_on_one_group():
    groups = pd.Series(list("aabbccdd"))
    g, folds = cv_groups(groups, 3)
    assert folds == 3 and list(g) == list(groups)
    with pytest.warns(UserWarning, match="4 groups for 5 folds: using 4 folds"):
        assert cv_groups(groups, 5)[1] == 4
    with pytest.warns(UserWarning, match="all spots are in one group"):
        assert cv_groups(pd.Series(["x"] * 6), 3) == (None, 3)
    assert cv_groups(None, 5) == (None, 5)


def test_default_model_dir_keeps_sweeps_apart_from_the_plain_model():
    dirs = {default_model_dir("data", "ridge", s, b) for s, b in [(False, False), (True, False), (False, True)]}
    assert len(dirs) == 3 and all(d.parent == DEFAULT_MODELS_DIR for d in dirs)
    assert default_model_dir("data", "ridge", False, False).name == "data__ridge"


def test_refitting_on_other_backbones_is_announced_and_a_foreign_folder_refused(tmp_path):
    a, b = parse_backbone("resnet18:weights=none,size=64"), parse_backbone("resnet18:weights=none,size=48")
    model = tmp_path / "model"
    assert warn_if_backbones_change(model, [a]) is None                     # nothing there yet
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"feature_meta": {"backbones": [a.to_dict()]}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_backbones_change(model, [a]) is None                 # same backbones: silent
    with pytest.warns(UserWarning, match="size=64.*will be replaced.*size=48"):
        assert "size=64" in warn_if_backbones_change(model, [b])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a model")
    with pytest.raises(OutputExistsError, match="holds no fitted model"):
        warn_if_backbones_change(other, [a])


def test_fit_head_saves_the_panel_from_the_training_targets_and_the_patch_scale(tmp_path):
    csv = write_challenge_dataset(tmp_path / "data", n=12, n_genes=6, groups=3)
    report = fit_head(csv, [parse_backbone(TINY_BACKBONE)], genes="hvg:3", folds=3, out_dir=tmp_path / "model",
                      cache_dir=tmp_path / "cache", progress=False, n_jobs=1, num_workers=0)
    targets = pd.read_csv(csv).filter(like="G")
    expected = targets.var().sort_values(ascending=False).index[:3]
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert set(info["genes"]) == set(expected)
    assert report["out_dir"] == str(tmp_path / "model") and report["random_init_backbones"] == ["resnet18"]
    assert "patch" in info["feature_meta"] and info["feature_meta"]["neighbours"] == 0
    with pytest.raises(DatasetError, match="no gene columns"):
        test_csv = write_challenge_dataset(tmp_path / "test", n=4, with_targets=False)
        fit_head(test_csv, [parse_backbone(TINY_BACKBONE)], out_dir=tmp_path / "m2", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "m2").exists()
