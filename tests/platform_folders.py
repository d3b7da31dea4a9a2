"""Writers of small Visium HD and Xenium output folders for the tests (the files 10x writes, as
spatialdata-io reads them), and their real-tissue versions built from a her2st section: each
spot's counts spread over the bins or cells inside it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp


def write_10x_h5(path: Path, barcodes, genes, counts, feature_types=None) -> None:
    """counts: (barcodes x features) sparse or dense; written CSC over barcodes like Space Ranger."""
    m = sp.csc_matrix(sp.csr_matrix(counts).T)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, np.int32)
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        ft = g.create_group("features")
        ft["name"] = np.array([s.encode() for s in genes])
        ft["id"] = np.array([f"ENSG{i:05d}".encode() for i in range(len(genes))])
        types = feature_types or ["Gene Expression"] * len(genes)
        ft["feature_type"] = np.array([t.encode() for t in types])
        ft["genome"] = np.array([b"GRCh38"] * len(genes))


@dataclass
class Bins:
    """One bin level: array row/col, full-resolution pixel centres, counts (bins x genes)."""

    size_um: int
    row: np.ndarray
    col: np.ndarray
    x: np.ndarray
    y: np.ndarray
    counts: sp.csr_matrix

    @property
    def barcodes(self) -> list[str]:
        return [f"s_{self.size_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(self.row, self.col)]


def write_visium_hd(root: Path, levels: list[Bins], genes: list[str], um_per_px: float,
                    file_format: str = "1.0") -> Path:
    """A Space Ranger Visium HD outs/ folder with the given bin levels (no images)."""
    for b in levels:
        d = root / "binned_outputs" / f"square_{b.size_um:03d}um"
        write_10x_h5(d / "filtered_feature_bc_matrix.h5", b.barcodes, genes, b.counts)
        (d / "spatial").mkdir(parents=True, exist_ok=True)
        table = pa.table({"barcode": pa.array(b.barcodes, pa.string()),
                          "in_tissue": pa.array(np.ones(len(b.row), np.int32)),
                          "array_row": pa.array(b.row.astype(np.int32)), "array_col": pa.array(b.col.astype(np.int32)),
                          "pxl_row_in_fullres": pa.array(b.y.astype(np.float64)),
                          "pxl_col_in_fullres": pa.array(b.x.astype(np.float64))})
        pq.write_table(table, d / "spatial" / "tissue_positions.parquet")
        (d / "spatial" / "scalefactors_json.json").write_text(json.dumps({
            "spot_diameter_fullres": b.size_um / um_per_px, "bin_size_um": float(b.size_um),
            "microns_per_pixel": um_per_px, "tissue_lowres_scalef": 0.01, "tissue_hires_scalef": 0.05,
            "fiducial_diameter_fullres": 100.0, "regist_target_img_scalef": 0.1}))
    layout = {"file_format": file_format, "transform": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    eye = [1, 0, 0, 0, 1, 0, 0, 0, 1]
    meta = {"hd_layout_json": json.dumps(layout), "transform_matrices": {
        k: eye for k in ("cytassist_colrow_to_spot_colrow", "spot_colrow_to_cytassist_colrow",
                         "microscope_colrow_to_spot_colrow", "spot_colrow_to_microscope_colrow")}}
    with h5py.File(root / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps(meta)
    return root


def pool_level(b: Bins, factor: int, array_to_px) -> Bins:
    """The next Space Ranger level: factor x factor bins summed (as square_016um from square_008um)."""
    r2, c2 = b.row // factor, b.col // factor
    keys, inv = np.unique(np.c_[r2, c2], axis=0, return_inverse=True)
    inv = inv.ravel()
    pool = sp.csr_matrix((np.ones(len(inv)), (inv, np.arange(len(inv)))), shape=(len(keys), len(inv)))
    counts = sp.csr_matrix(pool @ b.counts).astype(np.int64)
    size = b.size_um * factor
    x, y = array_to_px((keys[:, 1] + 0.5) * size, (keys[:, 0] + 0.5) * size)
    return Bins(size, keys[:, 0], keys[:, 1], x, y, counts)


def write_xenium(root: Path, cell_ids, xy_um: np.ndarray, genes: list[str], counts, he_to_morph: np.ndarray,
                 pixel_size: float, feature_types=None, keypoints: pd.DataFrame | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "experiment.xenium").write_text(json.dumps({"major_version": 5, "pixel_size": pixel_size,
                                                        "run_name": "test", "region_name": "r"}))
    write_10x_h5(root / "cell_feature_matrix.h5", list(cell_ids), genes, counts, feature_types)
    pq.write_table(pa.table({"cell_id": pa.array(list(cell_ids), pa.string()),
                             "x_centroid": pa.array(xy_um[:, 0]), "y_centroid": pa.array(xy_um[:, 1]),
                             "transcript_counts": pa.array(np.asarray(sp.csr_matrix(counts).sum(1)).ravel())}),
                   root / "cells.parquet")
    if keypoints is not None:
        keypoints.to_csv(root / "he_keypoints.csv", index=False)
    else:
        pd.DataFrame(he_to_morph).to_csv(root / "he_imagealignment.csv", header=False, index=False)
    return root


# ------------------------------------------------------------------------------------ her2st


@dataclass
class Section:
    """A her2st section's spots in a capture frame: spot i centred at (u[i], v[i]) µm."""

    counts: sp.csr_matrix
    genes: list[str]
    u: np.ndarray
    v: np.ndarray
    um_per_px: float
    image: Path
    coef: np.ndarray          # (3, 2): [array_x, array_y, 1] -> pixel (x, y)
    x0: float
    y0: float
    barcodes: list[str]

    def capture_to_px(self, u, v):
        """Capture-frame µm -> full-resolution pixel (x, y), through the section's spot-grid affine."""
        ax = np.asarray(u, float) / 200.0 + self.x0 - 0.5
        ay = np.asarray(v, float) / 200.0 + self.y0 - 0.5
        p = np.c_[ax, ay, np.ones(len(ax))] @ self.coef
        return p[:, 0], p[:, 1]

    def px_to_capture(self, x, y):
        A = np.r_[self.coef[:2].T]           # 2x2
        ax_ay = np.linalg.solve(A, (np.c_[x, y] - self.coef[2]).T).T
        return (ax_ay[:, 0] - self.x0 + 0.5) * 200.0, (ax_ay[:, 1] - self.y0 + 0.5) * 200.0


def her2st_section(data, spots=None, genes=None) -> Section:
    """``data``: a loaded legacy-ST SampleData; optional subsets of spot rows and gene columns."""
    ax, ay = data.obs["array_x"].to_numpy(float), data.obs["array_y"].to_numpy(float)
    A = np.c_[ax, ay, np.ones(len(ax))]
    coef, *_ = np.linalg.lstsq(A, data.coords, rcond=None)
    rows = np.arange(len(ax)) if spots is None else np.asarray(spots)
    cols = np.arange(len(data.genes)) if genes is None else np.asarray(genes)
    x0, y0 = ax.min(), ay.min()
    return Section(sp.csr_matrix(data.counts[rows][:, cols]).astype(np.int64), [data.genes[j] for j in cols],
                   (ax[rows] - x0) * 200 + 100, (ay[rows] - y0) * 200 + 100, float(data.source_um_per_px),
                   Path(data.image_path), coef, x0, y0, [data.barcodes[i] for i in rows])


def spread(counts: sp.csr_matrix, owner: np.ndarray, n_parts: int, rng) -> sp.csr_matrix:
    """Each UMI of spot s goes to a random one of the parts p with owner[p] == s (parts x genes)."""
    parts_of = [np.flatnonzero(owner == s) for s in range(counts.shape[0])]
    coo = counts.tocoo()
    rows, cols = [], []
    for s in range(counts.shape[0]):
        sel = coo.row == s
        genes = np.repeat(coo.col[sel], coo.data[sel].astype(np.int64))
        if len(parts_of[s]) == 0 or len(genes) == 0:
            continue
        rows.append(parts_of[s][rng.integers(0, len(parts_of[s]), len(genes))])
        cols.append(genes)
    r, c = np.concatenate(rows), np.concatenate(cols)
    return sp.csr_matrix((np.ones(len(r), np.int64), (r, c)), shape=(n_parts, counts.shape[1]))


def section_bins(sec: Section, bin_um: int = 8, spot_radius_um: float = 50.0, seed: int = 0) -> Bins:
    """8 µm bins whose centre lies in a spot disc, carrying that spot's counts spread over them."""
    rows, cols, owner = [], [], []
    r_bins = int(np.ceil(spot_radius_um / bin_um)) + 1
    for s, (u, v) in enumerate(zip(sec.u, sec.v)):
        c0, r0 = int(u // bin_um), int(v // bin_um)
        cc, rr = np.meshgrid(np.arange(c0 - r_bins, c0 + r_bins + 1), np.arange(r0 - r_bins, r0 + r_bins + 1))
        cc, rr = cc.ravel(), rr.ravel()
        inside = ((cc + 0.5) * bin_um - u) ** 2 + ((rr + 0.5) * bin_um - v) ** 2 <= spot_radius_um ** 2
        rows.append(rr[inside])
        cols.append(cc[inside])
        owner.append(np.full(int(inside.sum()), s))
    row, col, own = np.concatenate(rows), np.concatenate(cols), np.concatenate(owner)
    counts = spread(sec.counts, own, len(row), np.random.default_rng(seed))
    x, y = sec.capture_to_px((col + 0.5) * bin_um, (row + 0.5) * bin_um)
    order = np.lexsort((col, row))            # Space Ranger lists bins row by row
    return Bins(bin_um, row[order], col[order], x[order], y[order], counts[order])


def section_cells(sec: Section, cells_per_spot: int = 25, spot_radius_um: float = 50.0, seed: int = 0):
    """Cells at random places in each spot disc (capture µm) and the spot's counts spread over them."""
    rng = np.random.default_rng(seed)
    n = len(sec.u) * cells_per_spot
    owner = np.repeat(np.arange(len(sec.u)), cells_per_spot)
    r = spot_radius_um * np.sqrt(rng.uniform(0, 1, n)) * 0.98
    a = rng.uniform(0, 2 * np.pi, n)
    uv = np.c_[sec.u[owner] + r * np.cos(a), sec.v[owner] + r * np.sin(a)]
    return uv, spread(sec.counts, owner, n, rng)


def rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def xenium_frame(sec: Section, deg: float, shift_um, pixel_size: float) -> tuple[np.ndarray, callable]:
    """The alignment matrix (H&E px -> morphology px) when Xenium µm = R(deg) @ capture µm + shift, and
    the capture -> Xenium µm map."""
    R, t = rotation(deg), np.asarray(shift_um, float)
    # H&E px -> capture µm is affine (inverse of capture_to_px): build it from three points
    u = np.array([0.0, 1000.0, 0.0])
    v = np.array([0.0, 0.0, 1000.0])
    x, y = sec.capture_to_px(u, v)
    P = np.c_[x, y, np.ones(3)]
    to_cap = np.linalg.solve(P, np.c_[u, v])              # (3, 2): [x, y, 1] -> (u, v)
    M = np.eye(3)
    M[:2, :] = (R @ to_cap.T + np.c_[np.zeros((2, 2)), t]) / pixel_size
    return M, (lambda uv: uv @ R.T + t)
