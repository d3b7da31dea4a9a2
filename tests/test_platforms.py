"""Visium HD and Xenium imports: tiles hold exactly the bins / cells whose centres lie inside them,
at several tile sizes, on generated folders (no shared data needed) and on folders built from a real
her2st section; bad input is one clear error; spatialdata-io places the bins where hexpr does."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import HER2ST, needs_shared
from PIL import Image
from platform_folders import (
    Bins,
    her2st_section,
    pool_level,
    rotation,
    section_bins,
    section_cells,
    write_visium_hd,
    write_xenium,
    xenium_frame,
)
from typer.testing import CliRunner

from hexpr import pipeline
from hexpr.embedder.importers import DEFAULT_MIN_TILE_COUNTS, import_dataset

pytestmark = pytest.mark.filterwarnings("ignore::hexpr.embedder.importers.ImporterWarning")

MPP = 0.5
W, H = 1200, 1000
OFFSET = np.array([260.0, 180.0])
ANGLE = 5.0


def _capture_to_px(u, v):
    p = (np.c_[u, v] @ rotation(ANGLE).T) / MPP + OFFSET
    return p[:, 0], p[:, 1]


def _px_to_capture(x, y):
    uv = ((np.c_[x, y] - OFFSET) * MPP) @ rotation(ANGLE)
    return uv[:, 0], uv[:, 1]


def _slide(path: Path, w=W, h=H) -> Path:
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 255, np.uint8)
    img[h // 10:h * 9 // 10, w // 8:w * 11 // 12] = rng.integers(110, 200, size=(h * 9 // 10 - h // 10,
                                                                     w * 11 // 12 - w // 8, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return path


def _synthetic_bins(n=40, genes=40, seed=0) -> Bins:
    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    row, col = rr.ravel(), cc.ravel()
    keep = (row - n / 2) ** 2 + (col - n / 2) ** 2 < (n / 2) ** 2     # a round piece of tissue
    row, col = row[keep], col[keep]
    lam = 0.3 + 2.0 * (col[:, None] / n) * (np.arange(genes)[None, :] % 3)
    counts = sp.csr_matrix(rng.poisson(lam).astype(np.int64))
    x, y = _capture_to_px((col + 0.5) * 8, (row + 0.5) * 8)
    return Bins(8, row, col, x, y, counts)


@pytest.fixture(scope="module")
def hd_synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("hd") / "sampleHD" / "outs"
    b8 = _synthetic_bins()
    genes = [f"G{i}" for i in range(b8.counts.shape[1])]
    b16 = pool_level(b8, 2, _capture_to_px)
    write_visium_hd(root, [b8, b16], genes, MPP)
    image = _slide(root.parent / "he.png")
    return {"root": root, "image": image, "bins": b8, "genes": genes}


def _read(out: Path, sid: str):
    a = ad.read_h5ad(out / "st" / f"{sid}.h5ad")
    with h5py.File(out / "patches" / f"{sid}.h5", "r") as f:
        n_img = f["img"].shape[0]
        bc = [b.decode() for b in f["barcode"][:, 0]]
    assert bc == list(a.obs_names) and n_img == a.n_obs
    return a


def _members(centre_frame: np.ndarray, obs_frame: np.ndarray, tile_um: float) -> list[np.ndarray]:
    """Observations whose centre lies inside each tile (square of tile_um around each centre)."""
    out = []
    for c in centre_frame:
        d = np.abs(obs_frame - c)
        out.append(np.flatnonzero((d[:, 0] < tile_um / 2) & (d[:, 1] < tile_um / 2)))
    return out


def check_tiles(a, obs_frame: np.ndarray, obs_counts: sp.csr_matrix, genes: list[str], px_to_frame, tile_um: float,
                min_counts: int) -> None:
    """Every tile's raw counts equal the sum of the observations whose centres lie inside it; every
    observation is in at most one tile; observations in no kept tile make up only dropped tiles."""
    centre = np.c_[px_to_frame(a.obsm["spatial"][:, 0], a.obsm["spatial"][:, 1])]
    members = _members(centre, obs_frame, tile_um)
    cols = [genes.index(g) for g in a.var_names]
    got = sp.csr_matrix(a.layers["counts"])
    expect = sp.vstack([sp.csr_matrix(obs_counts[m][:, cols].sum(axis=0)) for m in members])
    assert (got != expect).nnz == 0
    assert all(len(m) for m in members)
    used = np.concatenate(members)
    assert len(used) == len(np.unique(used))
    assert (np.asarray(got.sum(axis=1)).ravel() >= min_counts).all()


@pytest.mark.parametrize("tile_um, level, k", [(8, 8, 1), (16, 16, 1), (24, 8, 3), (48, 8, 6)])
def test_hd_tiles_hold_the_bins_inside(hd_synthetic, tmp_path, tile_um, level, k):
    d = hd_synthetic
    out = tmp_path / "out"
    res = import_dataset(d["root"], out, image=d["image"], tile_um=tile_um, progress=False, min_tile_counts=5)
    assert res["kind"] == "visium_hd"
    a = _read(out, "sampleHD")
    prov = a.uns["hexpr_import"]
    assert (prov["platform"], prov["bin_um"], prov["bins_per_tile_side"], prov["tile_um"]) == ("visium_hd", level, k, tile_um)
    assert prov["um_per_px"] == pytest.approx(MPP)
    b = d["bins"]
    check_tiles(a, np.c_[(b.col + 0.5) * 8, (b.row + 0.5) * 8], b.counts, d["genes"], _px_to_capture, tile_um, 5)
    assert prov["counts_per_tile"]["n"] == a.n_obs
    if tile_um == 8:        # bins kept as they are, with their barcodes and positions
        assert set(a.obs_names) <= set(b.barcodes)
        pos = dict(zip(b.barcodes, np.c_[b.x, b.y]))
        np.testing.assert_allclose(np.vstack([pos[i] for i in a.obs_names]), a.obsm["spatial"], atol=1e-9)


def test_hd_min_tile_counts_drops_and_reports(hd_synthetic, tmp_path):
    d = hd_synthetic
    a0 = import_dataset(d["root"], tmp_path / "all", image=d["image"], tile_um=8, min_tile_counts=0, progress=False)
    a1 = import_dataset(d["root"], tmp_path / "some", image=d["image"], tile_um=8, min_tile_counts=60, progress=False)
    n0, n1 = a0["samples"]["sampleHD"]["n_patches"], a1["samples"]["sampleHD"]["n_patches"]
    totals = np.asarray(d["bins"].counts.sum(axis=1)).ravel()
    assert n0 == len(totals) and n1 == int((totals >= 60).sum()) < n0
    prov = _read(tmp_path / "some", "sampleHD").uns["hexpr_import"]
    assert prov["n_tiles_low_counts_dropped"] == n0 - n1 and prov["min_tile_counts"] == 60
    assert any("fewer than 60 counts" in w for w in a1["warnings"])


def test_cli_default_min_tile_counts_is_the_librarys():
    assert inspect.signature(pipeline.import_).parameters["min_tile_counts"].default == DEFAULT_MIN_TILE_COUNTS


def _cli_error(args, out: Path):
    r = CliRunner().invoke(pipeline.app, ["import", *map(str, args), "--out", str(out), "--quiet"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[0].startswith("Error:") and "Traceback" not in r.output
    assert not list(out.rglob("*.h5ad")) and not list(out.rglob("*.h5"))
    return " ".join(lines)


def test_hd_bad_input_is_one_error_and_nothing_written(hd_synthetic, tmp_path):
    d = hd_synthetic
    msg = _cli_error([d["root"], "--image", d["image"], "--tile-um", 4], tmp_path / "o1")
    assert "smaller than the finest bin" in msg
    msg = _cli_error([d["root"], "--image", d["image"], "--tile-um", 12], tmp_path / "o2")
    assert "not a multiple" in msg
    small = _slide(tmp_path / "small.png", 500, 400)
    msg = _cli_error([d["root"], "--image", small, "--tile-um", 16], tmp_path / "o3")
    assert "outside the 500x400 image" in msg
    bare = write_visium_hd(tmp_path / "bare" / "outs", [d["bins"]], d["genes"], MPP)     # no image beside it
    msg = _cli_error([bare, "--tile-um", 16], tmp_path / "o4")
    assert "no H&E image" in msg and "--image" in msg


def test_hd_unknown_layout_format_is_a_warning_naming_it(tmp_path):
    b8 = _synthetic_bins(n=12, genes=5)
    root = write_visium_hd(tmp_path / "hd", [b8], [f"G{i}" for i in range(5)], MPP, file_format="9.9")
    image = _slide(tmp_path / "he.png")
    with pytest.warns(UserWarning, match=r"unknown hd_layout file_format '9\.9'"):
        res = import_dataset(root, tmp_path / "out", image=image, tile_um=16, min_tile_counts=0, progress=False)
    assert _read(tmp_path / "out", "hd").uns["hexpr_import"]["hd_layout_file_format"] == "9.9"
    assert res["n_patches"] > 0


def test_spatialdata_io_places_every_bin_where_hexpr_does(hd_synthetic, tmp_path):
    sdio = pytest.importorskip("spatialdata_io")
    d = hd_synthetic
    import_dataset(d["root"], tmp_path / "out", image=d["image"], tile_um=8, min_tile_counts=0, progress=False)
    a = _read(tmp_path / "out", "sampleHD")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sdio.visium_hd(d["root"], load_segmentations_only=False, bin_size=8)
    table = sdata.tables["square_008um"]
    shapes = sdata.shapes["_square_008um"]
    assert table.n_obs == a.n_obs == len(d["bins"].row)
    centre = np.c_[shapes.geometry.centroid.x, shapes.geometry.centroid.y]
    by_instance = pd.DataFrame(centre, index=shapes.index)
    xy = by_instance.loc[table.obs["location_id"].to_numpy()].to_numpy()
    pos = pd.DataFrame(xy, index=table.obs_names.astype(str))
    np.testing.assert_allclose(pos.loc[a.obs_names].to_numpy(), a.obsm["spatial"], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(table[a.obs_names].X.sum(axis=1)).ravel(),
                                  np.asarray(a.layers["counts"].sum(axis=1)).ravel())


# ------------------------------------------------------------------------------------ Xenium

PIXEL_SIZE = 0.2125


def _synthetic_xenium(root: Path, deg=30.0, keypoints=False, n_cells=600, seed=0):
    """Cells in a 300 µm disc of the Xenium frame; H&E px -> morphology px = rotation + scale + shift."""
    rng = np.random.default_rng(seed)
    r = 150 * np.sqrt(rng.uniform(0, 1, n_cells))
    a = rng.uniform(0, 2 * np.pi, n_cells)
    xy_um = np.c_[400 + r * np.cos(a), 350 + r * np.sin(a)]
    genes = [f"G{i}" for i in range(20)] + ["NegControlProbe_1", "UnassignedCodeword_1", "NegControlCodeword_2"]
    types = ["Gene Expression"] * 20 + ["Negative Control Probe", "Unassigned Codeword", "Negative Control Codeword"]
    counts = sp.csr_matrix(rng.poisson(1.5, (n_cells, len(genes))).astype(np.int64))
    # H&E px = centre + R(deg) @ (µm - (400, 350)) / 0.5  ->  morphology px = µm / pixel_size
    R = rotation(deg)
    he_of_um = lambda p: (p - [400, 350]) @ R.T / MPP + [600, 500]     # noqa: E731
    um_of_he = lambda q: ((q - [600, 500]) * MPP) @ R + [400, 350]     # noqa: E731
    M = np.eye(3)
    M[:2, :2] = R.T * MPP / PIXEL_SIZE
    M[:2, 2] = (np.array([400, 350]) - (R.T * MPP) @ [600, 500]) / PIXEL_SIZE
    kp = None
    if keypoints:
        he = np.array([[300.0, 300.0], [900.0, 320.0], [620.0, 800.0], [450.0, 650.0]])
        kp = pd.DataFrame(np.c_[um_of_he(he), he], columns=["fixedX", "fixedY", "alignmentX", "alignmentY"])
    write_xenium(root, [f"cell{i:05d}" for i in range(n_cells)], xy_um, genes, counts, M, PIXEL_SIZE, types, kp)
    _slide(root / "he_image.png")
    return {"root": root, "xy_um": xy_um, "counts": counts, "genes": genes, "um_of_he": um_of_he, "he_of_um": he_of_um}


@pytest.fixture(scope="module")
def xenium_synthetic(tmp_path_factory):
    return _synthetic_xenium(tmp_path_factory.mktemp("xe") / "xen1")


@pytest.mark.parametrize("tile_um", [20, 56])
def test_xenium_tiles_hold_the_cells_inside(xenium_synthetic, tmp_path, tile_um):
    d = xenium_synthetic
    import_dataset(d["root"], tmp_path / "out", tile_um=tile_um, progress=False, min_tile_counts=1)
    a = _read(tmp_path / "out", "xen1")
    prov = a.uns["hexpr_import"]
    assert prov["platform"] == "xenium" and prov["tile_um"] == tile_um
    assert prov["um_per_px"] == pytest.approx(MPP)
    assert prov["dropped_features"] == {"Negative Control Probe": 1, "Unassigned Codeword": 1,
                                        "Negative Control Codeword": 1}
    assert sum(prov["dropped_feature_counts"].values()) == int(d["counts"][:, 20:].sum())
    assert list(a.var_names) == d["genes"][:20]
    px_to_um = lambda x, y: tuple(d["um_of_he"](np.c_[x, y]).T)      # noqa: E731
    check_tiles(a, d["xy_um"], d["counts"], d["genes"], px_to_um, tile_um, 1)


def test_xenium_per_cell_and_keypoints(xenium_synthetic, tmp_path):
    d = xenium_synthetic
    import_dataset(d["root"], tmp_path / "cells", per_cell=True, min_tile_counts=0, progress=False)
    a = _read(tmp_path / "cells", "xen1")
    assert a.n_obs == len(d["xy_um"])
    rows = [int(i[4:]) for i in a.obs_names]
    np.testing.assert_allclose(a.obsm["spatial"], d["he_of_um"](d["xy_um"][rows]), atol=1e-6)
    assert (sp.csr_matrix(a.layers["counts"]) != d["counts"][rows][:, :20]).nnz == 0
    kp = _synthetic_xenium(tmp_path / "kp" / "xen1", keypoints=True)
    import_dataset(kp["root"], tmp_path / "kpout", per_cell=True, min_tile_counts=0, progress=False)
    b = _read(tmp_path / "kpout", "xen1")
    np.testing.assert_allclose(b.obsm["spatial"], a.obsm["spatial"], atol=1e-6)
    assert "keypoints" in b.uns["hexpr_import"]["registration"]["method"]


def test_xenium_bad_input(xenium_synthetic, tmp_path):
    d = _synthetic_xenium(tmp_path / "x" / "xen2")
    (d["root"] / "he_imagealignment.csv").unlink()
    assert "no alignment for the H&E" in _cli_error([d["root"], "--tile-um", 40], tmp_path / "o1")
    small = _slide(tmp_path / "small.png", 400, 300)
    msg = _cli_error([xenium_synthetic["root"], "--image", small, "--tile-um", 40], tmp_path / "o2")
    assert "outside the 400x300 H&E" in msg
    (d["root"] / "he_image.png").unlink()
    assert "--image" in _cli_error([d["root"], "--tile-um", 40], tmp_path / "o3")


# ------------------------------------------------------------------------------------ her2st


@pytest.fixture(scope="module")
def c3(tmp_path_factory):
    from hexpr.embedder.importers import load_legacy_section

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_legacy_section(HER2ST, "C3")


def _crop(data, n_spots=16, n_genes=300):
    """A block of neighbouring spots and the most expressed genes (small, fast, real tissue)."""
    ax, ay = data.obs["array_x"].to_numpy(), data.obs["array_y"].to_numpy()
    cx, cy = np.median(ax), np.median(ay)
    spots = np.argsort((ax - cx) ** 2 + (ay - cy) ** 2, kind="stable")[:n_spots]
    genes = np.argsort(-np.asarray(data.counts.sum(axis=0)).ravel(), kind="stable")[:n_genes]
    return her2st_section(data, spots, np.sort(genes))


@needs_shared
def test_her2st_visium_hd_at_several_tile_sizes(c3, tmp_path):
    sec = _crop(c3)
    b8 = section_bins(sec)
    assert (np.asarray(b8.counts.sum(axis=0)).ravel() == np.asarray(sec.counts.sum(axis=0)).ravel()).all()
    root = write_visium_hd(tmp_path / "C3hd" / "outs", [b8, pool_level(b8, 2, sec.capture_to_px)], sec.genes,
                           sec.um_per_px)
    for tile_um in (8, 16, 56, 200):
        out = tmp_path / f"t{tile_um}"
        import_dataset(root, out, image=sec.image, tile_um=tile_um, min_tile_counts=3, progress=False)
        a = _read(out, "C3hd")
        check_tiles(a, np.c_[(b8.col + 0.5) * 8, (b8.row + 0.5) * 8], b8.counts, sec.genes, sec.px_to_capture,
                    tile_um, 3)
        if tile_um == 200:     # spots sit at the centres of 200 µm tiles: each tile is one whole spot
            assert a.n_obs == len(sec.u)
            assert int(a.layers["counts"].sum()) == int(sec.counts.sum())


@needs_shared
def test_her2st_xenium_with_rotation_and_scale(c3, tmp_path):
    sec = _crop(c3, n_spots=9, n_genes=200)
    uv, counts = section_cells(sec, cells_per_spot=20)
    M, to_xen = xenium_frame(sec, deg=35.0, shift_um=(500.0, -200.0), pixel_size=PIXEL_SIZE)
    xy = to_xen(uv)
    root = write_xenium(tmp_path / "C3xe", [f"c{i}" for i in range(len(xy))], xy, sec.genes, counts, M, PIXEL_SIZE)
    he_um_per_px = abs(np.linalg.det(M[:2, :2])) ** 0.5 * PIXEL_SIZE      # the H&E's scale through M
    assert he_um_per_px == pytest.approx(sec.um_per_px, rel=0.01)
    for tile_um in (30, 75):
        out = tmp_path / f"t{tile_um}"
        import_dataset(root, out, image=sec.image, tile_um=tile_um, min_tile_counts=1, progress=False)
        a = _read(out, "C3xe")

        def px_to_xen(x, y):
            p = np.c_[x, y, np.ones(len(x))] @ M.T
            return p[:, 0] * PIXEL_SIZE, p[:, 1] * PIXEL_SIZE

        check_tiles(a, xy, counts, sec.genes, px_to_xen, tile_um, 1)
        assert a.uns["hexpr_import"]["um_per_px"] == pytest.approx(he_um_per_px, rel=1e-9)


def _grid_section(root: Path, section: str, sec) -> Path:
    """A legacy-ST folder of one her2st section whose spot centres are moved onto the fitted spot grid
    (where the rebuilt platforms put them): the counts and the image are links to the originals."""
    for d in ("ST-cnts", "ST-spotfiles", f"ST-imgs/{section}"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "ST-cnts" / f"{section}.tsv.gz").symlink_to(HER2ST / "ST-cnts" / f"{section}.tsv.gz")
    (root / "ST-imgs" / section / sec.image.name).symlink_to(sec.image)
    spots = pd.read_csv(HER2ST / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
    xy = np.c_[spots["x"], spots["y"], np.ones(len(spots))] @ sec.coef
    spots["pixel_x"], spots["pixel_y"] = xy[:, 0], xy[:, 1]
    spots.to_csv(root / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t", index=False)
    return root


@needs_shared
@pytest.mark.slow
def test_a_head_trained_on_her2st_spots_predicts_hd_and_xenium_tiles_as_well(c3, tmp_path):
    """Ridge on MobileNetV2 features of B4, C2, C4 (the ordinary her2st import) predicts C3 rebuilt as
    Visium HD 8 µm bins and as Xenium cells (Xenium frame rotated 90° and shifted, scale through the
    alignment), imported as 200 µm tiles that each hold one whole spot, with the Pearson it has on
    C3's spots cut at the same places (her2st's spots sit up to 40 µm off a regular grid; the rebuilt
    platforms put them on it): within 0.03."""
    from conftest import MOBILENET_WEIGHTS

    from hexpr import workflow
    from hexpr.heads.base import make_head
    from hexpr.heads.metrics import pearson_per_gene, top_genes

    spec = f"mobilenetv2_100:weights={MOBILENET_WEIGHTS},pad_type=same,mean=0.5/0.5/0.5,std=0.5/0.5/0.5,size=112"
    specs = workflow.backbone_specs([spec], None, False)
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_dataset(HER2ST, tmp_path / "her2st", progress=False, sample_ids=["B4", "C2", "C4"])
        sec = her2st_section(c3)
        import_dataset(_grid_section(tmp_path / "c3grid", "C3", sec), tmp_path / "spots", progress=False)
    b8 = section_bins(sec)
    write_visium_hd(tmp_path / "C3hd" / "outs", [b8], sec.genes, sec.um_per_px)
    import_dataset(tmp_path / "C3hd", tmp_path / "hd", image=sec.image, tile_um=200, progress=False)
    uv, counts = section_cells(sec, cells_per_spot=20)
    n_rows = int(np.ceil(sec.v.max() / 200)) + 1
    M, to_xen = xenium_frame(sec, deg=90.0, shift_um=(200.0 * n_rows, 0.0), pixel_size=PIXEL_SIZE)
    write_xenium(tmp_path / "C3xe", [f"c{i}" for i in range(len(uv))], to_xen(uv), sec.genes, counts, M, PIXEL_SIZE)
    import_dataset(tmp_path / "C3xe", tmp_path / "xe", image=sec.image, tile_um=200, progress=False)

    def data(path):
        fs = workflow.embed(path, specs, cache, progress=False)
        a = {p.stem: ad.read_h5ad(p) for p in sorted((path / "st").glob("*.h5ad"))}
        expr = pd.concat([pd.DataFrame(np.asarray(x.X), index=[f"{s}/{b}" for b in x.obs_names], columns=x.var_names)
                          for s, x in a.items()], join="inner")
        return pd.DataFrame(fs.X, index=fs.ids), expr

    X, E = data(tmp_path / "her2st")
    E = E[[g for g in E.columns if g in set(sec.genes)]]          # genes C3 measures too
    genes = list(E.columns[top_genes(E.loc[X.index].to_numpy(), 50)])
    head = make_head("ridge").fit(X.to_numpy(), E.loc[X.index, genes].to_numpy())

    def pearson(path):
        Xt, Et = data(path)
        assert len(Xt) >= 0.98 * len(sec.u)          # one per spot, less any spot under min_tile_counts
        return pearson_per_gene(head.predict(Xt.to_numpy()), Et.loc[Xt.index, genes].to_numpy()).mean()

    r_spots = pearson(tmp_path / "spots")
    assert r_spots > 0.1
    for path in (tmp_path / "hd", tmp_path / "xe"):
        r_tiles = pearson(path)
        assert abs(r_tiles - r_spots) < 0.03, (path.name, r_tiles, r_spots)
