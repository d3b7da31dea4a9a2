"""HEST-1k samples (https://huggingface.co/datasets/MahmoodLab/hest).

    <root>/st/<id>.h5ad         AnnData: obs index = barcodes, X (or layers['counts']) = raw counts,
                                obsm['spatial'] = spot centre in full-resolution pixels (x, y)
    <root>/wsis/<id>.tif        full-resolution slide (pyramidal TIFF), cut here at any scale
    <root>/patches/<id>.h5      ready patches (img, barcode, coords): HEST cuts 224 px at 0.5 µm/px;
                                HEST's `coords` are the patch's top-left corner, so the spot centre
                                is taken from the h5ad's obsm['spatial'] (joined by barcode)
    <root>/metadata/<id>.json   pixel_size_um_estimated / pixel_size_um_embedded (slide µm/px)

Slide µm/px: source_um_per_px if given, else metadata/<id>.json, else the h5ad's uns, else a
HEST metadata CSV in <root> (columns id, pixel_size_um_estimated); needed only to cut from wsis/.
Route (prefer="auto"): ready patches when their scale already matches the request, else the
WSI when present, else the ready patches resampled / centre-cropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from hexpr.embedder.slides import SLIDE_SUFFIXES

from .errors import ImporterError, warn
from .expression import counts_to_csr
from .names import make_unique, match_ids
from .patches import patch_size_px
from .run import run_import
from .sample import SampleData, SampleSpec

HEST_PATCH_UM_PER_PX = 0.5       # HEST-1k patches/<id>.h5 convention (224 px = 112 µm)
_PIXEL_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded", "pixel_size_um", "pixel_size",
               "source_um_per_px")


def hest_samples(root: Path | str) -> list[str]:
    root = Path(root)
    st = root / "st"
    if not st.is_dir():
        raise ImporterError(f"{root} is not a HEST folder: {st} is missing (expected st/<id>.h5ad "
                            f"with wsis/<id>.tif or patches/<id>.h5)")
    ids = sorted(p.name[:-5] for p in st.glob("*.h5ad") if not p.name.startswith("."))
    if not ids:
        raise ImporterError(f"no <id>.h5ad in {st}")
    return ids


def _find_wsi(root: Path, sid: str) -> Path | None:
    d = root / "wsis"
    if not d.is_dir():
        return None
    for suf in SLIDE_SUFFIXES:        # the reader table's order: TIFF-like first
        p = d / f"{sid}{suf}"
        if p.is_file():
            return p
    return None


def _read_var_names(path: Path) -> list[str]:
    try:
        with h5py.File(path, "r") as f:
            var = f["var"]
            key = var.attrs.get("_index", "_index")
            if isinstance(key, bytes):
                key = key.decode()
            names = var[key][:]
            return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    except ImporterError:
        raise
    except Exception:  # noqa: BLE001  (unusual encoding: let anndata read it)
        try:
            a = ad.read_h5ad(path, backed="r")
            names = [str(n) for n in a.var_names]
            a.file.close()
            return names
        except Exception as e:  # noqa: BLE001
            raise ImporterError(f"cannot read {path}: {e}") from e


def _metadata_pixel_size(root: Path, sid: str, uns: dict | None) -> tuple[float | None, dict]:
    meta = root / "metadata" / f"{sid}.json"
    if meta.is_file():
        try:
            m = json.loads(meta.read_text())
        except Exception as e:  # noqa: BLE001
            raise ImporterError(f"cannot read {meta}: {e}") from e
        for k in _PIXEL_KEYS:
            v = m.get(k)
            if v is not None and _pos(v):
                return float(v), {"method": f"metadata {k}", "file": str(meta), "um_per_px": float(v)}
    if uns:
        cands = [uns] + [uns[k] for k in ("hexpr_import", "metadata", "meta") if isinstance(uns.get(k), dict)]
        for d in cands:
            for k in _PIXEL_KEYS:
                v = d.get(k)
                if v is not None and _pos(v):
                    return float(v), {"method": f"h5ad uns {k}", "um_per_px": float(v)}
    for csv in sorted(root.glob("*.csv")):
        try:
            df = pd.read_csv(csv)
        except Exception:  # noqa: BLE001
            continue
        if "id" in df.columns:
            for k in _PIXEL_KEYS:
                if k in df.columns:
                    row = df.loc[df["id"].astype(str) == sid, k]
                    if len(row) and _pos(row.iloc[0]):
                        v = float(row.iloc[0])
                        return v, {"method": f"metadata table {k}", "file": str(csv), "um_per_px": v}
    return None, {}


def _pos(v) -> bool:
    try:
        return float(v) > 0 and np.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _patch_file_info(path: Path) -> tuple[list[str], int, float, dict]:
    try:
        with h5py.File(path, "r") as f:
            for k in ("img", "barcode"):
                if k not in f:
                    raise ImporterError(f"{path}: dataset '{k}' missing (HEST patch files hold img, barcode, coords)")
            img = f["img"]
            if img.ndim != 4 or img.shape[1] != img.shape[2] or img.shape[3] < 3:
                raise ImporterError(f"{path}: img has shape {img.shape}; (N, P, P, 3) is needed")
            bc = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in np.asarray(f["barcode"][:]).ravel()]
            if len(bc) != img.shape[0]:
                raise ImporterError(f"{path}: {len(bc)} barcodes for {img.shape[0]} patches")
            size = int(img.shape[1])
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            h5coords = np.asarray(f["coords"][:], np.float64).reshape(-1, 2) if "coords" in f else None
    except ImporterError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"cannot read patch file {path}: {e}") from e
    if "pixel_size_um" in attrs and _pos(attrs["pixel_size_um"]):
        mpp = float(attrs["pixel_size_um"])
        info = {"patch_um_per_px": mpp, "patch_scale_from": "h5 attrs pixel_size_um"}
    else:
        mpp = HEST_PATCH_UM_PER_PX
        info = {"patch_um_per_px": mpp, "patch_scale_from": "assumed HEST-1k convention (0.5 µm/px)"}
    info["h5_coords"] = h5coords
    return bc, size, mpp, info


@dataclass
class _Expression:
    """What st/<id>.h5ad holds: the AnnData, spot centres, raw counts and where they came from."""

    adata: Any
    coords: np.ndarray
    counts: Any
    counts_source: str
    genes: list[str]
    obs_ids: list[str]
    uns: dict


def _read_expression(st: Path, normalize: str, msgs: list[str]) -> _Expression:
    if not st.is_file():
        raise ImporterError(f"expression file not found: {st}")
    try:
        adata = ad.read_h5ad(st)
    except Exception as e:  # noqa: BLE001
        raise ImporterError(f"cannot read {st}: {e}") from e
    if "spatial" not in adata.obsm:
        raise ImporterError(f"{st}: obsm['spatial'] (spot centres in full-resolution pixels) is missing")
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ImporterError(f"{st}: obsm['spatial'] has shape {coords.shape}; (N, 2) is needed")
    if "counts" in adata.layers:
        raw, src = adata.layers["counts"], "layers['counts']"
    else:
        raw, src = adata.X, "X"
    counts, integral = counts_to_csr(raw)
    if not integral and normalize != "none":
        raise ImporterError(f"{st}: {src} is not integer counts (already normalised?); put raw counts in "
                            f"layers['counts'] or import with normalize='none' to keep the values as they are")
    genes, n_ren = make_unique([str(g) for g in adata.var_names])
    if n_ren:
        warn(msgs, f"{st}: {n_ren} duplicated gene name(s) renamed with -1, -2, ... suffixes")
    obs_ids = [str(i) for i in adata.obs_names]
    if len(set(obs_ids)) != len(obs_ids):
        raise ImporterError(f"{st}: duplicated obs names (barcodes)")
    uns = dict(adata.uns) if adata.uns is not None else {}
    return _Expression(adata, coords[:, :2], counts, src, genes, obs_ids, uns)


def _choose_route(root: Path, sid: str, prefer: str, wsi: Path | None, pfile: Path, patch_um: float,
                  target_um_per_px: float) -> tuple[str, tuple | None]:
    """'wsi' or 'patches', and the ready patches' (barcodes, size, µm/px, info) when there are some."""
    has_p = pfile.is_file()
    if prefer not in ("auto", "patches", "wsi"):
        raise ImporterError(f"prefer={prefer!r}; use 'auto', 'patches' or 'wsi'")
    if prefer == "wsi" and wsi is None:
        raise ImporterError(f"{sid}: no slide wsis/{sid}.tif in {root}")
    if prefer == "patches" and not has_p:
        raise ImporterError(f"{sid}: no ready patches {pfile}")
    if wsi is None and not has_p:
        raise ImporterError(f"{sid}: neither wsis/{sid}.tif nor patches/{sid}.h5 in {root}; one is needed")
    ready = _patch_file_info(pfile) if has_p else None
    route = prefer
    if route == "auto":
        if ready is not None:
            _, p_size, p_mpp, _ = ready
            matches = p_size == patch_size_px(patch_um, target_um_per_px) and abs(p_mpp - target_um_per_px) < 1e-6
            route = "patches" if (matches or wsi is None) else "wsi"
        else:
            route = "wsi"
    return route, ready


def _ready_patch_sample(sid: str, st: Path, e: _Expression, pfile: Path, ready: tuple, mpp: float | None,
                        scale: dict, msgs: list[str]) -> tuple[SampleData, np.ndarray]:
    """The sample cut from HEST's ready patches: spots joined to patch rows by barcode."""
    p_bc, _, p_mpp, pinfo = ready
    common = match_ids(e.obs_ids, p_bc, st, pfile, msgs, "barcode")
    r_of = {b: i for i, b in enumerate(e.obs_ids)}
    p_of = {b: i for i, b in enumerate(p_bc)}
    rows = np.array([r_of[b] for b in common], np.int64)
    prow = np.array([p_of[b] for b in common], np.int64)
    h5c = pinfo.pop("h5_coords", None)
    if h5c is not None and len(h5c) == len(p_bc):
        d = np.median(e.coords[rows] - h5c[prow], axis=0)
        pinfo["h5_coords_minus_centre_px"] = [float(-d[0]), float(-d[1])]
        pinfo["h5_coords_convention"] = "centre" if np.all(np.abs(d) < 2) else "offset (HEST: top-left)"
    scale = dict(scale) if scale else {"method": "unknown (not needed for ready patches)"}
    data = SampleData(sample_id=sid, barcodes=list(common), genes=e.genes, counts=e.counts[rows],
                      coords=e.coords[rows], source_um_per_px=mpp, scale_info=scale,
                      patches_h5=pfile, patches_rows=prow, patches_um_per_px=p_mpp)
    return data, rows


def load_hest_sample(root: Path | str, sid: str, *, source_um_per_px: float | None = None,
                     prefer: str = "auto", patch_um: float = 112.0, target_um_per_px: float = 0.5,
                     normalize: str = "log1p_cp10k") -> SampleData:
    root = Path(root)
    st = root / "st" / f"{sid}.h5ad"
    msgs: list[str] = []
    e = _read_expression(st, normalize, msgs)
    if source_um_per_px is not None:
        mpp, scale = float(source_um_per_px), {"method": "given", "um_per_px": float(source_um_per_px)}
    else:
        mpp, scale = _metadata_pixel_size(root, sid, e.uns)
    wsi = _find_wsi(root, sid)
    pfile = root / "patches" / f"{sid}.h5"
    route, ready = _choose_route(root, sid, prefer, wsi, pfile, patch_um, target_um_per_px)
    pinfo = ready[3] if ready is not None else {}
    files = {"st": st}
    if route == "wsi":
        if mpp is None:
            raise ImporterError(f"{sid}: the slide's µm/px is unknown (no {root / 'metadata' / (sid + '.json')} "
                                f"with pixel_size_um_estimated, nothing in the h5ad uns); pass "
                                f"source_um_per_px=... (µm per full-resolution pixel)")
        files["image"] = wsi
        rows = np.arange(len(e.obs_ids))
        data = SampleData(sample_id=sid, barcodes=e.obs_ids, genes=e.genes, counts=e.counts, coords=e.coords,
                          source_um_per_px=mpp, scale_info=scale, image_path=wsi)
    else:
        files["patches"] = pfile
        data, rows = _ready_patch_sample(sid, st, e, pfile, ready, mpp, scale, msgs)
    pinfo.pop("h5_coords", None)
    obs_cols = [c for c in ("array_row", "array_col", "in_tissue") if c in e.adata.obs.columns]
    data.obs = e.adata.obs.iloc[rows][obs_cols].reset_index(drop=True) if obs_cols else None
    data.source_files = {k: str(v) for k, v in files.items()}
    data.provenance = {"technology": str(e.uns.get("technology", "")) or "HEST-1k sample", "platform": "hest", "route": route,
                       "counts_source": e.counts_source, **pinfo}
    data.warnings = msgs
    data.counts_info = {"n_spots": len(e.obs_ids), "n_genes": len(e.genes), "source": e.counts_source}
    return data


def hest_specs(root: Path | str, sample_ids: Sequence[str] | None = None, *, source_um_per_px: float | None = None,
               prefer: str = "auto", patch_um: float = 112.0, target_um_per_px: float = 0.5,
               normalize: str = "log1p_cp10k") -> list[SampleSpec]:
    root = Path(root)
    available = hest_samples(root)
    chosen = available if sample_ids is None else [str(s) for s in sample_ids]
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ImporterError(f"sample(s) {unknown} not in {root / 'st'}; available: {available[:20]}")
    specs = []
    for sid in chosen:
        st = root / "st" / f"{sid}.h5ad"
        if _find_wsi(root, sid) is None and not (root / "patches" / f"{sid}.h5").is_file():
            raise ImporterError(f"{sid}: neither wsis/{sid}.tif nor patches/{sid}.h5 in {root}; one is needed")
        genes, _ = make_unique(_read_var_names(st))
        specs.append(SampleSpec(
            sample_id=sid, kind="hest", genes=genes, source_files={"st": str(st)},
            load=(lambda sid=sid: load_hest_sample(root, sid, source_um_per_px=source_um_per_px, prefer=prefer,
                                                   patch_um=patch_um, target_um_per_px=target_um_per_px,
                                                   normalize=normalize))))
    return specs


def import_hest(root: Path | str, out_dir: Path | str, *, sample_ids: Sequence[str] | None = None,
                source_um_per_px: float | None = None, prefer: str = "auto", patch_um: float = 112.0,
                target_um_per_px: float = 0.5, normalize: str = "log1p_cp10k", filter_background: bool = False,
                output: str = "hest", progress: bool = True) -> dict:
    """Import HEST-1k samples (all under <root>/st, or the chosen sample_ids)."""
    specs = hest_specs(root, sample_ids, source_um_per_px=source_um_per_px, prefer=prefer, patch_um=patch_um,
                       target_um_per_px=target_um_per_px, normalize=normalize)
    return run_import(specs, out_dir, kind="hest", patch_um=patch_um, target_um_per_px=target_um_per_px,
                      normalize=normalize, filter_background=filter_background, output=output, progress=progress)
