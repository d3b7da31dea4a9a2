"""Super-resolution: bags at import (pooled spots, sub-tiles), heads fitted on bags (exact for linear
heads, bag loss for the MLP), predict-slide at sub-tile resolution, and every bad input."""
from __future__ import annotations

import json
import shutil

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import TINY_BACKBONE
from PIL import Image
from test_predict_slide import synthetic_slide, tiny_model, write_tiff  # noqa: F401 (fixture)
from typer.testing import CliRunner

from hexpr.embedder.datasets import DatasetError, open_dataset
from hexpr.embedder.errors import HexprError
from hexpr.embedder.importers import import_dataset
from hexpr.heads.bags import Bags, aggregate, bag_support, fit_on_bags
from hexpr.heads.base import HeadError
from hexpr.heads.cv import cross_validate, make_folds
from hexpr.heads.fitting import fit_head
from hexpr.heads.metrics import pearson_per_gene
from hexpr.heads.sweep import model_factory
from hexpr.pipeline import app

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::hexpr.embedder.importers.ImporterWarning")


# ---------------------------------------------------------------------------------------------
# heads on bags
# ---------------------------------------------------------------------------------------------
def synthetic_bags(n_obs=60, d=12, g=4, seed=0):
    rng = np.random.default_rng(seed)
    index = np.repeat(np.arange(n_obs), rng.integers(1, 5, n_obs))
    X = rng.normal(size=(len(index), d))
    bags = Bags.from_index(index)
    Y = bags.mean(X @ rng.normal(size=(d, g))) + 0.1 * rng.normal(size=(n_obs, g))
    return X, Y, bags


@pytest.mark.parametrize("head, params, transform", [("ridge", {}, "none"), ("ridge", {"n_components": 5}, "standardize"),
                                                      ("hest", {"n_components": 6}, "none"), ("mean", {}, "none")])
def test_linear_heads_on_bags_are_exact(head, params, transform):
    """The mean of a linear head's sub-tile predictions over a bag is its prediction of the bag's mean feature."""
    X, Y, bags = synthetic_bags()
    model = fit_on_bags(model_factory(head, params, transform)(), X, Y, bags)
    region = aggregate(model.predict(X), bags)
    np.testing.assert_allclose(region, model.predict(bags.mean(X)), rtol=0, atol=1e-9)
    if head != "mean":   # and it learned: region predictions follow the targets
        assert np.corrcoef(region.ravel(), Y.ravel())[0, 1] > 0.7


def test_mlp_learns_from_the_bag_loss_and_predicts_sub_tiles():
    X, Y, bags = synthetic_bags(n_obs=120)
    model = fit_on_bags(model_factory("mlp", {"epochs": 60, "hidden": [32], "batch_size": 16, "seed": 0})(), X, Y, bags)
    sub = model.predict(X)
    assert sub.shape == (bags.n_patches, Y.shape[1])
    assert np.corrcoef(aggregate(sub, bags).ravel(), Y.ravel())[0, 1] > 0.8
    # sub-tiles of one bag get their own predictions, not the bag's
    big = np.flatnonzero(bags.sizes >= 3)[0]
    assert np.ptp(sub[bags.index == big], axis=0).max() > 1e-3
    assert bag_support(model_factory("bagged", {"head": "mlp", "n_seeds": 2})()) == "bag_loss"


def test_cv_on_bags_keeps_bags_whole_and_reduces_to_plain_cv():
    X, Y, bags = synthetic_bags()
    folds = make_folds(bags.n_obs, 3)
    cv = cross_validate(model_factory("ridge"), X, Y, folds, bags=bags)
    assert cv.oof.shape == Y.shape and np.isfinite(cv.oof).all()
    # the fold's model predicts the held-out observations as the mean of their sub-tiles
    train, test = folds[0]
    rows, sub = bags.subset(train)
    model = fit_on_bags(model_factory("ridge")(), X[rows], Y[train], sub)
    rows_test, sub_test = bags.subset(test)
    np.testing.assert_allclose(cv.oof[test], aggregate(model.predict(X[rows_test]), sub_test), atol=1e-9)
    # one patch per observation: the same as plain CV
    plain = Bags.from_index(np.arange(len(Y)))
    Xp = bags.mean(X)
    np.testing.assert_allclose(cross_validate(model_factory("ridge"), Xp, Y, folds, bags=plain).oof,
                               cross_validate(model_factory("ridge"), Xp, Y, folds).oof)


@pytest.mark.parametrize("head", ["knn", "gbm", "ensemble"])
def test_heads_without_bag_support_are_refused(tmp_path, head):
    X, Y, bags = synthetic_bags(n_obs=20)
    with pytest.raises(HeadError, match="cannot learn from bags"):
        fit_head(X, Y, [f"g{i}" for i in range(Y.shape[1])], head=head, folds=2, out_dir=tmp_path / "m",
                 feature_meta={}, bags=bags, progress=False)
    assert not (tmp_path / "m").exists()


def test_fitted_model_records_subtile_size(tmp_path):
    X, Y, bags = synthetic_bags(n_obs=20)
    report = fit_head(X, Y, [f"g{i}" for i in range(Y.shape[1])], head="ridge", folds=2, out_dir=tmp_path / "m",
                      feature_meta={}, bags=bags, subtile_um=27.5, progress=False, ids=[f"o{i}" for i in range(20)])
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    assert info["subtile_um"] == 27.5 and info["bags"]["n_subtiles"] == bags.n_patches
    oof = pd.read_csv(tmp_path / "m" / "oof_predictions.csv", index_col=0)
    assert list(oof.index) == [f"o{i}" for i in range(20)] and report["n_subtiles"] == bags.n_patches


# ---------------------------------------------------------------------------------------------
# bags at import
# ---------------------------------------------------------------------------------------------
def legacy_st(root, sample="S1", seed=5):
    """A her2st-like section: 6 x 5 spots 80 px apart (200 µm -> 2.5 µm/px) on a textured slide."""
    for d in ("ST-cnts", "ST-spotfiles", f"ST-imgs/{sample}"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ax, ay = np.meshgrid(np.arange(2, 8), np.arange(2, 7))
    ax, ay = ax.ravel(), ay.ravel()
    px, py = 30.0 + 80 * ax, 20.0 + 80 * ay
    ids = [f"{a}x{b}" for a, b in zip(ax, ay)]
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(120, 220, (640, 700, 3), dtype=np.uint8)).save(root / "ST-imgs" / sample / "HE.png")
    pd.DataFrame({"x": ax, "y": ay, "new_x": ax, "new_y": ay, "pixel_x": px, "pixel_y": py, "selected": 1}).to_csv(
        root / "ST-spotfiles" / f"{sample}_selection.tsv", sep="\t", index=False)
    counts = pd.DataFrame(rng.poisson(3, size=(len(ids), 12)), index=ids, columns=[f"G{i}" for i in range(12)])
    counts.to_csv(root / "ST-cnts" / f"{sample}.tsv.gz", sep="\t")
    return counts


def read_bags(out, sample="S1"):
    with h5py.File(out / "patches" / f"{sample}.h5", "r") as f:
        barcodes = [b.decode() for b in f["barcode"][:, 0]]
        bags = [b.decode() for b in f["bag"][:, 0]]
        attrs = dict(f.attrs)
        n_img = f["img"].shape
    return barcodes, bags, attrs, n_img, ad.read_h5ad(out / "st" / f"{sample}.h5ad")


def test_pooled_spots_sum_their_members_counts(tmp_path):
    counts = legacy_st(tmp_path / "st")
    import_dataset(tmp_path / "st", tmp_path / "o", target_um_per_px=5.0, progress=False, pool_spots=2)
    barcodes, bags, attrs, _, adata = read_bags(tmp_path / "o")
    assert sorted(barcodes) == sorted(counts.index) and attrs["subtile_um"] == 112.0
    members = pd.Series(barcodes).groupby(bags).apply(list)
    assert set(members.index) == set(adata.obs_names) and len(members) == 3 * 3     # 6 x 5 spots in 2 x 2 blocks
    raw = pd.DataFrame(adata.layers["counts"].toarray(), index=adata.obs_names, columns=adata.var_names)
    for obs, spots in members.items():
        np.testing.assert_array_equal(raw.loc[obs].to_numpy(), counts.loc[spots, raw.columns].sum().to_numpy())
        assert adata.obs.loc[obs, "n_spots"] == len(spots) <= 4
        # grid neighbours: the members' array coordinates fall in one 2 x 2 block
        grid = np.array([[int(v) for v in s.split("x")] for s in spots])
        assert (grid // 2 == grid[0] // 2).all()
    # library size = the members' summed totals: log1p CP10k of the summed counts
    lib = counts.sum(axis=1)
    obs = members.index[0]
    expected = np.log1p(counts.loc[members[obs]].sum() / lib[members[obs]].sum() * 1e4)
    np.testing.assert_allclose(adata[obs].X.ravel(), expected[adata.var_names].to_numpy(), rtol=1e-5)
    ds = open_dataset(tmp_path / "o")
    assert ds.is_bagged and len(ds) == 30 and len(ds.targets) == 9
    assert [ds.targets.index[i] for i in ds.bag_index] == [f"S1/{b}" for b in bags]


def test_subtiles_cut_each_spot_footprint(tmp_path):
    counts = legacy_st(tmp_path / "st")
    import_dataset(tmp_path / "st", tmp_path / "o", target_um_per_px=2.5, progress=False, subtile_um=50.0)
    barcodes, bags, attrs, n_img, adata = read_bags(tmp_path / "o")
    # a 100 µm spot in 50 µm sub-tiles: 2 x 2 patches of 20 px, each bagged by its spot
    assert n_img[0] == 4 * len(counts) and n_img[1:3] == (20, 20) and attrs["subtile_um"] == 50.0
    assert pd.Series(bags).value_counts().eq(4).all() and all(b.startswith(s + "#") for b, s in zip(barcodes, bags))
    raw = pd.DataFrame(adata.layers["counts"].toarray(), index=adata.obs_names, columns=adata.var_names)
    pd.testing.assert_frame_equal(raw, counts.loc[raw.index, raw.columns], check_dtype=False, check_names=False)
    ds = open_dataset(tmp_path / "o")
    assert ds.subtile_um == 50.0 and ds.patch_scale()["patch_um"] == 50.0
    spot = ds.coords[ds.bag_index == 0]
    assert np.ptp(spot, axis=0) == pytest.approx([20.0, 20.0])          # sub-tile centres 50 µm = 20 px apart


@pytest.mark.parametrize("options, message", [
    ({"subtile_um": 15.0}, "below the 8 px"),                       # 6 px at the slide's 2.5 µm/px
    ({"subtile_um": 50.0, "pool_spots": 2}, "do not combine"),
    ({"pool_spots": 0}, "--pool-spots must be"),
    ({"pool_spots": 2, "output": "challenge"}, "HEST-style"),
])
def test_bad_bag_options_are_one_clear_error(tmp_path, options, message):
    legacy_st(tmp_path / "st")
    with pytest.raises(HexprError, match=message):
        import_dataset(tmp_path / "st", tmp_path / "o", target_um_per_px=1.0, progress=False, **options)
    assert not [p for p in tmp_path.glob("o/**/*") if p.is_file()]          # nothing half-written


def test_cli_bad_subtile_is_one_error_line(tmp_path):
    legacy_st(tmp_path / "st")
    r = runner.invoke(app, ["import", str(tmp_path / "st"), "--out", str(tmp_path / "o"), "--subtile-um", "15",
                            "--um-per-px", "1", "--quiet"])
    assert r.exit_code == 2 and r.output.count("Error:") == 1 and "8 px" in r.output


def test_a_mix_of_bagged_and_single_samples_is_refused(tmp_path):
    legacy_st(tmp_path / "st")
    import_dataset(tmp_path / "st", tmp_path / "plain", target_um_per_px=5.0, progress=False)
    import_dataset(tmp_path / "st", tmp_path / "pooled", target_um_per_px=5.0, progress=False, pool_spots=2)
    mixed = tmp_path / "mixed"
    for sub in ("patches", "st"):
        (mixed / sub).mkdir(parents=True)
    for name, src in (("A", "plain"), ("B", "pooled")):
        shutil.copy(tmp_path / src / "patches" / "S1.h5", mixed / "patches" / f"{name}.h5")
        shutil.copy(tmp_path / src / "st" / "S1.h5ad", mixed / "st" / f"{name}.h5ad")
    with pytest.raises(DatasetError, match="hold bags"):
        open_dataset(mixed)


def test_fit_head_on_a_pooled_import(tmp_path):
    legacy_st(tmp_path / "st")
    import_dataset(tmp_path / "st", tmp_path / "o", target_um_per_px=5.0, progress=False, pool_spots=2)
    common = ["-b", TINY_BACKBONE, "--folds", "3", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    r = runner.invoke(app, ["fit-head", str(tmp_path / "o"), "--head", "knn", "--out", str(tmp_path / "knn"), *common])
    assert r.exit_code == 2 and r.output.count("Error:") == 1 and "cannot learn from bags" in r.output
    assert not (tmp_path / "cache").exists()                   # refused before any embedding
    r = runner.invoke(app, ["fit-head", str(tmp_path / "o"), "--head", "ridge", "--out", str(tmp_path / "m"), *common])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    assert info["subtile_um"] == 112.0 and info["bags"] == {"n_observations": 9, "n_subtiles": 30,
                                                           "calibrated_on": "observations (region-level out-of-fold residuals)"}
    assert len(pd.read_csv(tmp_path / "m" / "oof_predictions.csv")) == 9


# ---------------------------------------------------------------------------------------------
# predict-slide at sub-tile resolution
# ---------------------------------------------------------------------------------------------
def slide_cli(model, slide, out, cache, *extra):
    return runner.invoke(app, ["predict-slide", str(model), str(slide), "--out", str(out), "--cache-dir", str(cache),
                               "--tile-um", "50", "--tile-um-per-px", "2", "--outputs", "h5ad", "--quiet", *extra])


def test_predict_slide_cells_are_the_mean_of_their_sub_tiles(tmp_path, tiny_model):  # noqa: F811
    slide = write_tiff(tmp_path / "s.tif", synthetic_slide(0))
    cache = tmp_path / "cache"
    r = slide_cli(tiny_model, slide, tmp_path / "fine", cache)
    assert r.exit_code == 0, r.output
    r = slide_cli(tiny_model, slide, tmp_path / "coarse", cache, "--resolution-um", "100")
    assert r.exit_code == 0, r.output
    fine = ad.read_h5ad(tmp_path / "fine" / "s" / "predictions.h5ad")
    coarse = ad.read_h5ad(tmp_path / "coarse" / "s" / "predictions.h5ad")
    assert coarse.uns["hexpr"]["resolution_um"] == pytest.approx(100) and fine.uns["hexpr"]["resolution_um"] == pytest.approx(50)
    cell = (fine.obs["row"].to_numpy() // 2, fine.obs["col"].to_numpy() // 2)
    for i, (row, col) in enumerate(zip(coarse.obs["row"], coarse.obs["col"])):
        members = (cell[0] == row) & (cell[1] == col)
        assert members.sum() == coarse.obs["n_subtiles"].iloc[i] >= 1
        np.testing.assert_allclose(coarse.X[i], np.asarray(fine.X)[members].mean(axis=0), rtol=1e-5, atol=1e-6)
        if members.sum() == 4:        # a full cell is centred on its four sub-tiles
            np.testing.assert_allclose(coarse.obsm["spatial"][i], fine.obsm["spatial"][members].mean(axis=0))
    assert len(coarse) < len(fine)


@pytest.mark.parametrize("extra, message", [(("--resolution-um", "75"), "not a multiple"),
                                            (("--resolution-um", "100", "--stride-um", "25"), "do not combine")])
def test_predict_slide_bad_resolution_is_one_error_line(tmp_path, tiny_model, extra, message):  # noqa: F811
    slide = write_tiff(tmp_path / "s.tif", synthetic_slide(0))
    r = slide_cli(tiny_model, slide, tmp_path / "o", tmp_path / "cache", *extra)
    assert r.exit_code == 2 and r.output.count("Error:") == 1 and message in r.output
    assert not (tmp_path / "cache").exists()


def test_predict_slide_sub_tiles_below_8_slide_pixels_are_refused(tmp_path, tiny_model):  # noqa: F811
    slide = write_tiff(tmp_path / "s.tif", synthetic_slide(0), um_per_px=2.0)
    r = runner.invoke(app, ["predict-slide", str(tiny_model), str(slide), "--out", str(tmp_path / "o"), "--cache-dir",
                            str(tmp_path / "cache"), "--tile-um", "10", "--tile-um-per-px", "1", "--quiet"])
    assert r.exit_code == 2 and r.output.count("Error:") == 1 and "below the 8 px" in r.output


# ---------------------------------------------------------------------------------------------
# a bag model's outputs: predict rows name their observation; SpatialData gets the regions too
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pooled_model(tmp_path_factory):
    """A ridge fitted on 2 x 2 pooled spots of a generated legacy-ST section (sub-tiles of 112 µm)."""
    root = tmp_path_factory.mktemp("pooled")
    legacy_st(root / "st")
    import_dataset(root / "st", root / "o", target_um_per_px=5.0, progress=False, pool_spots=2)
    r = runner.invoke(app, ["fit-head", str(root / "o"), "--head", "ridge", "--out", str(root / "m"), "-b", TINY_BACKBONE,
                            "--folds", "3", "--cache-dir", str(root / "cache"), "--quiet"])
    assert r.exit_code == 0, r.output
    return root


def test_predict_on_a_pooled_import_names_each_rows_observation(pooled_model, tmp_path):
    root = pooled_model
    barcodes, bags, _, _, _ = read_bags(root / "o")
    observation_of = dict(zip((f"S1/{b}" for b in barcodes), (f"S1/{b}" for b in bags)))
    for suffix in ("csv", "h5ad"):
        r = runner.invoke(app, ["predict", str(root / "m"), str(root / "o"), "--out", str(tmp_path / f"p.{suffix}"),
                                "--cache-dir", str(root / "cache"), "--quiet"])
        assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "p.csv", dtype={"ID": str})
    assert list(table.columns[:2]) == ["ID", "observation"] and len(table) == 30
    assert dict(zip(table["ID"], table["observation"])) == {i: observation_of[i] for i in table["ID"]}
    adata = ad.read_h5ad(tmp_path / "p.h5ad")
    assert dict(zip(adata.obs_names, adata.obs["observation"].astype(str))) == observation_of
    # the CSV still reads as an expression table (the observation column is not a gene): the sub-tile
    # predictions score against the same section imported as single spots
    import_dataset(root / "st", tmp_path / "single", target_um_per_px=5.0, progress=False)
    r = runner.invoke(app, ["evaluate", str(tmp_path / "p.csv"), str(tmp_path / "single"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["n_spots"] == 30 and report["n_genes"] == 12 and "aggregated" not in report
    # against the pooled truth (one row per observation) each observation's sub-tile predictions are averaged
    truth = open_dataset(root / "o").targets
    rows = {"csv": table.drop(columns="ID"),
            "h5ad": adata.to_df().astype(np.float64).assign(observation=adata.obs["observation"].astype(str))}
    for suffix in ("csv", "h5ad"):
        regions = rows[suffix].groupby("observation").mean().loc[truth.index, truth.columns]
        r = runner.invoke(app, ["evaluate", str(tmp_path / f"p.{suffix}"), str(root / "o"), "--json"])
        assert r.exit_code == 0, r.output
        report = json.loads(r.output)
        assert report["n_spots"] == 9 and "aggregated" in report
        per_gene = pd.read_csv(report["per_gene_csv"]).set_index("gene")["pearson"]
        expected = pearson_per_gene(regions.to_numpy(np.float64), truth.to_numpy(np.float64))
        # genes whose region predictions vary well above float32 rounding (the tiny random backbone
        # predicts some genes nearly constant, where r depends on the last bits)
        varied = (regions.std() > 1e-4 * regions.abs().mean()).to_numpy()
        assert varied.sum() >= 3
        np.testing.assert_allclose(per_gene[truth.columns].to_numpy()[varied], expected[varied], atol=1e-4)


def test_predict_slide_with_a_bag_model_writes_regions_as_a_second_shape_layer(pooled_model, tmp_path):
    pytest.importorskip("spatialdata")
    import spatialdata

    model = json.loads((pooled_model / "m" / "model.json").read_text())
    slide = write_tiff(tmp_path / "s.tif", synthetic_slide(0), um_per_px=2.0)
    r = runner.invoke(app, ["predict-slide", str(pooled_model / "m"), str(slide), "--out", str(tmp_path / "o"),
                            "--cache-dir", str(tmp_path / "cache"), "--tile-um-per-px", "2", "--outputs", "spatialdata",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    sdata = spatialdata.read_zarr(tmp_path / "o" / "s" / "spatialdata.zarr")
    assert set(sdata.shapes) == {"tiles", "footprints"} and set(sdata.tables) == {"table", "footprint_table"}
    tiles, regions = sdata.tables["table"], sdata.tables["footprint_table"]
    assert regions.uns["spatialdata_attrs"]["region"] == "footprints"
    assert model["subtile_um"] == 112.0 and model["subtiles_per_side"] == 2     # 2 x 2 pooled spots
    tile_side = sdata.shapes["tiles"].geometry.iloc[0].bounds
    region_side = sdata.shapes["footprints"].geometry.iloc[0].bounds
    assert region_side[2] - region_side[0] == pytest.approx(2 * (tile_side[2] - tile_side[0]))   # 2 x 2 sub-tiles
    footprint = tiles.obs["footprint"].to_numpy()
    assert len(regions) < len(tiles) and set(footprint) == set(range(len(regions)))
    boxes = sdata.shapes["footprints"].geometry
    for f in range(len(regions)):
        members = footprint == f
        assert members.sum() == regions.obs["n_subtiles"].iloc[f]
        # the region's prediction is the mean of its sub-tiles' (for a linear head, the region-level prediction)
        np.testing.assert_allclose(regions.X[f], np.asarray(tiles.X)[members].mean(axis=0), rtol=1e-5, atol=1e-6)
        x0, y0, x1, y1 = boxes.iloc[f].bounds
        centres = tiles.obsm["spatial"][members]
        assert ((centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0) & (centres[:, 1] < y1)).all()
