"""predict-slide outputs: SpatialData store lined up with the slide, h5ad drawn by scanpy on the slide,
bounded QuPath GeoJSON, gene-set scores, the --outputs table and its errors."""
from __future__ import annotations

import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from test_predict_slide import predict_cli, synthetic_slide, tiny_model, write_tiff  # noqa: F401 (fixture)

from hexpr.embedder.errors import DataError, UsageError
from hexpr.embedder.slides import open_slide, slide_thumbnail
from hexpr.embedder.tiling import tile_grid, tissue_fraction, tissue_mask
from hexpr.workflow.outputs.gene_sets import read_gene_sets, score_gene_sets
from hexpr.workflow.outputs.slide_maps import SlideMap, parse_geojson_genes, parse_outputs, write_slide_outputs

MARK = (600, 400, 700, 500)         # x0, y0, x1, y1 (level-0 px) of a black square on the tissue
TILE = 100.0                        # tile side = stride, level-0 px: the mark is exactly tile r4 c6


def marked_slide_map(tmp_path, genes=("G0", "G1", "G2"), scores: pd.DataFrame | None = None) -> SlideMap:
    """A 1000 x 800 slide (tissue rectangle + black mark) read back through the TIFF reader, tiled on
    a 100 px grid; prediction G0 = tile centre x, G1 = centre y (so any mix-up of rows shows)."""
    img = synthetic_slide(0)
    x0, y0, x1, y1 = MARK
    img[y0:y1, x0:x1] = 0
    with open_slide(write_tiff(tmp_path / "marked.tif", img)) as slide:
        thumbnail, scale = slide_thumbnail(slide, 250)         # 4x reduction: thumbnail px = 4 level-0 px
        grid = tile_grid(slide.width, slide.height, TILE, TILE)
    assert scale == 0.25
    fraction = tissue_fraction(tissue_mask(thumbnail), scale, grid)
    mark_tile = (grid.centres == [(MARK[0] + MARK[2]) / 2, (MARK[1] + MARK[3]) / 2]).all(axis=1)
    keep = (fraction >= 0.5) | mark_tile          # the black mark is no 'tissue' to the mask: kept anyway
    tiles = grid.subset(keep)
    centres = tiles.centres
    rng = np.random.default_rng(0)
    values = {"G0": centres[:, 0], "G1": centres[:, 1]}
    frame = pd.DataFrame({g: values.get(g, rng.normal(size=len(centres))) for g in genes}, index=tiles.ids())
    obs = pd.DataFrame({"row": tiles.rows, "col": tiles.cols, "tissue_fraction": fraction[keep].astype(np.float32)})
    return SlideMap("marked", frame, centres, TILE, TILE, thumbnail, scale, obs, {"slide": "marked.tif", "tile_px": TILE},
                    scores=scores if scores is not None else pd.DataFrame(), heatmap_genes=["G0"])


def test_spatialdata_store_lines_up_with_the_slide(tmp_path):
    sd = pytest.importorskip("spatialdata")
    from spatialdata.transformations import get_transformation

    m = marked_slide_map(tmp_path)
    written = write_slide_outputs(m, tmp_path / "out", ("spatialdata",))
    assert written == {"spatialdata": {"spatialdata": "spatialdata.zarr"}}
    store = sd.read_zarr(tmp_path / "out" / "spatialdata.zarr")
    tiles, table = store.shapes["tiles"], store.tables["table"]
    # the table annotates the tile shapes, row by row: G0/G1 (= tile centre) match the shape's centre
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == ("tiles", "region", "instance_id")
    assert len(tiles) == len(table) == len(m.predictions) and set(table.obs["region"]) == {"tiles"}
    shape_of_row = tiles.loc[table.obs["instance_id"].to_numpy()]
    centroid = np.c_[shape_of_row.geometry.centroid.x, shape_of_row.geometry.centroid.y]
    np.testing.assert_allclose(centroid, table[:, ["G0", "G1"]].X, atol=1e-3)
    # the mark's tile (r4 c6): its polygon in global coordinates is its level-0 pixel box
    row = int(np.flatnonzero(table.obs_names == "tile_r4_c6")[0])
    box = tiles.loc[table.obs["instance_id"].iloc[row]].geometry
    assert box.bounds == pytest.approx(MARK)
    assert get_transformation(tiles, "global").to_affine_matrix(("x", "y"), ("x", "y")) == pytest.approx(np.eye(3))
    # the image maps thumbnail pixels to level-0 pixels: the black thumbnail pixels land inside the mark
    image = store.images["slide"]
    assert list(image.keys()) == ["scale0", "scale1"]                     # multiscale: 250x200, 125x100
    level0 = np.asarray(image["scale0"]["image"].values)                 # (c, y, x)
    assert level0.shape == (3, *m.thumbnail.shape[:2]) and level0.dtype == np.uint8
    ty, tx = np.nonzero(level0.max(axis=0) < 30)
    affine = get_transformation(image, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    corners = affine @ np.vstack([np.r_[tx, tx + 1], np.r_[ty, ty + 1], np.ones(2 * len(tx))])
    assert corners[0].min() == pytest.approx(MARK[0]) and corners[0].max() == pytest.approx(MARK[2])
    assert corners[1].min() == pytest.approx(MARK[1]) and corners[1].max() == pytest.approx(MARK[3])
    # and spatialdata's own query of the image by the mark tile's box returns the black content
    crop = sd.bounding_box_query(image, axes=("x", "y"), min_coordinate=list(box.bounds[:2]),
                                 max_coordinate=list(box.bounds[2:]), target_coordinate_system="global")
    assert np.asarray(crop["scale0"]["image"].values).mean() < 30
    other = tiles.loc[table.obs["instance_id"].iloc[int(np.flatnonzero(table.obs_names == "tile_r4_c3")[0])]].geometry
    crop = sd.bounding_box_query(image, axes=("x", "y"), min_coordinate=list(other.bounds[:2]),
                                 max_coordinate=list(other.bounds[2:]), target_coordinate_system="global")
    assert np.asarray(crop["scale0"]["image"].values).mean() > 60               # tissue, not the mark


def test_h5ad_is_drawn_by_scanpy_on_the_slide_image(tmp_path):
    sc = pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    m = marked_slide_map(tmp_path)
    write_slide_outputs(m, tmp_path / "out", ("h5ad",))
    path = tmp_path / "out" / "predictions.h5ad"
    with h5py.File(path) as f:                      # the thumbnail is stored as compressed uint8
        hires = f["uns/spatial/marked/images/hires"]
        assert hires.dtype == np.uint8 and hires.compression == "gzip"
    adata = ad.read_h5ad(path)
    scale = adata.uns["spatial"]["marked"]["scalefactors"]["tissue_hires_scalef"]
    ax = sc.pl.spatial(adata, color="G0", library_id="marked", show=False)[0]
    circles = [p.vertices for p in ax.collections[0].get_paths()]        # one circle per tile, in image px
    spots = np.array([(v.min(axis=0) + v.max(axis=0)) / 2 for v in circles])
    def by_position(xy):          # scanpy draws spots in order of value: compare the sets of positions
        return xy[np.lexsort(xy.T)]

    np.testing.assert_allclose(by_position(spots), by_position(adata.obsm["spatial"] * scale), atol=1e-6)
    radius = np.array([(v.max(axis=0) - v.min(axis=0)) / 2 for v in circles])
    np.testing.assert_allclose(radius, TILE * scale / 2, rtol=1e-6)               # a tile-wide spot
    image = ax.get_images()[0].get_array()
    assert image.shape == m.thumbnail.shape
    h, w = image.shape[:2]
    at = (adata.obsm["spatial"] * scale).astype(int)        # = the drawn spots (checked above), in adata's order
    assert (at >= 0).all() and (at[:, 0] < w).all() and (at[:, 1] < h).all()
    on_tissue = tissue_mask(np.asarray(image))[at[:, 1], at[:, 0]]
    mark = adata.obs_names == "tile_r4_c6"        # the black mark is not 'tissue' to the mask
    assert on_tissue[~mark].all()
    x, y = at[mark][0]
    assert np.asarray(image)[y, x].max() < 30      # the mark's tile sits on the black mark


def test_geojson_keeps_chosen_genes_and_scores(tmp_path):
    genes = [f"G{i}" for i in range(8)]
    m = marked_slide_map(tmp_path, genes)
    m.scores = score_gene_sets(m.predictions, {"prog": ["G0", "G1"]})
    m.geojson_genes = ["G3", "G5"]
    write_slide_outputs(m, tmp_path / "few", ("geojson", "heatmaps"))
    few = json.loads((tmp_path / "few" / "tiles.geojson").read_text())["features"]
    assert set(few[0]["properties"]["measurements"]) == {"G3", "G5", "score_prog"}
    assert sorted(p.name for p in (tmp_path / "few").iterdir()) == ["heatmap_G0.png", "heatmap_score_prog.png",
                                                                    "tiles.geojson"]
    m.geojson_genes = None
    write_slide_outputs(m, tmp_path / "all", ("geojson",))
    every = (tmp_path / "all" / "tiles.geojson").read_text()
    assert set(json.loads(every)["features"][0]["properties"]["measurements"]) == {*genes, "score_prog"}
    assert len(every) > (tmp_path / "few" / "tiles.geojson").stat().st_size


def test_gene_set_files_and_scores(tmp_path):
    model_genes = ["A", "B", "C", "D"]
    (tmp_path / "s.gmt").write_text("up\tfirst program\tA\tB\tNOPE\n\ndown\t\tC\n")
    assert read_gene_sets(tmp_path / "s.gmt", model_genes) == {"up": ["A", "B"], "down": ["C"]}
    (tmp_path / "s.csv").write_text("set,gene\nup,B\nup,A\ndown,D\n")
    assert read_gene_sets(tmp_path / "s.csv", model_genes) == {"up": ["B", "A"], "down": ["D"]}
    (tmp_path / "s.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"s\.xlsx.*unknown format"):
        read_gene_sets(tmp_path / "s.xlsx", model_genes)
    (tmp_path / "bad.csv").write_text("set,gene\nup,A\nghost,X\nghost,Y\n")
    with pytest.raises(DataError, match=r"bad\.csv.*'ghost'"):
        read_gene_sets(tmp_path / "bad.csv", model_genes)
    (tmp_path / "three.csv").write_text("up,A,extra\n")
    with pytest.raises(DataError, match=r"three\.csv, line 1"):
        read_gene_sets(tmp_path / "three.csv", model_genes)
    # score: mean of per-gene z-scores over the set's genes; a constant gene adds 0
    pred = pd.DataFrame({"A": [1.0, 2.0, 3.0], "B": [10.0, 10.0, 40.0], "C": [5.0, 5.0, 5.0]}, index=list("xyz"))
    scores = score_gene_sets(pred, {"up": ["A", "B"], "flat": ["C"], "mixed": ["A", "C"]})
    za = (pred["A"] - 2) / pred["A"].std(ddof=0)
    zb = (pred["B"] - 20) / pred["B"].std(ddof=0)
    np.testing.assert_allclose(scores["score_up"], (za + zb) / 2, rtol=1e-6)
    np.testing.assert_allclose(scores["score_flat"], 0)
    np.testing.assert_allclose(scores["score_mixed"], za / 2, rtol=1e-6)


def test_output_and_geojson_gene_options():
    assert parse_outputs(None) == ("h5ad", "geojson", "heatmaps")
    assert parse_outputs("h5ad, GeoJSON,h5ad") == ("h5ad", "geojson")
    with pytest.raises(UsageError, match="'zarr'.*choose from"):
        parse_outputs("h5ad,zarr")
    assert parse_geojson_genes(None) == 50 and parse_geojson_genes("all") is None and parse_geojson_genes("7") == 7
    with pytest.raises(UsageError, match="--geojson-genes"):
        parse_geojson_genes("many")


def test_missing_spatialdata_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "spatialdata" else real(name, *a))
    with pytest.raises(UsageError, match=r"hexpr\[spatialdata\]"):
        parse_outputs("h5ad,spatialdata")


def test_predict_slide_cli_outputs_gene_sets_and_bounded_geojson(tmp_path, tiny_model):  # noqa: F811
    write_tiff(tmp_path / "s.tif", synthetic_slide(0))
    (tmp_path / "sets.gmt").write_text("prog\t\tG0\tG1\tNOT_PREDICTED\nsolo\t\tG2\n")
    wanted = ["h5ad,geojson,heatmaps" + (",spatialdata" if _has("spatialdata") else "")]
    r = predict_cli(tiny_model, tmp_path / "s.tif", out=tmp_path / "out", cache=tmp_path / "cache",
                    extra=["--outputs", *wanted, "--gene-sets", str(tmp_path / "sets.gmt"), "--geojson-genes", "1",
                           "--gene", "G3"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out" / "s"
    a = ad.read_h5ad(out / "predictions.h5ad")
    pred = a.to_df()
    z = (pred - pred.mean()) / pred.std(ddof=0)
    np.testing.assert_allclose(a.obs["score_prog"], z[["G0", "G1"]].mean(axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.obs["score_solo"], z["G2"], rtol=1e-4, atol=1e-5)
    assert a.uns["hexpr"]["gene_sets"]["genes"]["prog"].tolist() == ["G0", "G1"]
    # GeoJSON: the single most variable predicted gene + --gene G3 + the scores, not every gene
    top = pred.var().sort_values(ascending=False, kind="stable").index[0]
    features = json.loads((out / "tiles.geojson").read_text())["features"]
    assert set(features[0]["properties"]["measurements"]) == {top, "G3", "score_prog", "score_solo"}
    assert {"heatmap_G3.png", "heatmap_score_prog.png", "heatmap_score_solo.png"} <= {p.name for p in out.iterdir()}
    if _has("spatialdata"):
        import spatialdata

        table = spatialdata.read_zarr(out / "spatialdata.zarr").tables["table"]
        np.testing.assert_allclose(table.obs["score_prog"], a.obs["score_prog"])
        np.testing.assert_allclose(table.X, a.X)


def test_bad_gene_sets_or_outputs_fail_before_any_embedding(tmp_path, tiny_model):  # noqa: F811
    write_tiff(tmp_path / "s.tif", synthetic_slide(0))
    (tmp_path / "sets.csv").write_text("set,gene\nghost,NOT_A_GENE\n")
    (tmp_path / "sets.json").write_text("{}")
    for extra, words in ((["--gene-sets", str(tmp_path / "sets.csv")], ["sets.csv", "'ghost'"]),
                         (["--gene-sets", str(tmp_path / "sets.json")], ["sets.json", "unknown format"]),
                         (["--outputs", "h5ad,parquet"], ["'parquet'", "spatialdata"]),
                         (["--geojson-genes", "-3"], ["--geojson-genes"])):
        r = predict_cli(tiny_model, tmp_path / "s.tif", out=tmp_path / "out", cache=tmp_path / "cache", extra=extra)
        text = " ".join(r.output.split())          # the console wraps long lines
        assert r.exit_code == 2 and text.startswith("Error:") and all(w in text for w in words), r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
