"""Tests of embedder.importers: synthetic Visium / HEST inputs + one real her2st section."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import tifffile
from conftest import HER2ST
from PIL import Image
from platform_folders import write_10x_h5

import hexpr.embedder.importers.thumbnails as thumbnails
import hexpr.embedder.slides as slides
from hexpr.embedder.importers import (
    ImporterError,
    ImporterWarning,
    derive_um_per_px,
    import_dataset,
    import_hest,
    import_visium,
    open_image,
)

pytestmark = pytest.mark.filterwarnings("ignore::hexpr.embedder.importers.ImporterWarning")


# ---------------------------------------------------------------------------------------------
# synthetic Visium folder
# ---------------------------------------------------------------------------------------------
W, H = 1200, 1000
SPOT_DIAM_PX = 110.0                 # -> 55 / 110 = 0.5 µm/px
MARK = (450, 300)                    # spot with a red square centred on its pixel
MARK_HALF = 20                       # square 41 x 41 px
EDGE = (20, 400)                     # spot whose patch leaves the image
WHITE_SPOT = (1050, 850)             # spot on blank glass


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((H, W, 3), 255, np.uint8)
    tissue = rng.integers(120, 200, size=(680, 860, 3), dtype=np.uint8)
    tissue[..., 2] = 200                                  # bluish-grey "tissue", never red
    img[0:680, 0:860] = tissue
    x, y = MARK
    img[y - MARK_HALF:y + MARK_HALF + 1, x - MARK_HALF:x + MARK_HALF + 1] = (255, 0, 0)
    return img


def _spots():
    xy = [(x, y) for y in (150, 300, 450, 600) for x in (150, 300, 450, 600, 750)]
    xy += [EDGE, WHITE_SPOT]
    return [f"AAAC{i:04d}-1" for i in range(len(xy))], np.array(xy, float)


def _write_h5_matrix(path: Path, barcodes, genes, counts: np.ndarray):
    write_10x_h5(path, barcodes, genes, counts)      # Space Ranger's layout, shared with the platform tests


def make_visium(root: Path, *, genes=None, pyramidal=False, mtx=False, image_fmt="tif", scalefactors=True,
                seed=1) -> dict:
    """Space Ranger-like folder. Matrix has one barcode without position; positions have one
    in-tissue barcode without counts and one off-tissue barcode with counts; row orders differ."""
    root.mkdir(parents=True)
    (root / "spatial").mkdir()
    barcodes, xy = _spots()
    genes = genes or [f"G{i}" for i in range(30)] + ["MARK"]
    rng = np.random.default_rng(seed)
    mat_bc = barcodes + ["TTTT0000-1", "OFFT0000-1"]            # no position / off tissue
    counts = rng.poisson(2.0, size=(len(mat_bc), len(genes))).astype(np.int64)
    counts[:, genes.index("MARK")] = np.arange(len(mat_bc)) + 1  # identifies the row
    if mtx:
        d = root / "filtered_feature_bc_matrix"
        d.mkdir()
        with gzip.open(d / "matrix.mtx.gz", "wb") as f:
            scipy.io.mmwrite(f, sp.coo_matrix(counts.T))
        pd.DataFrame({0: mat_bc}).to_csv(d / "barcodes.tsv.gz", sep="\t", header=False, index=False)
        pd.DataFrame({0: [f"ENSG{i}" for i in range(len(genes))], 1: genes,
                      2: ["Gene Expression"] * len(genes)}).to_csv(d / "features.tsv.gz", sep="\t",
                                                                   header=False, index=False)
    else:
        _write_h5_matrix(root / "filtered_feature_bc_matrix.h5", mat_bc, genes, counts)
    pos_bc = barcodes + ["NOCNT000-1", "OFFT0000-1"]
    pos_xy = np.vstack([xy, [[500, 500], [100, 100]]])
    in_tissue = [1] * len(barcodes) + [1, 0]
    pos = pd.DataFrame({"barcode": pos_bc, "in_tissue": in_tissue, "array_row": np.arange(len(pos_bc)),
                        "array_col": np.arange(len(pos_bc)) * 2,
                        "pxl_row_in_fullres": pos_xy[:, 1].astype(int),
                        "pxl_col_in_fullres": pos_xy[:, 0].astype(int)}).iloc[::-1]   # reversed order
    if mtx:
        pos.to_csv(root / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    else:
        pos.to_csv(root / "spatial" / "tissue_positions.csv", index=False)
    if scalefactors:
        (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(
            {"spot_diameter_fullres": SPOT_DIAM_PX, "tissue_hires_scalef": 0.2, "fiducial_diameter_fullres": 170.0}))
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(root / "spatial" / "tissue_hires_image.png")
    img = _image()
    if image_fmt == "tif":
        path = root / "slide.tif"
        if pyramidal:
            with tifffile.TiffWriter(path) as tw:
                tw.write(img, tile=(128, 128), subifds=2, compression="zlib", photometric="rgb")
                tw.write(img[::2, ::2], tile=(128, 128), subfiletype=1, compression="zlib", photometric="rgb")
                tw.write(img[::4, ::4], tile=(128, 128), subfiletype=1, compression="zlib", photometric="rgb")
        else:
            tifffile.imwrite(path, img, photometric="rgb")
    else:
        path = root / f"slide.{image_fmt}"
        Image.fromarray(img).save(path)
    return {"root": root, "image": path, "barcodes": barcodes, "xy": xy, "genes": genes,
            "counts": pd.DataFrame(counts, index=mat_bc, columns=genes)}


def _read_out(out: Path, sid: str):
    import anndata as ad

    with h5py.File(out / "patches" / f"{sid}.h5", "r") as f:
        img = f["img"][:]
        bc = [b.decode() for b in f["barcode"][:, 0]]
        coords = f["coords"][:]
        attrs = dict(f.attrs)
        assert f["barcode"].shape == (len(bc), 1) and f["barcode"].dtype.kind == "S"
    a = ad.read_h5ad(out / "st" / f"{sid}.h5ad")
    return img, bc, coords, attrs, a


def _red_centroid(p: np.ndarray):
    r = (p[..., 0] > 150) & (p[..., 1] < 100) & (p[..., 2] < 120)
    ys, xs = np.nonzero(r)
    return xs.mean(), ys.mean(), r.sum()


@pytest.fixture(scope="module")
def visium(tmp_path_factory):
    return make_visium(tmp_path_factory.mktemp("vis") / "sampleA")


@pytest.fixture(scope="module")
def visium_import(visium, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    with pytest.warns(ImporterWarning) as rec:
        s = import_dataset(visium["root"], out, target_um_per_px=1.0, progress=False)
    return out, s, [str(w.message) for w in rec]


def test_visium_marker_centred_and_expression(visium, visium_import):
    out, s, warned = visium_import
    assert s["kind"] == "visium" and s["patch_size_px"] == 112
    smp = s["samples"]["sampleA"]
    assert smp["source_um_per_px"] == pytest.approx(0.5)
    img, bc, coords, attrs, a = _read_out(out, "sampleA")
    # all in-tissue spots with counts, nothing else
    assert set(bc) == set(visium["barcodes"]) == set(a.obs_names)
    assert img.shape == (len(visium["barcodes"]), 112, 112, 3) and img.dtype == np.uint8
    assert attrs["pixel_size_um"] == pytest.approx(1.0) and attrs["patch_size_px"] == 112
    assert attrs["source_pixel_size_um"] == pytest.approx(0.5) and attrs["patch_size_um"] == pytest.approx(112)
    # planted marker is centred in its spot's patch ((P-1)/2 = 55.5), 41 px -> ~20.5 px wide
    i = bc.index(visium["barcodes"][visium["xy"].tolist().index(list(map(float, MARK)))])
    cx, cy, n = _red_centroid(img[i])
    assert abs(cx - 55.5) < 0.6 and abs(cy - 55.5) < 0.6
    assert 300 < n < 560
    # coords are the spot pixel centres, joined by id although the files are in different orders
    xy = dict(zip(visium["barcodes"], visium["xy"]))
    np.testing.assert_allclose(coords, np.array([xy[b] for b in bc]))
    np.testing.assert_allclose(a.obsm["spatial"], np.array([xy[b] for b in a.obs_names]))
    # expression rows match the count matrix by barcode
    cnt = visium["counts"]
    raw = a.layers["counts"].toarray() if sp.issparse(a.layers["counts"]) else a.layers["counts"]
    np.testing.assert_array_equal(raw, cnt.loc[a.obs_names, list(a.var_names)].to_numpy())
    X = np.asarray(a.X)
    ref = np.log1p(raw / raw.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(X, ref, rtol=1e-5, atol=1e-5)
    assert X.dtype == np.float32
    assert (a.obs["group"] == "sampleA").all()
    prov = a.uns["hexpr_import"]
    assert prov["normalization"] == "log1p_cp10k" and prov["source_um_per_px"] == pytest.approx(0.5)
    assert "image" in prov["source_files"]
    # ids in one file and not the other, off-tissue, edge padding: warned with counts
    joined = " | ".join(warned)
    assert "1 barcode(s) of" in joined and "have no position" in joined
    assert "1 barcode(s) listed in" in joined and "have no counts" in joined
    assert "not under tissue" in joined
    assert smp["n_padded"] == 1 and "1 patch(es) reach beyond the image edge" in joined
    e = bc.index(visium["barcodes"][len(visium["xy"]) - 2])   # EDGE spot: left part is white pad
    assert (img[e][:, :40] == 255).all()


def test_pyramidal_tiff_region_reader_same_patches(tmp_path, visium_import, monkeypatch):
    v = make_visium(tmp_path / "sampleA", pyramidal=True)
    monkeypatch.setattr(slides, "MAX_INMEMORY_IMAGE_BYTES", 0)      # force region reads
    monkeypatch.setattr(slides, "SUPER_TILE_PX", 256)
    with pytest.warns(ImporterWarning):
        s = import_dataset(v["root"], tmp_path / "out", target_um_per_px=1.0, progress=False)
    assert s["samples"]["sampleA"]["image_read"] == "region"
    img2, bc2, *_ = _read_out(tmp_path / "out", "sampleA")
    img1, bc1, *_ = _read_out(visium_import[0], "sampleA")
    assert bc1 == bc2
    np.testing.assert_array_equal(img1, img2)


def test_openslide_format_is_found_and_read_through_the_reader_table(tmp_path, visium_import):
    """A Visium folder whose slide has an OpenSlide-only suffix (.bif, here a generic tiled TIFF that
    OpenSlide reads): the importer finds it, reads it through the table's OpenSlide row, and cuts the
    same patches as from the plain TIFF."""
    pytest.importorskip("openslide")
    assert slides.SLIDE_READERS[".bif"] == (slides._open_openslide,)
    v = make_visium(tmp_path / "sampleA")
    v["image"].unlink()
    tifffile.imwrite(v["root"] / "slide.bif", _image(), tile=(128, 128), photometric="rgb")
    with pytest.warns(ImporterWarning):
        s = import_dataset(v["root"], tmp_path / "out", target_um_per_px=1.0, progress=False)
    smp = s["samples"]["sampleA"]
    assert smp["image_read"] == "openslide" and smp["image_size"] == [W, H]
    assert Path(s["samples"]["sampleA"]["thumbnail"]).is_file()
    img2, bc2, *_ = _read_out(tmp_path / "out", "sampleA")
    img1, bc1, *_ = _read_out(visium_import[0], "sampleA")
    assert bc1 == bc2
    np.testing.assert_array_equal(img1, img2)


def test_region_reader_matches_array(tmp_path, monkeypatch):
    v = make_visium(tmp_path / "s", pyramidal=True)
    ref = _image()
    monkeypatch.setattr(slides, "MAX_INMEMORY_IMAGE_BYTES", 0)
    monkeypatch.setattr(slides, "SUPER_TILE_PX", 256)
    with open_image(v["image"]) as im:
        assert im.mode == "region" and (im.width, im.height) == (W, H)
        r = np.asarray(im.region(300, 200, 700, 555))
        np.testing.assert_array_equal(r, ref[200:555, 300:700])
        r = np.asarray(im.region(-10, H - 20, 30, H + 20))          # corner, padded
        assert (r[:10] == 255).all() and (r[20:] == 255).all()
        np.testing.assert_array_equal(r[:20, 10:], ref[H - 20:H, 0:30])


def test_mtx_positions_list_png_and_challenge_output(tmp_path):
    v = make_visium(tmp_path / "s2", mtx=True, image_fmt="png")
    out = tmp_path / "ch"
    with pytest.warns(ImporterWarning):
        s = import_dataset(v["root"], out, output="challenge", sample_ids=["S2"], progress=False)
    df = pd.read_csv(out / "dataset.csv")
    assert list(df.columns[:5]) == ["ID", "path", "group", "x", "y"]
    assert set(df.columns[5:]) == set(v["genes"])
    assert len(df) == len(v["barcodes"]) == s["n_patches"] and (df["group"] == "S2").all()
    row = df[df["ID"] == f"S2/{v['barcodes'][0]}"].iloc[0]
    p = np.asarray(Image.open(out / row["path"]))
    assert p.shape == (224, 224, 3)
    cnt = v["counts"].loc[v["barcodes"][0]]
    assert row["MARK"] == pytest.approx(np.log1p(cnt["MARK"] / cnt.sum() * 1e4), rel=1e-4)
    mk = df[(df["x"] == MARK[0]) & (df["y"] == MARK[1])].iloc[0]
    cx, cy, _ = _red_centroid(np.asarray(Image.open(out / mk["path"])))
    assert abs(cx - 111.5) < 0.6 and abs(cy - 111.5) < 0.6
    assert not list(out.glob(".hexpr-*"))


def test_missing_scale_is_a_clear_error_and_given_scale_works(tmp_path):
    v = make_visium(tmp_path / "s3", scalefactors=False)
    with pytest.raises(ImporterError, match="source_um_per_px"):
        import_dataset(v["root"], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.h5*"))
    with pytest.warns(ImporterWarning):
        s = import_visium(v["root"], tmp_path / "o", source_um_per_px=0.5, target_um_per_px=1.0, progress=False)
    assert s["samples"]["s3"]["scale"]["method"] == "given"


def test_wrong_image_and_missing_files(tmp_path):
    v = make_visium(tmp_path / "s4")
    small = tmp_path / "hires.png"
    Image.fromarray(_image()[::5, ::5]).save(small)
    with pytest.raises(ImporterError, match="outside"), pytest.warns(ImporterWarning):
        import_dataset(v["root"], tmp_path / "o", image=small, progress=False)
    (v["root"] / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(ImporterError, match="tissue_positions"):
        import_dataset(v["root"], tmp_path / "o", progress=False)
    with pytest.raises(ImporterError, match="cannot tell the kind"):
        import_dataset(tmp_path, tmp_path / "o", progress=False)


def test_background_filter(tmp_path):
    v = make_visium(tmp_path / "s5")
    with pytest.warns(ImporterWarning, match="background"):
        s = import_dataset(v["root"], tmp_path / "o", filter_background=True, target_um_per_px=1.0, progress=False)
    assert s["samples"]["s5"]["n_background_dropped"] == 1
    _, bc, *_, a = _read_out(tmp_path / "o", "s5")
    white_bc = v["barcodes"][len(v["xy"]) - 1]
    assert white_bc not in bc and set(bc) == set(a.obs_names) and len(bc) == len(v["barcodes"]) - 1


def test_two_samples_share_genes_and_nothing_half_written(tmp_path):
    a = make_visium(tmp_path / "A", genes=[f"G{i}" for i in range(30)] + ["MARK", "ONLYA"])
    b = make_visium(tmp_path / "B", genes=["ONLYB"] + [f"G{i}" for i in range(29, -1, -1)] + ["MARK"], seed=2)
    out = tmp_path / "o"
    with pytest.warns(ImporterWarning, match=r"gene intersection .*\(dropped per sample: A 1, B 1\)$"):  # not a dict
        s = import_dataset([a["root"], b["root"]], out, target_um_per_px=1.0, progress=False)
    assert s["n_genes"] == 31 and s["n_genes_dropped"] == 2
    va, vb = _read_out(out, "A")[-1].var_names, _read_out(out, "B")[-1].var_names
    assert list(va) == list(vb) and "ONLYA" not in va
    # second sample broken -> no output at all, no temp files left
    (b["image"]).write_bytes(b"not a tiff")
    out2 = tmp_path / "o2"
    with pytest.raises(ImporterError, match="slide.tif"), pytest.warns(ImporterWarning):
        import_dataset([a["root"], b["root"]], out2, target_um_per_px=1.0, progress=False)
    assert [p for p in out2.rglob("*") if p.is_file()] == []


def test_hest_ready_patches_and_wsi(tmp_path, visium, visium_import):
    import anndata as ad

    src_out = visium_import[0]
    root = tmp_path / "hest"
    (root / "st").mkdir(parents=True)
    (root / "patches").mkdir()
    # HEST-like files: raw counts in X, no attrs on the patch file, coords = top-left corners
    img1, bc1, coords1, _, a1 = _read_out(src_out, "sampleA")
    h = ad.AnnData(X=a1.layers["counts"].astype(np.float32), obs=pd.DataFrame(index=a1.obs_names),
                   var=pd.DataFrame(index=a1.var_names))
    h.obsm["spatial"] = a1.obsm["spatial"]
    h.write_h5ad(root / "st" / "S1.h5ad")
    with h5py.File(root / "patches" / "S1.h5", "w") as f:
        f["img"] = img1[::-1]                                    # different row order
        f["barcode"] = np.array([b.encode() for b in bc1[::-1]]).reshape(-1, 1)
        f["coords"] = coords1[::-1] - 112
        f.attrs["pixel_size_um"] = 1.0
    s = import_hest(root, tmp_path / "o", target_um_per_px=1.0, progress=False)
    assert s["samples"]["S1"]["n_patches"] == len(bc1)
    img2, bc2, coords2, _, a2 = _read_out(tmp_path / "o", "S1")
    order = [bc2.index(b) for b in bc1]
    np.testing.assert_array_equal(img2[order], img1)             # copied, joined by barcode
    np.testing.assert_allclose(coords2[order], coords1)          # centres from the h5ad
    np.testing.assert_allclose(np.asarray(a2.X), np.asarray(a1.X)[[list(a1.obs_names).index(b) for b in a2.obs_names]],
                               rtol=1e-5, atol=1e-6)
    assert a2.uns["hexpr_import"]["route"] == "patches"
    # finer request (0.5 µm/px, 224 px) -> cut from the WSI, scale from metadata/<id>.json
    (root / "wsis").mkdir()
    tifffile.imwrite(root / "wsis" / "S1.tif", _image(), photometric="rgb")
    with pytest.raises(ImporterError, match="source_um_per_px"):
        import_hest(root, tmp_path / "o3", progress=False)
    (root / "metadata").mkdir()
    (root / "metadata" / "S1.json").write_text(json.dumps({"pixel_size_um_estimated": 0.5}))
    with pytest.warns(ImporterWarning):
        s = import_hest(root, tmp_path / "o3", progress=False)
    img3, bc3, *_ = _read_out(tmp_path / "o3", "S1")
    assert img3.shape[1:] == (224, 224, 3)
    cx, cy, _ = _red_centroid(img3[bc3.index(visium["barcodes"][visium["xy"].tolist().index(list(map(float, MARK)))])])
    assert abs(cx - 111.5) < 0.6 and abs(cy - 111.5) < 0.6
    # coarser request without the WSI -> ready patches resampled (centre crop of 56 µm)
    (root / "wsis" / "S1.tif").unlink()
    s = import_hest(root, tmp_path / "o4", patch_um=56.0, target_um_per_px=1.0, progress=False)
    img4, bc4, *_ = _read_out(tmp_path / "o4", "S1")
    assert img4.shape[1:] == (56, 56, 3)
    with pytest.raises(ImporterError, match="cover"):
        import_hest(root, tmp_path / "o5", patch_um=200.0, target_um_per_px=1.0, progress=False)


def test_derive_scale_from_rotated_grid():
    rng = np.random.default_rng(3)
    ax, ay = np.meshgrid(np.arange(5, 25), np.arange(5, 20))
    ax, ay = ax.ravel().astype(float), ay.ravel().astype(float)
    th = np.deg2rad(3.0)
    s = 290.0
    px = 100 + s * (np.cos(th) * ax - np.sin(th) * ay) + rng.normal(0, 1, ax.size)
    py = 50 + s * (np.sin(th) * ax + np.cos(th) * ay) + rng.normal(0, 1, ax.size)
    df = pd.DataFrame({"x": ax.astype(int), "y": ay.astype(int), "pixel_x": px, "pixel_y": py})
    mpp, info = derive_um_per_px(df)
    assert mpp == pytest.approx(200 / 290.0, rel=1e-3) and info["array_columns"] == ["x", "y"]


def test_legacy_st_synthetic(tmp_path):
    """her2st-like folder: scale derived from the grid (80 px per 200 µm -> 2.5 µm/px)."""
    root = tmp_path / "st"
    for d in ("ST-cnts", "ST-spotfiles", "ST-imgs/S1"):
        (root / d).mkdir(parents=True)
    ax, ay = np.meshgrid(np.arange(2, 8), np.arange(2, 7))
    ax, ay = ax.ravel(), ay.ravel()
    px, py = 30.0 + 80 * ax, 20.0 + 80 * ay
    ids = [f"{a}x{b}" for a, b in zip(ax, ay)]
    img = np.full((640, 700, 3), 230, np.uint8)
    mx, my = int(px[7]), int(py[7])
    img[my - 4:my + 5, mx - 4:mx + 5] = (255, 0, 0)
    Image.fromarray(img).save(root / "ST-imgs" / "S1" / "HE.png")
    spots = pd.DataFrame({"x": ax, "y": ay, "new_x": ax, "new_y": ay, "pixel_x": px, "pixel_y": py, "selected": 1})
    spots.iloc[::-1].to_csv(root / "ST-spotfiles" / "S1_selection.tsv", sep="\t", index=False)
    rng = np.random.default_rng(5)
    cnt = pd.DataFrame(rng.poisson(3, size=(len(ids), 12)), index=ids, columns=[f"G{i}" for i in range(12)])
    cnt = cnt.drop(index=ids[0])                       # a spot without counts
    cnt.loc["99x99"] = 1                               # counts without a spot
    cnt.to_csv(root / "ST-cnts" / "S1.tsv.gz", sep="\t")
    with pytest.warns(ImporterWarning) as rec:
        s = import_dataset(root, tmp_path / "o", target_um_per_px=1.0, progress=False)
    msgs = " | ".join(str(w.message) for w in rec)
    assert "1 spot(s) of" in msgs and "1 spot(s) listed in" in msgs
    smp = s["samples"]["S1"]
    assert smp["source_um_per_px"] == pytest.approx(2.5, rel=1e-3) and smp["n_patches"] == len(ids) - 1
    im, bc, coords, attrs, a = _read_out(tmp_path / "o", "S1")
    assert set(bc) == set(ids[1:]) == set(a.obs_names)
    cx, cy, n = _red_centroid(im[bc.index(ids[7])])
    assert abs(cx - 55.5) < 0.6 and abs(cy - 55.5) < 0.6
    raw = a.layers["counts"].toarray()
    np.testing.assert_array_equal(raw, cnt.loc[a.obs_names, list(a.var_names)].to_numpy())


# ---------------------------------------------------------------------------------------------
# real data: one her2st section
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not HER2ST.exists(), reason="../shared/data/her2st not available")
def test_her2st_section_alignment(tmp_path):
    out = tmp_path / "her2st"
    t0 = time.perf_counter()
    with pytest.warns(ImporterWarning, match="2 spot"):           # 2 spots have no counts in C3
        s = import_dataset(HER2ST, out, sample_ids=["C3"], progress=False)
    took = time.perf_counter() - t0
    assert took < 20, f"her2st C3 import took {took:.1f} s"
    smp = s["samples"]["C3"]
    assert s["kind"] == "legacy_st" and smp["scale"]["method"] == "derived from spot grid"
    assert smp["source_um_per_px"] == pytest.approx(0.69, abs=0.01)
    img, bc, coords, attrs, a = _read_out(out, "C3")
    cnt = pd.read_csv(HER2ST / "ST-cnts" / "C3.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(HER2ST / "ST-spotfiles" / "C3_selection.tsv", sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    matched = sorted(set(cnt.index) & set(spots.index))
    assert len(bc) == len(matched) == 180 and set(bc) == set(matched) == set(a.obs_names)
    assert img.shape == (180, 224, 224, 3) and attrs["pixel_size_um"] == pytest.approx(0.5)
    assert attrs["source_pixel_size_um"] == pytest.approx(smp["source_um_per_px"])
    np.testing.assert_allclose(coords, spots.loc[bc, ["pixel_x", "pixel_y"]].to_numpy())
    # expression rows match the count table by spot id
    for sid in ("10x10", matched[77], matched[-1]):
        i = list(a.obs_names).index(sid)
        row = a.layers["counts"][i]
        row = row.toarray().ravel() if sp.issparse(row) else np.asarray(row).ravel()
        np.testing.assert_array_equal(row, cnt.loc[sid, list(a.var_names)].to_numpy())
        ref = np.log1p(cnt.loc[sid].to_numpy() / cnt.loc[sid].sum() * 1e4)
        np.testing.assert_allclose(np.asarray(a.X[i]).ravel(), ref[[cnt.columns.get_loc(g) for g in a.var_names]],
                                   rtol=1e-5, atol=1e-5)
    # patch centre == spot centre: compare with an independent crop of the slide
    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        slide = Image.open(next((HER2ST / "ST-imgs" / "C3").glob("*.jpg")))
        slide.load()
    finally:
        Image.MAX_IMAGE_PIXELS = old
    side = 112.0 / smp["source_um_per_px"]

    def crop(x, y, dx=0.0, dy=0.0):
        x0, y0 = x + 0.5 + dx - side / 2, y + 0.5 + dy - side / 2
        return np.asarray(slide.crop((round(x0), round(y0), round(x0 + side), round(y0 + side)))
                          .resize((224, 224), Image.Resampling.BICUBIC), np.float32)

    for i in (0, 60, 120, 179):
        p = img[i].astype(np.float32)
        d0 = np.abs(p - crop(*coords[i])).mean()
        d1 = np.abs(p - crop(*coords[i], dx=15)).mean()
        shifts = [(dx, dy) for dx in (-3, 0, 3) for dy in (-3, 0, 3)]
        ds = [np.abs(p - crop(*coords[i], dx=dx, dy=dy)).mean() for dx, dy in shifts]
        assert shifts[int(np.argmin(ds))] == (0, 0), (i, ds)     # best match: no shift
        assert d0 < 6 and d1 > 4 * d0, (i, d0, d1)


# ---------------------------------------------------------------------------------------------
# slide thumbnails (thumbnails/<sample>.png + thumbnail_scale)
# ---------------------------------------------------------------------------------------------
def _thumb_red_centroid(t: np.ndarray):
    r = (t[..., 0] > 150) & (t[..., 1] < 110) & (t[..., 2] < 130)
    ys, xs = np.nonzero(r)
    return xs.mean(), ys.mean(), r.sum()


@pytest.mark.parametrize("fmt,pyramidal,region,max_side", [
    ("png", False, False, 300),      # PIL slide, factor 4
    ("tif", False, True, 250),       # big flat TIFF read by bands, factor 5
    ("tif", True, True, 300),        # pyramid level 1/4 used directly
    ("tif", True, True, 250),        # pyramid level 1/4 resampled to 1/5
])
def test_thumbnail_written_with_scale(tmp_path, monkeypatch, fmt, pyramidal, region, max_side):
    v = make_visium(tmp_path / "S", image_fmt=fmt, pyramidal=pyramidal)
    monkeypatch.setattr(thumbnails, "THUMBNAIL_MAX_SIDE", max_side)
    if region:
        monkeypatch.setattr(slides, "MAX_INMEMORY_IMAGE_BYTES", 0)
        monkeypatch.setattr(slides, "SUPER_TILE_PX", 256)
        monkeypatch.setattr(slides, "THUMBNAIL_BAND_BYTES", 1)      # one block row per band
    with pytest.warns(ImporterWarning):
        s = import_dataset(v["root"], tmp_path / "o", target_um_per_px=1.0, progress=False)
    f = -(-W // max_side)
    scale = 1.0 / f
    smp = s["samples"]["S"]
    assert smp["image_read"] == ("region" if region else "memory")
    thumb = tmp_path / "o" / "thumbnails" / "S.png"
    assert smp["thumbnail"] == str(thumb) and smp["thumbnail_scale"] == pytest.approx(scale)
    im = Image.open(thumb)
    assert im.size == (-(-W // f), -(-H // f)) and max(im.size) <= max_side
    assert float(im.text["hexpr_thumbnail_scale"]) == pytest.approx(scale)
    t = np.asarray(im.convert("RGB"))
    _, bc, coords, attrs, a = _read_out(tmp_path / "o", "S")
    assert attrs["thumbnail"] == "thumbnails/S.png" and attrs["thumbnail_scale"] == pytest.approx(scale)
    prov = a.uns["hexpr_import"]
    assert prov["thumbnail"] == "thumbnails/S.png" and prov["thumbnail_scale"] == pytest.approx(scale)
    # the planted marker (centred on the MARK spot) lands at coords * scale in the thumbnail
    mark = coords[bc.index(v["barcodes"][v["xy"].tolist().index(list(map(float, MARK)))])]
    cx, cy, n = _thumb_red_centroid(t)
    # pixel-index centroid of the marker = continuous centre - 0.5; continuous centre = (coord + 0.5) * scale
    assert abs(cx + 0.5 - (mark[0] + 0.5) * scale) < 0.6 and abs(cy + 0.5 - (mark[1] + 0.5) * scale) < 0.6
    assert n == pytest.approx((2 * MARK_HALF + 1) ** 2 * scale ** 2, rel=0.5)
    # the rest of the slide is reduced too: blank glass white, tissue grey-blue
    assert (t[-3:, -3:] > 240).all() and abs(float(t[20, 20, 2]) - 200) < 10


def test_thumbnail_factor_and_block_mean():
    assert slides.thumbnail_factor(9270, 9936) == 5 and slides.thumbnail_factor(1000, 800) == 1
    a = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    b = slides.block_mean(a, 2)
    assert b.shape == (3, 4, 3)
    assert b[0, 0, 0] == round(a[:2, :2, 0].mean()) and b[2, 3, 1] == a[4, 6, 1]   # edge replicated
