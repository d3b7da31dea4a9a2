"""Tests of workflow.outputs.plots: PNG files, their sizes, spot placement over the thumbnail, report from files."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import HER2ST
from PIL import Image

from hexpr.workflow.expression_tables import EvaluationError, evaluate_tables
from hexpr.workflow.outputs.plots import (
    _figure,
    draw_spatial_panel,
    figure_pixels,
    load_truth,
    make_report_plots,
    plot_pearson_distribution,
    plot_scatter,
    plot_spatial_maps,
    scatter_layout,
    spatial_layout,
    to_thumbnail_xy,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, size=None) -> np.ndarray:
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        if size is not None:
            assert im.size == size, (path.name, im.size, size)
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 5, f"{path.name} looks blank"
    assert not list(path.parent.glob(f".{path.name}.*")), "temporary file left behind"
    return arr


def spatial_data(n_side: int = 8, n_genes: int = 6, spacing: float = 40.0, origin=(100.0, 80.0), seed: int = 0,
                 prefix: str = ""):
    """Spots on a grid; gene k is a smooth spatial gradient + noise; predictions are a noisy copy."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(n_side), np.arange(n_side))
    coords = np.c_[origin[0] + spacing * gx.ravel(), origin[1] + spacing * gy.ravel()]
    ids = [f"{prefix}s{i}" for i in range(len(coords))]
    cols = {}
    for k in range(n_genes):
        angle = k * np.pi / n_genes
        pattern = np.cos(angle) * gx.ravel() + np.sin(angle) * gy.ravel()
        cols[f"G{k}"] = 2 + pattern / n_side + rng.normal(0, 0.1 + 0.15 * k, len(ids))
    truth = pd.DataFrame(cols, index=pd.Index(ids, name="ID"))
    pred = truth * 0.6 + rng.normal(0, 0.2, truth.shape) + 0.3
    return truth, pred, coords


def test_pearson_distribution_png(tmp_path):
    truth, pred, _ = spatial_data(n_genes=12)
    _, per_gene = evaluate_tables(pred, truth, n_top=5)
    out = plot_pearson_distribution(per_gene, tmp_path / "sub" / "pearson.png", title="test run")
    assert out == tmp_path / "sub" / "pearson.png"
    assert_png(out, figure_pixels(12.0, 4.8))
    # minimal table: gene + pearson only
    out2 = plot_pearson_distribution(per_gene[["gene", "pearson"]], tmp_path / "p2.png", dpi=60)
    assert_png(out2, figure_pixels(12.0, 4.8, 60))
    with pytest.raises(ValueError, match="pearson"):
        plot_pearson_distribution(per_gene[["gene"]], tmp_path / "bad.png")


def test_scatter_png(tmp_path):
    truth, pred, _ = spatial_data()
    groups = pd.Series(["A"] * 32 + ["B"] * 32, index=truth.index)
    genes = ["G0", "G1", "G2", "G3", "G4"]
    out = plot_scatter(pred.iloc[::-1], truth, genes, tmp_path / "scatter.png", groups=groups)   # joined by id
    nrows, ncols, w, h = scatter_layout(5)
    assert (nrows, ncols) == (2, 4)
    assert_png(out, figure_pixels(w, h))
    with pytest.raises(ValueError, match="not in truth"):
        plot_scatter(pred, truth, ["G0", "NOPE"], tmp_path / "x.png")
    with pytest.raises(EvaluationError, match="lacks"):
        plot_scatter(pred.iloc[:10], truth, ["G0"], tmp_path / "x.png")


def test_to_thumbnail_xy_matches_importer_convention():
    # importer: thumbnail pixel j covers full-res [j f, (j + 1) f); full-res pixel x -> thumbnail pixel x // f
    coords = np.array([[0, 0], [4, 9], [450, 300], [1199, 999]], float)
    for f in (1, 2, 4, 5):
        px = np.floor(to_thumbnail_xy(coords, 1.0 / f)).astype(int)
        np.testing.assert_array_equal(px, coords.astype(int) // f)
    np.testing.assert_allclose(to_thumbnail_xy(coords, None), coords + 0.5)


def test_spatial_panel_draws_at_the_right_place():
    """A marker planted in the thumbnail at a spot and the spot's colour both land where
    ax.transData puts the spot's thumbnail position."""
    scale = 0.25
    truth, _, coords = spatial_data(n_side=6, spacing=160.0, origin=(200.0, 120.0))
    xy = to_thumbnail_xy(coords, scale)
    k = 14
    thumb = np.full((320, 360, 3), 255, np.uint8)
    cx, cy = np.floor(xy[k]).astype(int)
    thumb[cy - 2:cy + 3, cx - 2:cx + 3] = (255, 0, 0)               # 5x5 red marker around spot k's pixel
    values = np.zeros(len(xy))
    values[k] = 1.0

    def render(diameter):
        fig = _figure(8, 8)          # ~3.9 display px per thumbnail px
        ax = fig.subplots()
        draw_spatial_panel(ax, xy, values, thumb, spot_diameter=diameter, colorbar=False, vmin=0, vmax=1)
        fig.canvas.draw()
        img = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        to_px = lambda p: (ax.transData.transform(p)[0], img.shape[0] - ax.transData.transform(p)[1])   # noqa: E731
        return img, to_px

    # 1. thumbnail only (spots too small to see): the red marker is centred on spot k
    img, to_px = render(1e-3)
    red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
    ys, xs = np.nonzero(red)
    assert len(xs) > 20
    # marker centre = centre of thumbnail pixel (cx, cy) = (cx + 0.5, cy + 0.5) in data coordinates; a
    # half-pixel error in the imshow extent would move it by ~2 display px
    ex, ey = to_px((cx + 0.5, cy + 0.5))
    assert abs(xs.mean() + 0.5 - ex) < 0.6 and abs(ys.mean() + 0.5 - ey) < 0.6
    # and the spot's own position is inside the marker
    sx, sy = to_px(xy[k])
    assert red[int(sy), int(sx)]
    # 2. spots drawn: spot k has the top colour of viridis, its neighbours the bottom one
    img, to_px = render(30.0)
    top, bottom = np.array([253, 231, 37]), np.array([68, 1, 84])
    sx, sy = to_px(xy[k])
    assert np.abs(img[int(sy), int(sx)].astype(int) - top).max() < 12
    for j in (k - 1, k + 1, k + 6):
        jx, jy = to_px(xy[j])
        assert np.abs(img[int(jy), int(jx)].astype(int) - bottom).max() < 12


def test_spatial_maps_png(tmp_path):
    truth, pred, coords = spatial_data()
    thumb = np.full((200, 260, 3), 235, np.uint8)
    thumb[40:160, 50:220] = (150, 100, 180)
    out = plot_spatial_maps(pred.iloc[::-1], truth, coords, ["G0", "G3"], tmp_path / "maps.png",
                            thumbnail=thumb, thumbnail_scale=0.4)
    assert_png(out, figure_pixels(*spatial_layout(2)))
    # measured only, coords as a DataFrame by id, thumbnail from a PNG with the scale in its text chunk
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("hexpr_thumbnail_scale", "0.4")
    Image.fromarray(thumb).save(tmp_path / "thumb.png", pnginfo=info)
    cdf = pd.DataFrame(coords, index=truth.index).iloc[::-1]
    out = plot_spatial_maps(None, truth, cdf, ["G1"], tmp_path / "measured.png", thumbnail=tmp_path / "thumb.png")
    assert_png(out, figure_pixels(*spatial_layout(1, with_pred=False)))
    # several slides: one must be chosen
    groups = pd.Series(["A"] * 32 + ["B"] * 32, index=truth.index)
    with pytest.raises(ValueError, match="sample="):
        plot_spatial_maps(pred, truth, coords, ["G0"], tmp_path / "x.png", groups=groups)
    out = plot_spatial_maps(pred, truth, coords, ["G0"], tmp_path / "b.png", groups=groups, sample="B")
    assert_png(out, figure_pixels(*spatial_layout(1)))
    with pytest.raises(ValueError, match="thumbnail_scale"):
        plot_spatial_maps(pred, truth, coords, ["G0"], tmp_path / "x.png", thumbnail=thumb)


def write_hest_sample(root: Path, sample: str, truth: pd.DataFrame, coords: np.ndarray, thumb_scale: float | None):
    """Minimal HEST-style sample as the importers write it (tiny patches, optional thumbnail)."""
    import anndata as ad
    from PIL.PngImagePlugin import PngInfo

    (root / "patches").mkdir(parents=True, exist_ok=True)
    (root / "st").mkdir(exist_ok=True)
    bc = list(truth.index)
    with h5py.File(root / "patches" / f"{sample}.h5", "w") as f:
        f["img"] = np.zeros((len(bc), 8, 8, 3), np.uint8)
        f["barcode"] = np.array([b.encode() for b in bc]).reshape(-1, 1)
        f["coords"] = coords
        f.attrs["sample_id"] = sample
        if thumb_scale is not None:
            f.attrs["thumbnail"] = f"thumbnails/{sample}.png"
            f.attrs["thumbnail_scale"] = thumb_scale
    a = ad.AnnData(X=truth.to_numpy(np.float32), obs=pd.DataFrame({"group": sample}, index=pd.Index(bc)),
                   var=pd.DataFrame(index=truth.columns))
    a.obsm["spatial"] = coords
    if thumb_scale is not None:
        a.uns["hexpr_import"] = {"sample_id": sample, "thumbnail": f"thumbnails/{sample}.png",
                                 "thumbnail_scale": thumb_scale}
        (root / "thumbnails").mkdir(exist_ok=True)
        rng = np.random.default_rng(1)
        thumb = rng.integers(120, 220, size=(int(500 * thumb_scale), int(600 * thumb_scale), 3), dtype=np.uint8)
        info = PngInfo()
        info.add_text("hexpr_thumbnail_scale", repr(thumb_scale))
        Image.fromarray(thumb).save(root / "thumbnails" / f"{sample}.png", pnginfo=info)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(root / "st" / f"{sample}.h5ad")


def test_make_report_plots_from_hest_folder(tmp_path):
    root = tmp_path / "hest"
    t1, p1, c1 = spatial_data(seed=1)
    t2, p2, c2 = spatial_data(n_side=5, seed=2)
    write_hest_sample(root, "S1", t1, c1, 0.5)
    write_hest_sample(root, "S2", t2, c2, None)
    pred = pd.concat([p1.set_axis([f"S1/{i}" for i in p1.index]), p2.set_axis([f"S2/{i}" for i in p2.index])])
    pred.index.name = "ID"
    pred_csv = tmp_path / "pred.csv"
    pred.iloc[::-1].to_csv(pred_csv)

    src = load_truth(root)
    assert [s.name for s in src.samples] == ["S1", "S2"]
    assert src.samples[0].thumbnail == root / "thumbnails" / "S1.png" and src.samples[0].thumbnail_scale == 0.5
    assert src.samples[1].thumbnail is None

    out = make_report_plots(pred_csv, root, tmp_path / "report", n_genes=2, n_top=4)
    truth = pd.concat([t1.set_axis(list(pred.index[:64])), t2.set_axis(list(pred.index[64:]))])
    _, per_gene = evaluate_tables(pred, truth, n_top=4)
    expected = per_gene[per_gene["is_top_hvg"]].sort_values("pearson", ascending=False)["gene"].head(2).tolist()
    assert out["genes"] == expected
    assert out["n_spots"] == 89 and out["n_genes"] == 6
    assert_png(out["pearson_distribution"], figure_pixels(12.0, 4.8))
    assert_png(out["scatter"], figure_pixels(*scatter_layout(2)[2:]))
    assert set(out["spatial_maps"]) == {"S1", "S2"}
    for path in out["spatial_maps"].values():
        assert_png(path, figure_pixels(*spatial_layout(2)))
    assert any("S2: no slide thumbnail" in n for n in out["notes"])

    # truth as one .h5ad (thumbnail from uns), predictions for a subset of its spots, chosen genes
    sub = p1.iloc[:40]
    sub.index.name = "ID"
    sub.to_csv(tmp_path / "pred_s1.csv")
    out = make_report_plots(tmp_path / "pred_s1.csv", root / "st" / "S1.h5ad", tmp_path / "r2", genes=["G5", "G0"])
    assert out["genes"] == ["G5", "G0"] and out["n_spots"] == 40
    assert list(out["spatial_maps"]) == ["S1"] and any("24 of 64 truth spots" in n for n in out["notes"])
    # truth without coordinates: spatial maps skipped with a note; disjoint ids: clear error
    t1.to_csv(tmp_path / "truth.csv")
    out = make_report_plots(tmp_path / "pred_s1.csv", tmp_path / "truth.csv", tmp_path / "r3", genes=["G1"])
    assert out["spatial_maps"] == {} and any("no spot coordinates" in n for n in out["notes"])
    with pytest.raises(EvaluationError, match="no spot id"):
        make_report_plots(pred_csv, tmp_path / "truth.csv", tmp_path / "r4")


@pytest.mark.slow
@pytest.mark.skipif(not HER2ST.exists(), reason="../shared/data/her2st not available")
def test_her2st_section_thumbnail_inspect_and_maps(tmp_path):
    """Import C3, then: thumbnail under the spots, inspect, measured-vs-measured spatial maps."""
    from hexpr.embedder.importers import import_dataset
    from hexpr.workflow.explore import inspect_dataset

    t0 = time.perf_counter()
    out = tmp_path / "her2st"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = import_dataset(HER2ST, out, sample_ids=["C3"], progress=False)
    smp = s["samples"]["C3"]
    thumb_path = out / "thumbnails" / "C3.png"
    assert smp["thumbnail"] == str(thumb_path) and smp["thumbnail_scale"] == pytest.approx(0.2)
    thumb = assert_png(thumb_path)
    assert 1024 <= max(thumb.shape[:2]) <= 2048
    # alignment on real data: spots sit on tissue (darker than the glass around it)
    with h5py.File(out / "patches" / "C3.h5", "r") as f:
        coords = f["coords"][:]
        assert f.attrs["thumbnail"] == "thumbnails/C3.png" and f.attrs["thumbnail_scale"] == pytest.approx(0.2)
    px = np.floor(to_thumbnail_xy(coords, 0.2)).astype(int)
    at_spots = thumb[px[:, 1], px[:, 0]].astype(float).mean()
    shifted = thumb[np.clip(px[:, 1] + 600, 0, thumb.shape[0] - 1), px[:, 0]].astype(float).mean()
    assert at_spots < shifted - 40, (at_spots, shifted)

    res = inspect_dataset(out, tmp_path / "inspect")
    summ = res["summary"]
    assert summ["n_spots"] == 180 and summ["groups"]["counts"] == {"C3": 180}
    assert summ["values"]["kind"] == "log_normalised"
    assert summ["constant_genes"]["n"] > 0 and "C3/11x17" in summ["outlier_spots"]["ids"]   # a 1-count spot
    for key in ("embedding", "gene_stats", "heatmap", "spot_qc", "spatial_qc"):
        assert_png(res["files"][key])

    # measured vs measured: predictions = the section's .h5ad, truth = its patch file (same barcodes)
    rep = make_report_plots(out / "st" / "C3.h5ad", out / "patches" / "C3.h5", tmp_path / "report", n_genes=2)
    assert list(rep["spatial_maps"]) == ["C3"] and rep["notes"] == []
    assert_png(rep["spatial_maps"]["C3"], figure_pixels(*spatial_layout(2)))
    assert time.perf_counter() - t0 < 40
