"""What an imported sample records about itself: ``uns['hexpr_import']`` and the patch-file attrs."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np

from hexpr.embedder.files import hexpr_version
from hexpr.embedder.slides import WHITE

from .options import ImportSettings
from .sample import SampleData


def anndata_safe(obj: Any) -> Any:
    """Provenance dicts -> what AnnData can write (no None, paths as str)."""
    if obj is None:
        return ""
    if isinstance(obj, dict):
        return {str(k): anndata_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        vals = [anndata_safe(v) for v in obj]
        if all(isinstance(v, str) for v in vals) or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            return vals if vals else ""
        return [str(v) for v in vals]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (str, int, float)):
        return obj
    return str(obj)


def sample_provenance(data: SampleData, cfg: ImportSettings, *, norm_details: dict, n_genes: int,
                      counts: dict, thumb: dict) -> dict:
    """``uns['hexpr_import']`` of one sample; ``counts`` holds n_background_dropped / n_padded /
    n_outside_dropped, ``thumb`` the thumbnail record (empty without a slide)."""
    src_mpp = data.source_um_per_px
    prov = {
        "hexpr_version": hexpr_version(),
        "importer": cfg.kind,
        "sample_id": data.sample_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source_files": {k: str(v) for k, v in data.source_files.items()},
        "source_um_per_px": float(src_mpp) if src_mpp else "",
        "scale": data.scale_info,
        "patch_size_um": float(cfg.patch_um),
        "patch_size_px": int(cfg.size),
        "patch_um_per_px": float(cfg.patch_um / cfg.size),
        "target_um_per_px": float(cfg.target_um_per_px),
        "resample": "lanczos",
        "pad_value": WHITE,
        "pixel_centre_convention": "coordinate (x, y) = pixel img[y, x], centre at (x+0.5, y+0.5)",
        "normalization": cfg.normalize,
        "normalization_details": norm_details,
        "n_genes_sample": len(data.genes),
        "n_genes": n_genes,
        "counts": data.counts_info,
        "filter_background": bool(cfg.filter_background),
        **counts,
        **thumb,
        **data.provenance,
    }
    return anndata_safe(prov)


def patch_file_attrs(data: SampleData, patch_um: float, size: int, thumb: dict) -> dict:
    """Attributes of ``patches/<sample>.h5`` (scale of the patches and of the slide, thumbnail)."""
    src_mpp = data.source_um_per_px
    attrs = {
        "sample_id": data.sample_id,
        "pixel_size_um": float(patch_um / size),
        "patch_size_um": float(patch_um),
        "source_pixel_size_um": float(src_mpp) if src_mpp else float("nan"),
        "patch_size_px": int(size),
        # the slide the patches were cut from (absolute): context scales are cut from it (embedder.context)
        "source_image": str(Path(data.image_path).resolve()) if data.image_path else "",
    }
    if thumb:
        attrs["thumbnail"] = thumb["thumbnail"]
        attrs["thumbnail_scale"] = float(thumb["thumbnail_scale"])
    return attrs
