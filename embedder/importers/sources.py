"""Source detection and dispatch: which importer reads a folder, and one call over several sources."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .bags import check_bag_options
from .errors import ImporterError
from .hest import hest_specs
from .legacy_st import legacy_st_specs
from .options import check_options
from .run import run_import
from .sample import SampleSpec
from .visium import visium_spec

KINDS = ("auto", "legacy_st", "visium", "hest")


def detect_kind(source: Path | str) -> str:
    """'legacy_st' | 'visium' | 'hest' from the folder layout (clear error otherwise)."""
    p = Path(source)
    if not p.exists():
        raise ImporterError(f"source not found: {p}")
    if not p.is_dir():
        raise ImporterError(f"{p} is a file; give the folder of a dataset (her2st root, Space Ranger "
                            f"output, or HEST root with st/)")
    if (p / "ST-cnts").is_dir():
        return "legacy_st"
    if (p / "st").is_dir() and ((p / "wsis").is_dir() or (p / "patches").is_dir()):
        return "hest"
    for d in (p, p / "outs"):
        if d.is_dir() and ((d / "spatial").is_dir() or any(d.glob("*feature_bc_matrix*"))
                           or any(d.glob("*tissue_positions*"))):
            return "visium"
    raise ImporterError(
        f"cannot tell the kind of {p}: expected ST-cnts/ + ST-spotfiles/ + ST-imgs/ (legacy ST, her2st), "
        f"spatial/ + filtered_feature_bc_matrix.h5 (10x Visium), or st/ + wsis/ or patches/ (HEST-1k); "
        f"pass kind=... if the layout is one of these")


def import_dataset(
    source: Path | str | Sequence[Path | str],
    out_dir: Path | str,
    kind: str = "auto",
    patch_um: float = 112.0,
    target_um_per_px: float = 0.5,
    source_um_per_px: float | None = None,
    normalize: str = "log1p_cp10k",
    filter_background: bool = False,
    output: str = "hest",
    sample_ids: Sequence[str] | None = None,
    progress: bool = True,
    image: Path | str | None = None,
    prefer: str = "auto",
    pool_spots: int | None = None,
    subtile_um: float | None = None,
) -> dict:
    """Import one source folder (or several, written with one common gene set).

    sample_ids: for legacy ST / HEST, the sections / samples to import (default all); for Visium,
    the name of each folder's sample (default the folder name).  image: full-resolution slide when
    not found in the folder (Visium; legacy ST with one section).  prefer: HEST route
    ('auto' | 'patches' | 'wsi').  pool_spots / subtile_um: write bags (``importers.bags``: K x K spots
    pooled into one observation, or each spot cut into sub-tiles of that many µm).  Returns a summary dict (per-sample counts of patches, padded /
    dropped spots, scale, files, warnings, seconds).
    """
    if kind not in KINDS:
        raise ImporterError(f"kind={kind!r}; use one of {KINDS}")
    check_bag_options(pool_spots, subtile_um, output)
    check_options(subtile_um or patch_um, target_um_per_px, normalize, output, source_um_per_px)
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise ImporterError("no source given")
    if isinstance(sample_ids, str):
        sample_ids = [sample_ids]
    kinds = [detect_kind(s) if kind == "auto" else kind for s in sources]
    specs: list[SampleSpec] = []
    n_visium = kinds.count("visium")
    if n_visium and sample_ids is not None and len(sample_ids) != n_visium:
        raise ImporterError(f"for Visium, sample_ids names each folder's sample: {len(sample_ids)} names for "
                            f"{n_visium} folder(s)")
    vi = 0
    for s, k in zip(sources, kinds):
        if k == "legacy_st":
            specs += legacy_st_specs(s, sample_ids, source_um_per_px, image)
        elif k == "visium":
            name = sample_ids[vi] if sample_ids is not None else None
            vi += 1
            specs.append(visium_spec(s, image, name, source_um_per_px))
        else:
            specs += hest_specs(s, sample_ids, source_um_per_px=source_um_per_px, prefer=prefer,
                                patch_um=patch_um, target_um_per_px=target_um_per_px, normalize=normalize)
    summary = run_import(specs, out_dir, kind=kinds[0] if len(set(kinds)) == 1 else "mixed", patch_um=patch_um,
                         target_um_per_px=target_um_per_px, normalize=normalize,
                         filter_background=filter_background, output=output, progress=progress,
                         pool_spots=pool_spots, subtile_um=subtile_um)
    summary["sources"] = [str(s) for s in sources]
    return summary
