"""Legacy Spatial Transcriptomics (ST, 100 µm spots on a 200 µm grid) as laid out in her2st.

    <root>/ST-cnts/<section>.tsv.gz            counts, one row per spot id "<x>x<y>", one column per gene
    <root>/ST-spotfiles/<section>_selection.tsv  x y new_x new_y pixel_x pixel_y selected
    <root>/ST-imgs/<section>/*.jpg              full-resolution H&E (also ST-imgs/<patient>/<section>/)

The slide scale is not stored: it is derived from the spot grid (array units are 200 µm apart) by
a least-squares fit pixel = a + B @ array_coordinate, µm/px = 200 / (mean px per array unit),
unless ``source_um_per_px`` is given.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hexpr.embedder.slides import SLIDE_SUFFIXES

from .errors import ImporterError, warn
from .expression import counts_to_csr
from .names import make_unique, match_ids
from .run import run_import
from .sample import SampleData, SampleSpec

ARRAY_SPACING_UM = 200.0
SPOT_DIAMETER_UM = 100.0
_SPOT_ID = re.compile(r"^\d+(\.\d+)?x\d+(\.\d+)?$")


def _looks_like_ids(values: Sequence[str]) -> bool:
    vals = [str(v) for v in values[:50]]
    return bool(vals) and sum(bool(_SPOT_ID.match(v)) for v in vals) >= 0.8 * len(vals)


def _first_file(folder: Path, names: list[str]) -> Path | None:
    """The first of ``names`` that exists as a file in ``folder``."""
    return next((folder / n for n in names if (folder / n).is_file()), None)


def find_sections(root: Path | str) -> list[str]:
    """Section names with a count table under <root>/ST-cnts."""
    root = Path(root)
    cdir = root / "ST-cnts"
    if not cdir.is_dir():
        raise ImporterError(f"{root} is not a legacy ST folder: {cdir} is missing (expected "
                            f"ST-cnts/<section>.tsv.gz, ST-spotfiles/<section>_selection.tsv, ST-imgs/<section>/*.jpg)")
    names = []
    for p in sorted(cdir.iterdir()):
        for suf in (".tsv.gz", ".tsv", ".csv.gz", ".csv"):
            if p.name.endswith(suf) and not p.name.startswith("."):
                names.append(p.name[: -len(suf)])
                break
    if not names:
        raise ImporterError(f"no count table (<section>.tsv.gz) in {cdir}")
    return names


def section_files(root: Path | str, section: str, image: Path | str | None = None) -> dict[str, Path]:
    """Locate the count table, spot file and image of one section (clear error when missing)."""
    root = Path(root)
    counts = _first_file(root / "ST-cnts", [f"{section}{suf}" for suf in (".tsv.gz", ".tsv", ".csv.gz", ".csv")])
    if counts is None:
        raise ImporterError(f"count table for section {section!r} not found: expected "
                            f"{root / 'ST-cnts' / (section + '.tsv.gz')}")
    spots = _first_file(root / "ST-spotfiles", [f"{section}_selection.tsv", f"{section}_selection.tsv.gz",
                                                 f"{section}.tsv", f"{section}.tsv.gz"])
    if spots is None:
        raise ImporterError(f"spot file for section {section!r} not found: expected "
                            f"{root / 'ST-spotfiles' / (section + '_selection.tsv')} (columns x y pixel_x pixel_y)")
    if image is not None:
        img = Path(image)
        if not img.is_file():
            raise ImporterError(f"image file not found: {img}")
    else:
        cands: list[Path] = []
        for d in (root / "ST-imgs" / section, root / "ST-imgs" / section[:1] / section):
            if d.is_dir():
                cands = sorted(p for p in d.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES
                               and not p.name.startswith("."))
                if cands:
                    break
        if not cands:
            raise ImporterError(f"no H&E image for section {section!r}: expected one slide image (.jpg/.tif/.ndpi/...) in "
                                f"{root / 'ST-imgs' / section}/ (or pass image=...)")
        if len(cands) > 1:
            raise ImporterError(f"several images for section {section!r}: {[str(c) for c in cands]}; "
                                f"keep one or pass image=...")
        img = cands[0]
    return {"counts": counts, "spots": spots, "image": img}


def _sep(path: Path) -> str:
    return "," if ".csv" in path.name else "\t"


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path, "rt")


def read_count_genes(path: Path) -> list[str]:
    """Gene names of a count table (header only unless the table is genes x spots)."""
    with _open_text(path) as f:
        header = f.readline().rstrip("\n\r").split(_sep(path))
        first = f.readline().rstrip("\n\r").split(_sep(path))
    # R's write.table omits the row-name header cell: then every header cell is a gene
    cols = header if len(first) == len(header) + 1 else header[1:]
    if _looks_like_ids(cols):        # genes x spots: the genes are the first column
        _, genes, _ = read_counts(path)
        return genes
    genes, _ = make_unique(cols)
    return genes


def read_counts(path: Path) -> tuple[list[str], list[str], "object"]:
    """(spot ids, unique gene names, CSR counts spots x genes) of a legacy count table."""
    try:
        df = pd.read_csv(path, sep=_sep(path), index_col=0)
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"cannot read count table {path}: {e}") from e
    transposed = False
    if not _looks_like_ids(list(df.index.astype(str))):
        if _looks_like_ids(list(df.columns.astype(str))):
            df = df.T
            transposed = True
        else:
            raise ImporterError(f"{path}: neither the first column nor the header holds spot ids like "
                                f"'10x21' (got {list(df.index[:3])}); a table of spots x genes is needed")
    ids = [str(i) for i in df.index]
    if len(set(ids)) != len(ids):
        dup = pd.Index(ids)[pd.Index(ids).duplicated()][:3].tolist()
        raise ImporterError(f"{path}: duplicated spot ids, e.g. {dup}; one row per spot is needed")
    raw = [str(c) for c in df.columns]
    if not transposed:   # pandas renames duplicated header names to "A.1": use the raw header
        with _open_text(path) as f:
            header = f.readline().rstrip("\n\r").split(_sep(path))
        if len(header) == len(raw) + 1:
            header = header[1:]
        if len(header) == len(raw):
            raw = header
    genes, _ = make_unique(raw)
    try:
        values = df.to_numpy(dtype=np.float64)
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"{path}: non-numeric values in the count table ({e})") from e
    if np.isnan(values).any():
        raise ImporterError(f"{path}: missing values in the count table")
    m, _ = counts_to_csr(values)
    return ids, genes, m


def read_spot_file(path: Path) -> pd.DataFrame:
    """Spot file -> DataFrame indexed by spot id with pixel_x, pixel_y and array columns."""
    try:
        df = pd.read_csv(path, sep=None, engine="python")
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"cannot read spot file {path}: {e}") from e
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in df.columns]
    if missing:
        raise ImporterError(f"{path}: missing column(s) {missing}; expected header "
                            f"'x y new_x new_y pixel_x pixel_y selected'")

    def fmt(v):
        f = float(v)
        return str(int(f)) if f.is_integer() else str(v)

    df.index = pd.Index([f"{fmt(a)}x{fmt(b)}" for a, b in zip(df["x"], df["y"])])
    return df


def derive_um_per_px(spots: pd.DataFrame, spacing_um: float = ARRAY_SPACING_UM,
                     messages: list[str] | None = None, where: str = "") -> tuple[float, dict]:
    """µm/px from the spot grid: least-squares fit pixel = a + B @ array coordinate."""
    acols = ("new_x", "new_y") if {"new_x", "new_y"} <= set(spots.columns) else ("x", "y")
    A = np.c_[np.ones(len(spots)), spots[acols[0]].to_numpy(float), spots[acols[1]].to_numpy(float)]
    P = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    ok = np.isfinite(A).all(1) & np.isfinite(P).all(1)
    A, P = A[ok], P[ok]
    if len(A) < 3 or np.linalg.matrix_rank(A) < 3:
        raise ImporterError(f"{where}: too few spots ({len(A)}) to derive the image scale from the spot "
                            f"grid; pass source_um_per_px=... (µm per full-resolution pixel)")
    coef, *_ = np.linalg.lstsq(A, P, rcond=None)        # (3, 2): rows 1, ax, ay ; cols px, py
    B = coef[1:].T                                       # pixel per array unit, 2x2
    px_x = float(np.hypot(B[0, 0], B[1, 0]))             # along array x
    px_y = float(np.hypot(B[0, 1], B[1, 1]))             # along array y
    px_unit = (px_x + px_y) / 2.0
    resid = P - A @ coef
    rms = float(np.sqrt((resid ** 2).sum(1).mean()))
    if px_unit <= 0:
        raise ImporterError(f"{where}: degenerate spot grid; pass source_um_per_px=...")
    if rms > 0.25 * px_unit:
        warn(messages, f"{where}: spot grid fit is poor (rms {rms:.1f} px vs {px_unit:.1f} px per array "
                       f"unit); the derived scale may be wrong, consider passing source_um_per_px")
    if abs(px_x - px_y) > 0.05 * px_unit:
        warn(messages, f"{where}: spot grid is anisotropic ({px_x:.1f} vs {px_y:.1f} px per array unit)")
    mpp = spacing_um / px_unit
    info = {
        "method": "derived from spot grid",
        "array_columns": list(acols),
        "array_spacing_um": spacing_um,
        "px_per_array_unit": px_unit,
        "px_per_array_unit_x": px_x,
        "px_per_array_unit_y": px_y,
        "fit_rms_px": rms,
        "fit_intercept_px": [float(coef[0, 0]), float(coef[0, 1])],
        "n_spots_fit": int(len(A)),
        "um_per_px": mpp,
    }
    return mpp, info


def load_legacy_section(root: Path | str, section: str, source_um_per_px: float | None = None,
                        image: Path | str | None = None) -> SampleData:
    """Read one section: counts joined to spot positions by spot id; scale derived or given."""
    files = section_files(root, section, image)
    msgs: list[str] = []
    ids, genes, counts = read_counts(files["counts"])
    spots = read_spot_file(files["spots"])
    if spots.index.duplicated().any():
        d = spots.index[spots.index.duplicated()].unique().tolist()
        warn(msgs, f"{files['spots']}: {len(d)} duplicated spot id(s) {d[:3]}; the first row is used")
        spots = spots[~spots.index.duplicated()]
    n_unselected = 0
    if "selected" in spots.columns:
        sel = pd.to_numeric(spots["selected"], errors="coerce").fillna(0).astype(int) == 1
        unsel = spots.index[~sel]
        in_counts = set(ids)
        n_counted_unsel = sum(1 for i in unsel if i in in_counts)
        if n_counted_unsel:
            warn(msgs, f"{files['spots']}: {n_counted_unsel} spot(s) with counts are marked selected=0; "
                       f"they are kept")
        n_unselected = int((~sel).sum())
        spots = spots[sel | spots.index.isin(in_counts)]
    common = match_ids(ids, list(spots.index), files["counts"], files["spots"], msgs)
    row_of = {s: i for i, s in enumerate(ids)}
    rows = np.array([row_of[s] for s in common], dtype=np.int64)
    sp_rows = spots.loc[common]
    coords = sp_rows[["pixel_x", "pixel_y"]].to_numpy(np.float64)

    if source_um_per_px is not None:
        mpp = float(source_um_per_px)
        scale = {"method": "given", "um_per_px": mpp}
        try:   # keep the grid estimate for the record
            est, det = derive_um_per_px(spots, messages=None, where=str(files["spots"]))
            scale["grid_estimate_um_per_px"] = est
            if abs(est - mpp) > 0.15 * mpp:
                warn(msgs, f"{section}: given source_um_per_px={mpp} differs from the spot-grid "
                           f"estimate {est:.4f} by more than 15%")
        except ImporterError:
            pass
    else:
        mpp, scale = derive_um_per_px(spots, messages=msgs, where=str(files["spots"]))

    obs = pd.DataFrame({"array_x": sp_rows["x"].to_numpy(), "array_y": sp_rows["y"].to_numpy()})
    return SampleData(
        sample_id=section,
        barcodes=list(common),
        genes=genes,
        counts=counts[rows],
        coords=coords,
        source_um_per_px=mpp,
        scale_info=scale,
        image_path=files["image"],
        obs=obs,
        source_files={k: str(v) for k, v in files.items()},
        provenance={"technology": "legacy ST", "platform": "legacy_st", "spot_diameter_um": SPOT_DIAMETER_UM,
                    "n_spots_count_table": len(ids), "n_spots_spot_file": int(len(spots)),
                    "n_spots_unselected": n_unselected},
        warnings=msgs,
        counts_info={"n_spots": len(ids), "n_genes": len(genes)},
    )


def legacy_st_specs(root: Path | str, sample_ids: Sequence[str] | None = None,
                    source_um_per_px: float | None = None, image: Path | str | None = None) -> list[SampleSpec]:
    root = Path(root)
    available = find_sections(root)
    if sample_ids is None:
        chosen = available
    else:
        chosen = [str(s) for s in sample_ids]
        unknown = [s for s in chosen if s not in available]
        if unknown:
            raise ImporterError(f"section(s) {unknown} not in {root / 'ST-cnts'}; available: {available}")
    if image is not None and len(chosen) != 1:
        raise ImporterError("image=... can only be given when importing one section")
    specs = []
    for s in chosen:
        files = section_files(root, s, image)     # fail early on missing files
        specs.append(SampleSpec(
            sample_id=s, kind="legacy_st", genes=read_count_genes(files["counts"]),
            load=(lambda s=s: load_legacy_section(root, s, source_um_per_px, image)),
            source_files={k: str(v) for k, v in files.items()}))
    return specs


def import_legacy_st(root: Path | str, out_dir: Path | str, *, sample_ids: Sequence[str] | None = None,
                     source_um_per_px: float | None = None, image: Path | str | None = None,
                     patch_um: float = 112.0, target_um_per_px: float = 0.5, normalize: str = "log1p_cp10k",
                     filter_background: bool = False, output: str = "hest", progress: bool = True) -> dict:
    """Import all (or the chosen) sections of a legacy ST folder such as her2st."""
    specs = legacy_st_specs(root, sample_ids, source_um_per_px, image)
    return run_import(specs, out_dir, kind="legacy_st", patch_um=patch_um, target_um_per_px=target_um_per_px,
                      normalize=normalize, filter_background=filter_background, output=output,
                      progress=progress)
