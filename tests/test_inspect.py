"""Tests of workflow.explore: summary numbers on data built with known properties, and the figures."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import write_challenge_dataset
from test_plots import assert_png

import hexpr
from hexpr.workflow.explore import heatmap_layout, inspect_dataset, log1p_cp10k, robust_z, summarize, value_kind
from hexpr.workflow.outputs.plots import figure_pixels

HIGH = ["spot7", "spot50"]     # library size x 40
LOW = ["spot33"]               # library size / ~40


def known_counts(seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """90 spots (groups A: 20, B: 30, C: 40) x 40 genes of Poisson counts with one all-zero gene,
    one gene constant at 5, and three spots with outlying library sizes."""
    rng = np.random.default_rng(seed)
    n, g = 90, 40
    lam = rng.uniform(5, 40, g)
    size_factor = np.exp(np.clip(rng.normal(0, 0.2, (n, 1)), -0.5, 0.5))    # realistic depth spread, no tails
    x = rng.poisson(lam * size_factor).astype(float)
    ids = [f"spot{i}" for i in range(n)]
    genes = [f"G{j}" for j in range(g)]
    frame = pd.DataFrame(x, index=pd.Index(ids, name="ID"), columns=genes)
    for s in HIGH:
        frame.loc[s] = rng.poisson(lam * 40)
    frame.loc[LOW[0]] = rng.poisson(lam / 40)
    frame["ZERO"] = 0.0
    frame["CONST5"] = 5.0
    groups = pd.Series(["A"] * 20 + ["B"] * 30 + ["C"] * 40, index=frame.index, name="group")
    return frame, groups


def test_value_kind():
    counts, _ = known_counts()
    assert value_kind(counts.to_numpy())["kind"] == "raw_counts"
    logn = log1p_cp10k(counts.to_numpy())
    assert value_kind(logn)["kind"] == "log_normalised"
    assert value_kind(np.expm1(logn))["kind"] == "normalised"
    z = (logn - logn.mean(0)) / (logn.std(0) + 1)
    k = value_kind(z)
    assert k["kind"] == "scaled" and "negative" in k["reason"]
    np.testing.assert_allclose(np.expm1(logn).sum(1)[counts.sum(1).to_numpy() > 0], 1e4)


def test_robust_z():
    v = np.r_[np.arange(11.0), 100.0]
    z, med, scale = robust_z(v)
    assert med == 5.5 and scale == pytest.approx(1.4826 * 3.0)
    assert z[-1] > 20 and np.abs(z[:-1]).max() < 2
    z, _, scale = robust_z(np.r_[np.ones(9), 3.0])   # MAD 0 -> mean absolute deviation
    assert scale == pytest.approx(1.2533 * 0.2) and z[-1] > 3 and np.all(z[:-1] == 0)
    assert np.all(robust_z(np.ones(5))[0] == 0)


def test_summarize_known_numbers():
    frame, groups = known_counts()
    s = summarize(frame.sample(frac=1, random_state=1), groups)       # row order does not matter
    json.dumps(s)                                                     # JSON-ready
    x = frame.to_numpy()
    assert s["n_spots"] == 90 and s["n_genes"] == 42
    assert s["groups"]["counts"] == {"A": 20, "B": 30, "C": 40}
    assert s["groups"]["n_groups"] == 3 and s["groups"]["min_spots"] == 20 and s["groups"]["max_spots"] == 40
    assert s["values"]["kind"] == "raw_counts"
    assert s["values"]["min"] == 0 and s["values"]["max"] == x.max()
    assert s["values"]["fraction_zeros"] == pytest.approx((x == 0).mean())
    assert s["values"]["median"] == pytest.approx(np.median(x))
    assert s["constant_genes"]["n"] == 2 and set(s["constant_genes"]["names"]) == {"ZERO", "CONST5"}
    assert s["constant_genes"]["n_all_zero"] == 1
    out = s["outlier_spots"]
    assert set(out["ids"]) == set(HIGH + LOW) and out["n"] == 3
    assert out["n_high"] == 2 and out["n_low"] == 1 and out["within"] == "group"
    assert out["statistic"].startswith("log1p(library size")
    assert sum(out["by_group"].values()) == 3
    assert s["per_spot"]["total"]["max"] == x.sum(1).max()
    assert s["per_spot"]["genes_detected"]["max"] <= 41
    assert len(s["per_gene"]["top_hvg"]) == 10 and "ZERO" not in s["per_gene"]["top_hvg"]
    # no groups: judged over all spots, same outliers; a higher threshold flags fewer
    s2 = summarize(frame)
    assert s2["groups"] is None and s2["outlier_spots"]["within"] == "all spots"
    assert set(s2["outlier_spots"]["ids"]) == set(HIGH + LOW)
    assert summarize(frame, z_threshold=1e6)["outlier_spots"]["n"] == 0
    # already normalised values: totals are the sum of values
    logn = pd.DataFrame(log1p_cp10k(x), index=frame.index, columns=frame.columns)
    s3 = summarize(logn, groups)
    assert s3["values"]["kind"] == "log_normalised" and s3["constant_genes"]["n_all_zero"] == 1
    assert s3["outlier_spots"]["statistic"].startswith("total expression")
    with pytest.raises(ValueError, match="NaN"):
        summarize(frame.replace(5.0, np.nan))


def test_inspect_dataset_table_with_coords(tmp_path):
    frame, groups = known_counts()
    table = frame.copy()
    table.insert(0, "group", groups)
    gx, gy = np.meshgrid(np.arange(10), np.arange(9))
    table.insert(1, "x", 50 + 30 * gx.ravel())
    table.insert(2, "y", 40 + 30 * gy.ravel())
    table.to_csv(tmp_path / "table.csv")
    res = inspect_dataset(tmp_path / "table.csv", tmp_path / "out", n_top=12)
    f = res["files"]
    assert set(f) == {"embedding", "gene_stats", "heatmap", "spot_qc", "spatial_qc", "summary_json"}
    assert_png(f["embedding"], figure_pixels(8.0, 6.5))
    assert_png(f["gene_stats"], figure_pixels(16.0, 5.0))
    assert_png(f["heatmap"], figure_pixels(*heatmap_layout(12)))
    assert_png(f["spot_qc"], figure_pixels(13.0, 5.0))
    assert_png(f["spatial_qc"], figure_pixels(3 * 4.6, 4.3 + 0.5))        # one panel per group
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk.pop("hexpr_version") == hexpr.__version__        # every JSON output records the version
    assert on_disk["n_spots"] == 90 and on_disk["outlier_spots"]["n"] == 3
    assert on_disk["embedding"]["method"] == "pca" and on_disk == json.loads(json.dumps(res["summary"]))
    assert res["notes"] == []


def test_inspect_dataset_tsne_h5ad_without_coords(tmp_path):
    import anndata as ad

    frame, groups = known_counts()
    a = ad.AnnData(X=frame.to_numpy(np.float32), obs=pd.DataFrame({"group": groups.to_numpy()}, index=frame.index),
                   var=pd.DataFrame(index=frame.columns))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(tmp_path / "s.h5ad")
    res = inspect_dataset(tmp_path / "s.h5ad", tmp_path / "out", n_top=8, method="tsne")
    assert res["summary"]["embedding"]["method"] == "tsne"
    assert_png(res["files"]["embedding"], figure_pixels(8.0, 6.5))
    assert "spatial_qc" not in res["files"] and any("no spot coordinates" in n for n in res["notes"])
    with pytest.raises(ValueError, match="method"):
        inspect_dataset(tmp_path / "s.h5ad", tmp_path / "out", method="umap")


def test_inspect_challenge_dataset_reads_no_image(tmp_path, monkeypatch):
    import hexpr.embedder.datasets as datasets

    csv = write_challenge_dataset(tmp_path / "data", n=15, n_genes=5, size=8, groups=3)

    def no_images(*args, **kwargs):
        raise AssertionError("inspect must not read images")

    monkeypatch.setattr(datasets, "read_image_file", no_images)
    monkeypatch.setattr(datasets.CsvPatchDataset, "read_image", no_images)
    res = inspect_dataset(csv, tmp_path / "out", n_top=50)
    s = res["summary"]
    assert s["n_spots"] == 15 and s["groups"]["counts"] == {"slide0": 5, "slide1": 5, "slide2": 5}
    assert s["values"]["kind"] == "log_normalised" and s["per_gene"]["n_top"] == 5
    assert_png(res["files"]["heatmap"], figure_pixels(*heatmap_layout(5)))
