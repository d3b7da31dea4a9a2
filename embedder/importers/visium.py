"""10x Visium (Space Ranger output folder).

    <folder>/filtered_feature_bc_matrix.h5        10x HDF5 (or the filtered_feature_bc_matrix/ mtx folder;
                                                  raw_feature_bc_matrix.* is used when no filtered one)
    <folder>/spatial/tissue_positions.csv         header barcode,in_tissue,array_row,array_col,
                                                  pxl_row_in_fullres,pxl_col_in_fullres
             (or spatial/tissue_positions_list.csv, same columns, no header)
    <folder>/spatial/scalefactors_json.json       spot_diameter_fullres -> µm/px = 55 / diameter
    full-resolution image                         image=... or the one TIFF/JPEG/PNG in <folder>
                                                  (or its parent when <folder> is 'outs')

Only in-tissue spots that have counts are kept.  Files are also found at the folder root and with
a prefix (GEO style, e.g. GSM123_tissue_positions_list.csv.gz).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from hexpr.embedder.slides import SLIDE_SUFFIXES

from .errors import ImporterError, warn
from .names import make_unique, match_ids
from .run import run_import
from .tenx_h5 import finish_matrix, read_10x_h5, read_10x_h5_genes
from .sample import SampleData, SampleSpec

VISIUM_SPOT_DIAMETER_UM = 55.0
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
# images Space Ranger writes itself: downscaled or QC, never the full-resolution slide
_SPACERANGER_IMAGES = {"tissue_hires_image.png", "tissue_lowres_image.png", "detected_tissue_image.jpg",
                       "aligned_fiducials.jpg", "aligned_tissue_image.jpg", "cytassist_image.tiff",
                       "spot_image.png"}


def resolve_folder(folder: Path | str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ImporterError(f"Visium folder not found: {folder}")
    if not (folder / "spatial").is_dir() and (folder / "outs" / "spatial").is_dir():
        return folder / "outs"
    return folder


def _find_one(folder: Path, patterns: Sequence[str], what: str, required: bool = True) -> Path | None:
    """First pattern with a match in folder/spatial or folder; several matches -> error."""
    for pat in patterns:
        hits: list[Path] = []
        for d in (folder / "spatial", folder):
            if d.is_dir():
                hits += sorted(p for p in d.glob(pat) if not p.name.startswith("."))
        hits = list(dict.fromkeys(hits))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ImporterError(f"several {what} files in {folder}: {[str(h) for h in hits]}; keep one")
    if required:
        raise ImporterError(f"{what} not found in {folder} or {folder / 'spatial'} (looked for {list(patterns)})")
    return None


def find_matrix(folder: Path) -> tuple[Path, str]:
    """(path, 'h5'|'mtx') of the count matrix, filtered preferred over raw."""
    for prefix in ("filtered", "raw"):
        for d in (folder, folder / "outs"):
            hits = sorted(d.glob(f"*{prefix}_feature_bc_matrix.h5")) if d.is_dir() else []
            if len(hits) > 1:
                raise ImporterError(f"several count matrices in {d}: {[str(h) for h in hits]}; keep one")
            if hits:
                return hits[0], "h5"
            m = d / f"{prefix}_feature_bc_matrix"
            if m.is_dir():
                return m, "mtx"
    # CellRanger 2 style
    for d in (folder / "filtered_gene_bc_matrices", folder / "raw_gene_bc_matrices"):
        if d.is_dir():
            subs = [p for p in d.iterdir() if p.is_dir()]
            if len(subs) == 1:
                return subs[0], "mtx"
    raise ImporterError(f"no count matrix in {folder}: expected filtered_feature_bc_matrix.h5 or the "
                        f"filtered_feature_bc_matrix/ folder (matrix.mtx.gz, barcodes.tsv.gz, features.tsv.gz)")


def read_10x_mtx(folder: Path | str, messages: list[str] | None = None) -> tuple[list[str], list[str], sp.csr_matrix]:
    """Same as :func:`read_10x_h5` for a matrix.mtx(.gz) + barcodes + features/genes folder."""
    folder = Path(folder)

    def pick(*names):
        for n in names:
            if (folder / n).is_file():
                return folder / n
        raise ImporterError(f"{folder}: none of {list(names)} found (10x matrix folder)")

    mtx = pick("matrix.mtx.gz", "matrix.mtx")
    bc = pick("barcodes.tsv.gz", "barcodes.tsv")
    ft = pick("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
    opener = lambda p: gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb")  # noqa: E731
    try:
        with opener(mtx) as fh:
            m = scipy.io.mmread(fh)
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"cannot read {mtx}: {e}") from e
    barcodes = pd.read_csv(bc, sep="\t", header=None, dtype=str)[0].tolist()
    feats = pd.read_csv(ft, sep="\t", header=None, dtype=str)
    names = feats[1].tolist() if feats.shape[1] > 1 else feats[0].tolist()
    ftype = feats[2].tolist() if feats.shape[1] > 2 else None
    m = sp.csr_matrix(m)
    if m.shape != (len(names), len(barcodes)):
        raise ImporterError(f"{mtx}: matrix shape {m.shape} does not match {len(names)} features x "
                            f"{len(barcodes)} barcodes of {ft.name} / {bc.name}")
    return finish_matrix(folder, barcodes, names, ftype, sp.csr_matrix(m.T), messages)


def read_matrix_genes(path: Path, fmt: str) -> list[str]:
    """Gene symbols only (cheap) — same names and order as the full readers."""
    if fmt == "h5":
        return read_10x_h5_genes(path)
    if fmt == "mtx":
        for n in ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"):
            p = path / n
            if p.is_file():
                feats = pd.read_csv(p, sep="\t", header=None, dtype=str)
                names = feats[1].tolist() if feats.shape[1] > 1 else feats[0].tolist()
                if feats.shape[1] > 2 and (feats[2] == "Gene Expression").any():
                    names = [a for a, t in zip(names, feats[2]) if t == "Gene Expression"]
                return make_unique(names)[0]
    return (read_10x_h5(path) if fmt == "h5" else read_10x_mtx(path))[1]


def read_tissue_positions(path: Path | str) -> pd.DataFrame:
    """tissue_positions(.csv|_list.csv)[.gz] -> DataFrame indexed by barcode (header optional)."""
    path = Path(path)
    try:
        first = pd.read_csv(path, header=None, nrows=1, dtype=str)
        has_header = str(first.iloc[0, 0]).strip().lower() == "barcode" or not _is_number(first.iloc[0, 1])
        df = pd.read_csv(path, header=0 if has_header else None, dtype=str)
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"cannot read spot positions {path}: {e}") from e
    if not has_header:
        if df.shape[1] < 6:
            raise ImporterError(f"{path}: {df.shape[1]} columns; expected {POSITION_COLUMNS}")
        df = df.iloc[:, :6]
        df.columns = POSITION_COLUMNS
    else:
        df.columns = [str(c).strip() for c in df.columns]
        missing = [c for c in POSITION_COLUMNS if c not in df.columns]
        if missing:
            raise ImporterError(f"{path}: missing column(s) {missing}; expected header {POSITION_COLUMNS}")
    df["barcode"] = df["barcode"].astype(str)
    if df["barcode"].duplicated().any():
        raise ImporterError(f"{path}: duplicated barcodes, e.g. {df['barcode'][df['barcode'].duplicated()].tolist()[:3]}")
    return df.set_index("barcode")


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def find_fullres_image(folder: Path) -> Path:
    """The single full-resolution slide beside the Space Ranger output."""
    dirs = [folder]
    if folder.name == "outs":
        dirs.append(folder.parent)
    for d in dirs:
        cands = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
                       and p.name not in _SPACERANGER_IMAGES and not p.name.startswith("."))
        if len(cands) == 1:
            return cands[0]
        if len(cands) > 1:
            raise ImporterError(f"several images in {d}: {[c.name for c in cands]}; pass image=... "
                                f"(the full-resolution H&E given to Space Ranger)")
    raise ImporterError(f"no full-resolution image in {folder}: pass image=... (the TIFF/JPEG given to "
                        f"Space Ranger with --image); spatial/tissue_hires_image.png is downscaled and "
                        f"does not match the full-resolution spot coordinates")


def _visium_files(folder: Path | str, image: Path | str | None) -> dict[str, Path]:
    folder = resolve_folder(folder)
    matrix, fmt = find_matrix(folder)
    positions = _find_one(folder, ["tissue_positions.csv", "tissue_positions_list.csv",
                                   "*tissue_positions.csv", "*tissue_positions_list.csv",
                                   "*tissue_positions*.csv.gz"], "spot positions (tissue_positions.csv)")
    scalef = _find_one(folder, ["scalefactors_json.json", "*scalefactors_json.json", "*scalefactors*.json*"],
                       "scalefactors_json.json", required=False)
    if image is not None:
        img = Path(image)
        if not img.is_file():
            raise ImporterError(f"image file not found: {img}")
    else:
        img = find_fullres_image(folder)
    files = {"folder": folder, "matrix": matrix, "positions": positions, "image": img}
    if scalef is not None:
        files["scalefactors"] = scalef
    files["_fmt"] = Path(fmt)
    return files


def _read_scalefactors(path: Path) -> dict:
    try:
        op = gzip.open if path.name.endswith(".gz") else open
        with op(path, "rt") as f:
            return json.load(f)
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"cannot read {path}: {e}") from e


def _visium_scale(files: dict, root: Path, sid: str, source_um_per_px: float | None,
                  msgs: list[str]) -> tuple[float, dict]:
    """Slide µm/px: given, else 55 µm / spot_diameter_fullres of scalefactors_json.json."""
    scale: dict
    sf = _read_scalefactors(files["scalefactors"]) if "scalefactors" in files else None
    from_sf = None
    if sf is not None:
        d = sf.get("spot_diameter_fullres")
        if d is not None and float(d) > 0:
            from_sf = VISIUM_SPOT_DIAMETER_UM / float(d)
    if source_um_per_px is not None:
        mpp = float(source_um_per_px)
        scale = {"method": "given", "um_per_px": mpp}
        if from_sf is not None:
            scale["scalefactors_um_per_px"] = from_sf
            if abs(from_sf - mpp) > 0.15 * mpp:
                warn(msgs, f"{sid}: given source_um_per_px={mpp} differs from 55 µm / "
                           f"spot_diameter_fullres = {from_sf:.4f} by more than 15%")
    elif from_sf is not None:
        mpp = from_sf
        scale = {"method": "scalefactors spot_diameter_fullres (55 µm spots)", "um_per_px": mpp,
                 "spot_diameter_fullres": float(sf["spot_diameter_fullres"]), "spot_diameter_um": 55.0}
    else:
        where = files.get("scalefactors", root / "spatial" / "scalefactors_json.json")
        raise ImporterError(f"{sid}: the image scale is unknown: {where} is missing or has no "
                            f"spot_diameter_fullres; pass source_um_per_px=... (µm per full-resolution "
                            f"pixel, e.g. --source-um-per-px 0.2738) or add spatial/scalefactors_json.json")
    return mpp, scale


def load_visium(folder: Path | str, image: Path | str | None = None, sample_id: str | None = None,
                source_um_per_px: float | None = None) -> SampleData:
    files = _visium_files(folder, image)
    fmt = str(files.pop("_fmt"))
    root = files["folder"]
    sid = sample_id or (root.parent.name if root.name == "outs" else root.name)
    msgs: list[str] = []
    barcodes, genes, counts = (read_10x_h5 if fmt == "h5" else read_10x_mtx)(files["matrix"], msgs)
    pos = read_tissue_positions(files["positions"])
    in_tissue = pd.to_numeric(pos["in_tissue"], errors="coerce").fillna(0).astype(int) == 1
    bc_set = set(barcodes)
    off = [b for b in pos.index[~in_tissue] if b in bc_set]
    if off:
        warn(msgs, f"{sid}: {len(off)} barcode(s) of {files['matrix']} are not under tissue "
                   f"(in_tissue=0 in {files['positions']}) and are skipped")
    pos_t = pos[in_tissue]
    off_set = set(off)
    count_ids = [b for b in barcodes if b not in off_set]
    common = match_ids(count_ids, list(pos_t.index), files["matrix"], files["positions"], msgs, "barcode")
    row_of = {b: i for i, b in enumerate(barcodes)}
    rows = np.array([row_of[b] for b in common], np.int64)
    p = pos_t.loc[common]
    coords = np.c_[pd.to_numeric(p["pxl_col_in_fullres"], errors="coerce").to_numpy(float),
                   pd.to_numeric(p["pxl_row_in_fullres"], errors="coerce").to_numpy(float)]

    mpp, scale = _visium_scale(files, root, sid, source_um_per_px, msgs)
    obs = pd.DataFrame({"array_row": pd.to_numeric(p["array_row"], errors="coerce").to_numpy(),
                        "array_col": pd.to_numeric(p["array_col"], errors="coerce").to_numpy()})
    return SampleData(
        sample_id=sid, barcodes=list(common), genes=genes, counts=counts[rows], coords=coords,
        source_um_per_px=mpp, scale_info=scale, image_path=files["image"], obs=obs,
        source_files={k: str(v) for k, v in files.items()},
        provenance={"technology": "10x Visium", "platform": "visium", "spot_diameter_um": VISIUM_SPOT_DIAMETER_UM,
                    "matrix_format": fmt, "n_barcodes_matrix": len(barcodes),
                    "n_spots_in_tissue": int(in_tissue.sum())},
        warnings=msgs, counts_info={"n_spots": len(barcodes), "n_genes": len(genes)},
    )


def visium_spec(folder: Path | str, image: Path | str | None = None, sample_id: str | None = None,
                source_um_per_px: float | None = None) -> SampleSpec:
    files = _visium_files(folder, image)     # fail early on missing files
    fmt = str(files["_fmt"])
    root = files["folder"]
    sid = sample_id or (root.parent.name if root.name == "outs" else root.name)
    return SampleSpec(sample_id=sid, kind="visium", genes=read_matrix_genes(files["matrix"], fmt),
                      load=lambda: load_visium(folder, image, sid, source_um_per_px),
                      source_files={k: str(v) for k, v in files.items() if k != "_fmt"})


def import_visium(folders: Path | str | Sequence[Path | str], out_dir: Path | str, *,
                  image: Path | str | Sequence[Path | str] | None = None,
                  sample_ids: Sequence[str] | str | None = None, source_um_per_px: float | None = None,
                  patch_um: float = 112.0, target_um_per_px: float = 0.5, normalize: str = "log1p_cp10k",
                  filter_background: bool = False, output: str = "hest", progress: bool = True) -> dict:
    """Import one or several Space Ranger folders (several -> one common gene set)."""
    if isinstance(folders, (str, Path)):
        folders = [folders]
    folders = list(folders)
    if isinstance(sample_ids, str):
        sample_ids = [sample_ids]
    if sample_ids is not None and len(sample_ids) != len(folders):
        raise ImporterError(f"{len(sample_ids)} sample_ids for {len(folders)} Visium folders; give one per folder")
    if image is None or isinstance(image, (str, Path)):
        images = [image] * len(folders)
        if image is not None and len(folders) > 1:
            raise ImporterError("one image=... for several Visium folders; give a list, one per folder")
    else:
        images = list(image)
    specs = [visium_spec(f, im, sample_ids[i] if sample_ids else None, source_um_per_px)
             for i, (f, im) in enumerate(zip(folders, images))]
    return run_import(specs, out_dir, kind="visium", patch_um=patch_um, target_um_per_px=target_um_per_px,
                      normalize=normalize, filter_background=filter_background, output=output, progress=progress)
