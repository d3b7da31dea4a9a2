"""10x Visium HD (Space Ranger output), bins pooled into square tiles of a chosen size.

    <outs>/binned_outputs/square_002um|008um|016um/
        filtered_feature_bc_matrix.h5          10x HDF5, one barcode per bin (in-tissue bins)
        spatial/tissue_positions.parquet       barcode, in_tissue, array_row, array_col,
                                               pxl_row_in_fullres, pxl_col_in_fullres
        spatial/scalefactors_json.json         microns_per_pixel, bin_size_um, spot_diameter_fullres
    <outs>/feature_slice.h5                    attrs metadata_json -> hd_layout_json -> file_format
    full-resolution H&E                        image=..., or <outs>/microscope_image/<one file>, or the one
                                               slide image in <outs> or its parent

Coordinates: a bin's centre is (pxl_col_in_fullres, pxl_row_in_fullres) in full-resolution H&E pixels
(x = column, y = row), the same numbers spatialdata-io places its bin shapes at.  Tiles are squares
of the bin array: with ``k = tile_um / bin_um`` bins a side, bin (array_row, array_col) belongs to
tile (array_row // k, array_col // k).  The bin level is the one equal to the tile, else the finest
level that divides it.  A tile's centre in pixels comes from its bins' pixel centres and the local
array -> pixel map (a least-squares affine over all bins), so a tile at the tissue edge is still
centred on its whole square.  Patches are axis-aligned squares of patch_um around that centre.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ImporterError, warn
from .names import positions_in
from .options import given_file
from .sample import SampleData, SampleSpec
from .slide_image import open_image
from .tenx_h5 import TenxH5
from .tiles import DEFAULT_MIN_TILE_COUNTS, TileGrid, TileSums, counts_summary, tile_ids
from .visium import find_fullres_image

BIN_FOLDER = re.compile(r"^square_(\d{3})um$")
KNOWN_HD_LAYOUT_FORMATS = ("1.0",)
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def hd_root(folder: Path | str) -> Path | None:
    """The folder holding binned_outputs/ (``folder`` or ``folder/outs``), None when neither does."""
    folder = Path(folder)
    for d in (folder, folder / "outs"):
        if (d / "binned_outputs").is_dir():
            return d
    return None


def is_visium_hd(folder: Path) -> bool:
    return hd_root(folder) is not None


def bin_levels(root: Path) -> dict[int, Path]:
    """{bin size in µm: its square_NNNum folder} for the levels that have a matrix and positions."""
    levels = {}
    for d in sorted((root / "binned_outputs").iterdir()):
        m = BIN_FOLDER.match(d.name)
        if m and (d / "filtered_feature_bc_matrix.h5").is_file() and (d / "spatial" / "tissue_positions.parquet").is_file():
            levels[int(m.group(1))] = d
    if not levels:
        raise ImporterError(f"{root / 'binned_outputs'}: no square_NNNum folder with filtered_feature_bc_matrix.h5 "
                            f"and spatial/tissue_positions.parquet")
    return levels


def choose_level(levels: dict[int, Path], tile_um: float) -> tuple[int, int]:
    """(bin µm, bins per tile side): the level equal to the tile, else the finest that divides it."""
    sizes = sorted(levels)
    if tile_um < sizes[0] - 1e-9:
        raise ImporterError(f"tile_um={tile_um:g} is smaller than the finest bin ({sizes[0]} µm) of this Visium HD "
                            f"output; use --tile-um {sizes[0]} or larger (a multiple of one of {sizes})")
    equal = [b for b in sizes if abs(tile_um - b) < 1e-9]           # a level equal to the tile keeps its bins
    for b in equal + sizes:
        k = tile_um / b
        if abs(k - round(k)) < 1e-9:
            return b, int(round(k))
    raise ImporterError(f"tile_um={tile_um:g} is not a multiple of any bin size of this output ({sizes} µm); "
                        f"use a multiple such as {sizes[0] * max(1, int(tile_um // sizes[0]))}")


def read_scalefactors(level_dir: Path, root: Path) -> tuple[dict, Path | None]:
    for p in (level_dir / "spatial" / "scalefactors_json.json", root / "spatial" / "scalefactors_json.json"):
        if p.is_file():
            try:
                return json.loads(p.read_text()), p
            except Exception as e:  # noqa: BLE001
                raise ImporterError(f"cannot read {p}: {e}") from e
    return {}, None


def hd_scale(level_dir: Path, root: Path, bin_um: int, given: float | None, sid: str,
             msgs: list[str]) -> tuple[float, dict]:
    """µm per full-resolution pixel: given, else microns_per_pixel, else bin_size_um / spot_diameter_fullres."""
    sf, path = read_scalefactors(level_dir, root)
    from_sf, how = None, ""
    if sf.get("microns_per_pixel"):
        from_sf, how = float(sf["microns_per_pixel"]), "scalefactors microns_per_pixel"
    elif sf.get("spot_diameter_fullres"):
        from_sf = float(sf.get("bin_size_um", bin_um)) / float(sf["spot_diameter_fullres"])
        how = "scalefactors bin_size_um / spot_diameter_fullres"
    if given is not None:
        scale = {"method": "given", "um_per_px": float(given)}
        if from_sf is not None:
            scale["scalefactors_um_per_px"] = from_sf
            if abs(from_sf - given) > 0.15 * given:
                warn(msgs, f"{sid}: given source_um_per_px={given} differs from {how} = {from_sf:.4f} by more than 15%")
        return float(given), scale
    if from_sf is None:
        raise ImporterError(f"{sid}: the image scale is unknown: no microns_per_pixel in "
                            f"{path or level_dir / 'spatial' / 'scalefactors_json.json'}; pass source_um_per_px=...")
    return from_sf, {"method": how, "um_per_px": from_sf, "file": str(path)}


def hd_layout_format(root: Path, msgs: list[str]) -> str:
    """file_format of feature_slice.h5's hd_layout ('' when the file is absent); unknown ones warned."""
    cands = sorted(root.glob("*feature_slice.h5"))
    if not cands:
        return ""
    try:
        with h5py.File(cands[0], "r") as f:
            meta = json.loads(f.attrs["metadata_json"])
        layout = json.loads(meta["hd_layout_json"]) if isinstance(meta.get("hd_layout_json"), str) else meta["hd_layout_json"]
        fmt = str(layout.get("file_format", ""))
    except Exception as e:  # noqa: BLE001
        warn(msgs, f"{cands[0]}: cannot read the hd_layout file format ({e}); the bins are read from "
                   f"binned_outputs/ as for format {KNOWN_HD_LAYOUT_FORMATS[-1]}")
        return "unreadable"
    if fmt not in KNOWN_HD_LAYOUT_FORMATS:
        warn(msgs, f"{cands[0]}: unknown hd_layout file_format {fmt!r} (known: {list(KNOWN_HD_LAYOUT_FORMATS)}); "
                   f"the bins are read from binned_outputs/ as for format {KNOWN_HD_LAYOUT_FORMATS[-1]}; "
                   f"check the imported tiles against the H&E")
    return fmt


def find_hd_image(root: Path, image: Path | str | None) -> Path:
    if image is not None:
        return given_file(image, "image")
    mdir = root / "microscope_image"
    if mdir.is_dir():
        files = sorted(p for p in mdir.iterdir() if p.is_file() and not p.name.startswith("."))
        if len(files) == 1:
            return files[0]
    try:
        return find_fullres_image(root)
    except ImporterError as e:
        raise ImporterError(f"no H&E image for the Visium HD output {root}: pass --image (the full-resolution "
                            f"microscope image given to Space Ranger); {e}") from e


def read_positions(path: Path) -> pa.Table:
    try:
        t = pq.read_table(path, columns=POSITION_COLUMNS)
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"cannot read bin positions {path}: {e} (expected columns {POSITION_COLUMNS})") from e
    return t


def _hd_files(folder: Path | str, tile_um: float, image: Path | str | None) -> dict:
    root = hd_root(folder)
    if root is None:
        raise ImporterError(f"{folder} is not a Visium HD output: binned_outputs/ is missing")
    levels = bin_levels(root)
    bin_um, k = choose_level(levels, tile_um)
    level = levels[bin_um]
    return {"root": root, "level_dir": level, "bin_um": bin_um, "k": k, "levels": sorted(levels),
            "matrix": level / "filtered_feature_bc_matrix.h5",
            "positions": level / "spatial" / "tissue_positions.parquet", "image": find_hd_image(root, image)}


def _join_positions(matrix: TenxH5, table: pa.Table, files: dict, sid: str, msgs: list[str]) -> dict[str, np.ndarray]:
    """Per matrix barcode: its row in positions (-1: none or off tissue), array row/col, pixel x/y."""
    idx = positions_in(matrix.barcodes, table.column("barcode"))
    n_nopos = int((idx < 0).sum())
    if n_nopos == len(idx):
        raise ImporterError(f"{sid}: no barcode of {files['matrix']} is in {files['positions']}; check that both "
                            f"come from the same bin level of the same run")
    if n_nopos:
        warn(msgs, f"{sid}: {n_nopos} bin(s) of {files['matrix']} have no position in {files['positions']} and are skipped")
    col = {c: table.column(c).to_numpy() for c in POSITION_COLUMNS[1:]}
    safe = np.maximum(idx, 0)
    in_tissue = col["in_tissue"][safe].astype(np.int64) == 1
    n_off = int(((idx >= 0) & ~in_tissue).sum())
    if n_off:
        warn(msgs, f"{sid}: {n_off} bin(s) with counts are marked in_tissue=0 and are skipped")
    ok = (idx >= 0) & in_tissue
    return {"ok": ok, "row": col["array_row"][safe].astype(np.int64), "col": col["array_col"][safe].astype(np.int64),
            "x": col["pxl_col_in_fullres"][safe].astype(np.float64), "y": col["pxl_row_in_fullres"][safe].astype(np.float64)}


def _check_inside_image(image_path: Path, x: np.ndarray, y: np.ndarray, sid: str, msgs: list[str]) -> list[int]:
    img = open_image(image_path, msgs, max_inmemory_bytes=0)     # the size only: nothing decoded
    try:
        W, H = int(img.width), int(img.height)
    finally:
        img.close()
    out = (x < 0) | (x >= W) | (y < 0) | (y >= H)
    if out.any():
        raise ImporterError(
            f"{sid}: {int(out.sum())} of {len(x)} bin centres lie outside the {W}x{H} image {image_path} (x "
            f"{x.min():.0f}..{x.max():.0f}, y {y.min():.0f}..{y.max():.0f} px); the bin positions are for the "
            f"full-resolution H&E given to Space Ranger: pass that image with --image")
    return [W, H]


def array_to_pixel(col: np.ndarray, row: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares linear part (2x2: pixels per array step along col, row) of the array -> pixel map,
    and the largest residual in pixels."""
    n = len(col)
    sel = np.linspace(0, n - 1, min(n, 200_000)).astype(np.int64)
    A = np.c_[col[sel], row[sel], np.ones(len(sel))].astype(np.float64)
    coef, *_ = np.linalg.lstsq(A, np.c_[x[sel], y[sel]], rcond=None)
    resid = float(np.abs(A @ coef - np.c_[x[sel], y[sel]]).max()) if len(sel) else 0.0
    return coef[:2].T, resid


def load_visium_hd(folder: Path | str, *, tile_um: float, image: Path | str | None = None,
                   sample_id: str | None = None, source_um_per_px: float | None = None,
                   min_tile_counts: int = DEFAULT_MIN_TILE_COUNTS) -> SampleData:
    """Read one Visium HD output and pool its bins into tiles of ``tile_um`` µm."""
    t0 = time.perf_counter()
    files = _hd_files(folder, tile_um, image)
    root, bin_um, k = files["root"], files["bin_um"], files["k"]
    sid = sample_id or default_sample_id(root)
    msgs: list[str] = []
    layout_fmt = hd_layout_format(root, msgs)
    matrix = TenxH5.open(files["matrix"])
    pos = _join_positions(matrix, read_positions(files["positions"]), files, sid, msgs)
    ok = pos["ok"]
    image_size = _check_inside_image(files["image"], pos["x"][ok], pos["y"][ok], sid, msgs)
    mpp, scale = hd_scale(files["level_dir"], root, bin_um, source_um_per_px, sid, msgs)
    t_read = time.perf_counter()

    okix = np.flatnonzero(ok)
    grid = TileGrid.from_indices(pos["row"][okix] // k, pos["col"][okix] // k)
    keys = np.full(len(ok), -1, np.int64)
    keys[okix] = grid.key
    gene_cols = matrix.gene_columns()
    sums = TileSums(grid.n_tiles, len(gene_cols))
    for a, b, chunk in matrix.row_chunks():
        sums.add(chunk[:, gene_cols], keys[a:b])
    counts = sums.result()
    totals = np.asarray(counts.sum(axis=1)).ravel()
    t_pool = time.perf_counter()

    L, resid = array_to_pixel(pos["col"][okix], pos["row"][okix], pos["x"][okix], pos["y"][okix])
    tile_frame = np.c_[grid.cols * k + (k - 1) / 2.0, grid.rows * k + (k - 1) / 2.0]
    centres = grid.centres(np.c_[pos["x"][okix], pos["y"][okix]],
                           np.c_[pos["col"][okix], pos["row"][okix]].astype(np.float64), tile_frame, L)
    n_members = grid.members()
    keep = totals >= min_tile_counts
    n_low = int((~keep).sum())
    if n_low:
        warn(msgs, f"{sid}: {n_low} of {grid.n_tiles} tile(s) have fewer than {min_tile_counts} counts and are "
                   f"dropped (min_tile_counts)")
    if not keep.any():
        raise ImporterError(f"{sid}: every tile has fewer than {min_tile_counts} counts; lower min_tile_counts or "
                            f"use a larger tile_um")
    kk = np.flatnonzero(keep)
    if k == 1:      # tiles are the bins: keep their barcodes
        first = np.full(grid.n_tiles, -1, np.int64)
        first[grid.key] = okix
        ids = [matrix.barcodes[i] for i in first[kk]]
    else:
        ids = tile_ids(f"tile{tile_um:g}um", grid.rows[kk], grid.cols[kk])
    obs = pd.DataFrame({"tile_row": grid.rows[kk], "tile_col": grid.cols[kk], "n_bins": n_members[kk],
                        "total_counts": totals[kk]})
    dropped = matrix.dropped_features()
    if dropped:
        warn(msgs, f"{sid}: non-gene-expression features excluded: {dropped}")
    provenance = {
        "technology": "10x Visium HD", "platform": "visium_hd", "bin_um": bin_um, "bin_levels_available": files["levels"],
        "tile_um": float(tile_um), "bins_per_tile_side": k, "um_per_px": mpp, "hd_layout_file_format": layout_fmt,
        "tile_grid": "bin (array_row, array_col) -> tile (array_row // k, array_col // k); centre from the bins' "
                     "pixel centres (pxl_col_in_fullres, pxl_row_in_fullres)",
        "array_to_pixel_px_per_bin": L.tolist(), "array_to_pixel_max_residual_px": resid,
        "n_bins": int(len(okix)), "n_bins_skipped": int(len(ok) - len(okix)), "n_tiles": int(grid.n_tiles),
        "n_tiles_low_counts_dropped": n_low, "min_tile_counts": int(min_tile_counts),
        "counts_per_tile": counts_summary(totals[kk]), "bins_per_tile": counts_summary(n_members[kk]),
        "dropped_features": dropped, "image_size": image_size,
        "seconds": {"read_positions_and_join": round(t_read - t0, 3), "pool_counts": round(t_pool - t_read, 3),
                    "tile_centres": round(time.perf_counter() - t_pool, 3)},
    }
    genes = matrix.genes()
    return SampleData(
        sample_id=sid, barcodes=ids, genes=genes, counts=counts[kk], coords=centres[kk], source_um_per_px=mpp,
        scale_info=scale, image_path=files["image"], obs=obs,
        source_files={k_: str(v) for k_, v in files.items() if k_ in ("root", "matrix", "positions", "image")},
        provenance=provenance, warnings=msgs,
        counts_info={"n_bins": int(len(okix)), "n_genes": len(genes), "n_tiles": int(len(kk))},
    )


def default_sample_id(root: Path) -> str:
    return root.parent.name if root.name == "outs" else root.name


def visium_hd_spec(folder: Path | str, *, tile_um: float, image: Path | str | None = None,
                   sample_id: str | None = None, source_um_per_px: float | None = None,
                   min_tile_counts: int = DEFAULT_MIN_TILE_COUNTS) -> SampleSpec:
    files = _hd_files(folder, tile_um, image)        # fail early: level, image
    sid = sample_id or default_sample_id(files["root"])
    return SampleSpec(sample_id=sid, kind="visium_hd", genes=TenxH5.open(files["matrix"], barcodes=False).genes(),
                      load=lambda: load_visium_hd(folder, tile_um=tile_um, image=image, sample_id=sid,
                                                  source_um_per_px=source_um_per_px, min_tile_counts=min_tile_counts),
                      source_files={k: str(v) for k, v in files.items() if k in ("matrix", "positions", "image")})
