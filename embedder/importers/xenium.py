"""10x Xenium output with a post-run H&E, cells pooled into square tiles or kept one per observation.

    <folder>/experiment.xenium          JSON manifest; pixel_size = µm per morphology-image pixel
    <folder>/cell_feature_matrix.h5     10x HDF5, one barcode per cell; control probes, control and
                                        unassigned codewords are excluded (counted in the report)
    <folder>/cells.parquet              cell_id, x_centroid, y_centroid (µm, Xenium frame)
    <folder>/transcripts.parquet        optional; recorded, not needed (tiles pool the cell matrix)
    H&E image                           image=..., or the one *he_image*.ome.tif / slide image in <folder>
    registration                        alignment=..., or the one *alignment.csv / *keypoints.csv in <folder>:
      - 10x alignment matrix CSV: 3x3, no header, H&E pixel (x, y, 1) -> morphology pixel;
      - Xenium Explorer keypoints CSV: fixedX, fixedY (Xenium µm), alignmentX, alignmentY (H&E px);
        an affine is fitted by least squares (3 keypoints or more) and its residual recorded.

Coordinates: Xenium µm -> morphology px is a division by pixel_size; the alignment matrix is inverted
to place µm positions on the H&E.  Tiles are squares of the Xenium µm frame: cell (x, y) belongs to
tile (floor(y / tile_um), floor(x / tile_um)); the tile centre ((col + 0.5), (row + 0.5)) * tile_um
is mapped to the H&E.  With ``tile_um=None`` every cell is one observation centred on its centroid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hexpr.embedder.slides import SLIDE_SUFFIXES

from .errors import ImporterError, warn
from .names import positions_in
from .options import given_file
from .sample import SampleData, SampleSpec
from .slide_image import open_image
from .tenx_h5 import TenxH5
from .tiles import DEFAULT_MIN_TILE_COUNTS, TileGrid, TileSums, counts_summary, tile_ids

MIN_KEYPOINTS = 3
KEYPOINT_COLUMNS = ("fixedX", "fixedY", "alignmentX", "alignmentY")


def is_xenium(folder: Path) -> bool:
    return (folder / "experiment.xenium").is_file() or (
        (folder / "cell_feature_matrix.h5").is_file() and (folder / "cells.parquet").is_file())


def read_pixel_size(folder: Path) -> float:
    path = folder / "experiment.xenium"
    if not path.is_file():
        raise ImporterError(f"{path} not found: the Xenium manifest gives pixel_size (µm per morphology pixel)")
    try:
        v = float(json.loads(path.read_text())["pixel_size"])
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"{path}: cannot read pixel_size ({e}); it must be a JSON manifest with pixel_size") from e
    if not v > 0:
        raise ImporterError(f"{path}: pixel_size={v} must be positive")
    return v


def find_he_image(folder: Path, image: Path | str | None) -> Path:
    if image is not None:
        return given_file(image, "image")
    cands = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in SLIDE_SUFFIXES and "morphology" not in p.name)
    he = [p for p in cands if "he_image" in p.name] or cands
    if len(he) == 1:
        return he[0]
    if not he:
        raise ImporterError(f"no H&E image in the Xenium output {folder}: pass --image (the post-run H&E) and "
                            f"--alignment (its registration to the morphology image)")
    raise ImporterError(f"several images in {folder}: {[p.name for p in he]}; pass --image")


def find_alignment(folder: Path, alignment: Path | str | None) -> Path:
    if alignment is not None:
        return given_file(alignment, "alignment")
    cands = sorted(p for p in folder.glob("*.csv") if "alignment" in p.name or "keypoints" in p.name)
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise ImporterError(f"no alignment for the H&E in the Xenium output {folder}: pass --alignment with the "
                            f"10x H&E alignment matrix CSV (3x3, H&E px -> morphology px) or a Xenium Explorer "
                            f"keypoints CSV ({', '.join(KEYPOINT_COLUMNS)})")
    raise ImporterError(f"several alignment files in {folder}: {[p.name for p in cands]}; pass --alignment")


def read_alignment(path: Path, pixel_size: float) -> tuple[np.ndarray, dict]:
    """(3x3 affine H&E px -> morphology px, record) from a matrix CSV or a keypoints CSV."""
    try:
        head = pd.read_csv(path, nrows=1, header=None)
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"cannot read alignment {path}: {e}") from e
    first = [str(v).strip() for v in head.iloc[0]]
    if all(c in first for c in KEYPOINT_COLUMNS):
        return _keypoint_alignment(path, pixel_size)
    try:
        m = pd.read_csv(path, header=None).to_numpy(np.float64)
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"{path}: not a 3x3 numeric alignment matrix ({e})") from e
    if m.shape != (3, 3) or not np.isfinite(m).all() or abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise ImporterError(f"{path}: expected a 3x3 invertible matrix (H&E px -> morphology px, no header), got "
                            f"shape {m.shape}")
    if not np.allclose(m[2], [0, 0, 1], atol=1e-9):
        raise ImporterError(f"{path}: the last row must be 0, 0, 1 (an affine alignment); got {m[2].tolist()}")
    return m, {"method": "10x alignment matrix (H&E px -> morphology px)", "file": str(path), "matrix": m.tolist()}


def _keypoint_alignment(path: Path, pixel_size: float) -> tuple[np.ndarray, dict]:
    kp = pd.read_csv(path)
    pts = kp[list(KEYPOINT_COLUMNS)].apply(pd.to_numeric, errors="coerce").dropna().to_numpy(np.float64)
    if len(pts) < MIN_KEYPOINTS:
        raise ImporterError(f"{path}: {len(pts)} usable keypoint(s); at least {MIN_KEYPOINTS} are needed")
    he = np.c_[pts[:, 2], pts[:, 3], np.ones(len(pts))]
    coef, *_ = np.linalg.lstsq(he, pts[:, :2], rcond=None)       # H&E px -> µm
    resid = float(np.sqrt(((he @ coef - pts[:, :2]) ** 2).sum(axis=1)).max())
    m = np.eye(3)
    m[:2, :] = coef.T / pixel_size                                   # -> morphology px
    if abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise ImporterError(f"{path}: the keypoints are collinear; place them around the tissue")
    return m, {"method": "Xenium Explorer keypoints (fixed = Xenium µm, alignment = H&E px), affine least squares",
               "file": str(path), "n_keypoints": int(len(pts)), "max_residual_um": resid, "matrix": m.tolist()}


def um_to_he_px(xy_um: np.ndarray, he_to_morph: np.ndarray, pixel_size: float) -> np.ndarray:
    """Xenium µm (x, y) -> H&E pixel (x, y) through the inverse of the alignment."""
    inv = np.linalg.inv(he_to_morph)
    p = np.c_[xy_um / pixel_size, np.ones(len(xy_um))] @ inv.T
    return p[:, :2] / p[:, 2:3]


def read_cells(path: Path) -> tuple[pa.Array, np.ndarray]:
    try:
        t = pq.read_table(path, columns=["cell_id", "x_centroid", "y_centroid"])
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"cannot read cells {path}: {e} (needs cell_id, x_centroid, y_centroid)") from e
    ids = t.column("cell_id")
    ids = pc.cast(ids, pa.string()) if not pa.types.is_binary(ids.type) else pa.array(
        [b.decode() if isinstance(b, bytes) else str(b) for b in ids.to_pylist()], pa.string())
    xy = np.c_[t.column("x_centroid").to_numpy(), t.column("y_centroid").to_numpy()].astype(np.float64)
    return ids, xy


def _xenium_files(folder: Path | str, image, alignment) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ImporterError(f"Xenium folder not found: {folder}")
    files = {"folder": folder, "manifest": folder / "experiment.xenium", "matrix": folder / "cell_feature_matrix.h5",
             "cells": folder / "cells.parquet"}
    for k in ("manifest", "matrix", "cells"):
        if not files[k].is_file():
            raise ImporterError(f"{files[k]} not found (a Xenium output holds experiment.xenium, "
                                f"cell_feature_matrix.h5 and cells.parquet)")
    files["image"] = find_he_image(folder, image)
    files["alignment"] = find_alignment(folder, alignment)
    if (folder / "transcripts.parquet").is_file():
        files["transcripts"] = folder / "transcripts.parquet"
    return files


def load_xenium(folder: Path | str, *, tile_um: float | None, image: Path | str | None = None,
                alignment: Path | str | None = None, sample_id: str | None = None,
                min_tile_counts: int = DEFAULT_MIN_TILE_COUNTS) -> SampleData:
    """Read one Xenium output: cells pooled into tiles of ``tile_um`` µm (None: one observation per cell)."""
    files = _xenium_files(folder, image, alignment)
    sid = sample_id or files["folder"].name
    msgs: list[str] = []
    ps = read_pixel_size(files["folder"])
    M, reg = read_alignment(files["alignment"], ps)
    matrix = TenxH5.open(files["matrix"])
    cell_ids, cell_um = read_cells(files["cells"])
    idx = positions_in(matrix.barcodes, cell_ids)
    n_nopos = int((idx < 0).sum())
    if n_nopos == len(idx):
        raise ImporterError(f"{sid}: no cell of {files['matrix']} is in {files['cells']}; check both are from one run")
    if n_nopos:
        warn(msgs, f"{sid}: {n_nopos} cell(s) of {files['matrix']} have no centroid in {files['cells']} and are skipped")
    okix = np.flatnonzero(idx >= 0)
    xy_um = cell_um[idx[okix]]
    xy_px = um_to_he_px(xy_um, M, ps)
    img = open_image(files["image"], msgs, max_inmemory_bytes=0)     # the size only: nothing decoded
    W, H = int(img.width), int(img.height)
    img.close()
    out = (xy_px[:, 0] < 0) | (xy_px[:, 0] >= W) | (xy_px[:, 1] < 0) | (xy_px[:, 1] >= H)
    if out.any():
        raise ImporterError(
            f"{sid}: {int(out.sum())} of {len(out)} cell centroids fall outside the {W}x{H} H&E {files['image']} "
            f"through {files['alignment']} (x {xy_px[:, 0].min():.0f}..{xy_px[:, 0].max():.0f}, y "
            f"{xy_px[:, 1].min():.0f}..{xy_px[:, 1].max():.0f} px); check that the alignment belongs to this image")

    per_cell = tile_um is None
    if per_cell:
        grid = TileGrid(np.arange(len(okix)), np.arange(len(okix)), np.zeros(len(okix), np.int64))
        centres = xy_px
    else:
        grid = TileGrid.from_indices(np.floor(xy_um[:, 1] / tile_um), np.floor(xy_um[:, 0] / tile_um))
        centres = um_to_he_px(np.c_[(grid.cols + 0.5) * tile_um, (grid.rows + 0.5) * tile_um], M, ps)
    keys = np.full(len(idx), -1, np.int64)
    keys[okix] = grid.key
    gene_cols = matrix.gene_columns()
    other_cols = np.setdiff1d(np.arange(matrix.n_features), gene_cols)
    sums = TileSums(grid.n_tiles, len(gene_cols))
    dropped_counts = np.zeros(len(other_cols), np.int64)
    for a, b, chunk in matrix.row_chunks():
        sums.add(chunk[:, gene_cols], keys[a:b])
        if len(other_cols):
            dropped_counts += np.asarray(chunk[:, other_cols].sum(axis=0), np.int64).ravel()
    counts = sums.result()
    totals = np.asarray(counts.sum(axis=1)).ravel()
    n_members = grid.members()
    keep = totals >= min_tile_counts
    n_low = int((~keep).sum())
    what = "cell" if per_cell else "tile"
    if n_low:
        warn(msgs, f"{sid}: {n_low} of {grid.n_tiles} {what}(s) have fewer than {min_tile_counts} counts and are "
                   f"dropped (min_tile_counts)")
    if not keep.any():
        raise ImporterError(f"{sid}: every {what} has fewer than {min_tile_counts} counts; lower min_tile_counts")
    kk = np.flatnonzero(keep)
    dropped = matrix.dropped_features()
    by_type: dict[str, int] = {}
    for j, c in zip(other_cols, dropped_counts):
        t = matrix.feature_types[j] if matrix.feature_types else "?"
        by_type[t] = by_type.get(t, 0) + int(c)
    if dropped:
        warn(msgs, f"{sid}: control / unassigned features excluded: {dropped} (their counts: {by_type})")
    if per_cell:
        ids = [matrix.barcodes[okix[i]] for i in kk]
        obs = pd.DataFrame({"x_um": xy_um[kk, 0], "y_um": xy_um[kk, 1], "total_counts": totals[kk]})
    else:
        ids = tile_ids(f"tile{tile_um:g}um", grid.rows[kk], grid.cols[kk])
        obs = pd.DataFrame({"tile_row": grid.rows[kk], "tile_col": grid.cols[kk], "n_cells": n_members[kk],
                            "total_counts": totals[kk]})
    he_mpp = float(np.sqrt(abs(np.linalg.det(M[:2, :2]))) * ps)     # µm per H&E pixel
    scale = {"method": "Xenium pixel_size x alignment scale", "um_per_px": he_mpp, "pixel_size": ps}
    provenance = {
        "technology": "10x Xenium", "platform": "xenium", "observation": what,
        "tile_um": float(tile_um) if tile_um is not None else "", "um_per_px": he_mpp, "morphology_pixel_size_um": ps,
        "registration": reg,
        "tile_grid": "" if per_cell else "cell (x, y) µm -> tile (floor(y / tile_um), floor(x / tile_um)); centre "
                                         "((col + 0.5), (row + 0.5)) * tile_um mapped through the inverse alignment",
        "n_cells": int(len(okix)), "n_cells_skipped": n_nopos, "n_tiles": int(grid.n_tiles),
        "n_tiles_low_counts_dropped": n_low, "min_tile_counts": int(min_tile_counts),
        "counts_per_tile": counts_summary(totals[kk]),
        "cells_per_tile": counts_summary(n_members[kk]) if not per_cell else "",
        "dropped_features": dropped, "dropped_feature_counts": by_type, "image_size": [W, H],
        "transcripts_file": str(files.get("transcripts", "")),
    }
    genes = matrix.genes()
    return SampleData(
        sample_id=sid, barcodes=ids, genes=genes, counts=counts[kk], coords=centres[kk], source_um_per_px=he_mpp,
        scale_info=scale, image_path=files["image"], obs=obs,
        source_files={k: str(v) for k, v in files.items()}, provenance=provenance, warnings=msgs,
        counts_info={"n_cells": int(len(okix)), "n_genes": len(genes), "n_observations": int(len(kk))},
    )


def xenium_spec(folder: Path | str, *, tile_um: float | None, image: Path | str | None = None,
                alignment: Path | str | None = None, sample_id: str | None = None,
                min_tile_counts: int = DEFAULT_MIN_TILE_COUNTS) -> SampleSpec:
    files = _xenium_files(folder, image, alignment)      # fail early: files, image, alignment
    read_pixel_size(files["folder"])
    sid = sample_id or files["folder"].name
    return SampleSpec(sample_id=sid, kind="xenium", genes=TenxH5.open(files["matrix"], barcodes=False).genes(),
                      load=lambda: load_xenium(folder, tile_um=tile_um, image=image, alignment=alignment,
                                               sample_id=sid, min_tile_counts=min_tile_counts),
                      source_files={k: str(v) for k, v in files.items()})
