"""Source detection and dispatch: the importers' table, and one call over several sources.

Each row of :data:`IMPORTERS` names a source kind, how to recognise its folder, the layout to tell
the user about, and how to turn a folder into samples.  Per-folder kinds (Visium, Visium HD,
Xenium) hold one sample each, named by ``sample_ids`` in folder order (default: the folder name);
the others (legacy ST, HEST-1k) hold several, chosen by ``sample_ids``.  Detection tries the rows
in order (Visium HD and Xenium before plain Visium: an HD output also has a spatial/ folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .bags import check_bag_options
from .errors import ImporterError
from .hest import hest_specs
from .legacy_st import legacy_st_specs
from .options import check_options
from .run import run_import
from .sample import SampleSpec
from .staging import check_import_target
from .tiles import DEFAULT_MIN_TILE_COUNTS
from .visium import visium_spec
from .visium_hd import is_visium_hd, visium_hd_spec
from .xenium import is_xenium, xenium_spec


@dataclass(frozen=True)
class ImportRequest:
    """The options of one import that the readers need (checked before any reader runs)."""

    patch_um: float = 112.0
    target_um_per_px: float = 0.5
    source_um_per_px: float | None = None
    normalize: str = "log1p_cp10k"
    image: Path | str | None = None
    prefer: str = "auto"
    tile_um: float | None = None          # Visium HD / Xenium tile side; None: patch_um
    min_tile_counts: int = DEFAULT_MIN_TILE_COUNTS
    alignment: Path | str | None = None   # Xenium: H&E -> morphology matrix CSV or keypoints CSV
    per_cell: bool = False                # Xenium: one observation per cell instead of tiles

    @property
    def tile(self) -> float:
        return float(self.tile_um if self.tile_um is not None else self.patch_um)


def _is_visium(p: Path) -> bool:
    return any(d.is_dir() and ((d / "spatial").is_dir() or any(d.glob("*feature_bc_matrix*"))
                               or any(d.glob("*tissue_positions*"))) for d in (p, p / "outs"))


def _legacy(src: Path, ids: Sequence[str] | None, r: ImportRequest) -> list[SampleSpec]:
    return legacy_st_specs(src, ids, r.source_um_per_px, r.image)


def _hest(src: Path, ids: Sequence[str] | None, r: ImportRequest) -> list[SampleSpec]:
    return hest_specs(src, ids, source_um_per_px=r.source_um_per_px, prefer=r.prefer, patch_um=r.patch_um,
                      target_um_per_px=r.target_um_per_px, normalize=r.normalize)


def _visium(src: Path, name: str | None, r: ImportRequest) -> list[SampleSpec]:
    return [visium_spec(src, r.image, name, r.source_um_per_px)]


def _visium_hd(src: Path, name: str | None, r: ImportRequest) -> list[SampleSpec]:
    return [visium_hd_spec(src, tile_um=r.tile, image=r.image, sample_id=name, source_um_per_px=r.source_um_per_px,
                           min_tile_counts=r.min_tile_counts)]


def _xenium(src: Path, name: str | None, r: ImportRequest) -> list[SampleSpec]:
    return [xenium_spec(src, tile_um=None if r.per_cell else r.tile, image=r.image, alignment=r.alignment,
                        sample_id=name, min_tile_counts=r.min_tile_counts)]


@dataclass(frozen=True)
class Importer:
    kind: str
    detect: Callable[[Path], bool]
    specs: Callable[[Path, object, ImportRequest], list[SampleSpec]]
    per_folder: bool                      # one sample per folder, named by sample_ids in folder order
    layout: str                           # what the folder holds (for the "cannot tell" error)


IMPORTERS: tuple[Importer, ...] = (
    Importer("legacy_st", lambda p: (p / "ST-cnts").is_dir(), _legacy, False,
             "ST-cnts/ + ST-spotfiles/ + ST-imgs/ (legacy ST, her2st)"),
    Importer("visium", _is_visium, _visium, True, "spatial/ + filtered_feature_bc_matrix.h5 (10x Visium)"),
    Importer("hest", lambda p: (p / "st").is_dir() and ((p / "wsis").is_dir() or (p / "patches").is_dir()), _hest,
             False, "st/ + wsis/ or patches/ (HEST-1k)"),
    Importer("visium_hd", is_visium_hd, _visium_hd, True,
             "binned_outputs/square_NNNum/ (10x Visium HD, Space Ranger outs/)"),
    Importer("xenium", is_xenium, _xenium, True, "experiment.xenium + cell_feature_matrix.h5 + cells.parquet (10x Xenium)"),
)
BY_KIND = {i.kind: i for i in IMPORTERS}
DETECTION_ORDER = ("legacy_st", "hest", "visium_hd", "xenium", "visium")
KINDS = ("auto",) + tuple(i.kind for i in IMPORTERS)


def detect_kind(source: Path | str) -> str:
    """The kind of a source folder, from its layout (clear error otherwise)."""
    p = Path(source)
    if not p.exists():
        raise ImporterError(f"source not found: {p}")
    if not p.is_dir():
        raise ImporterError(f"{p} is a file; give the folder of a dataset (her2st root, Space Ranger or Xenium "
                            f"output, or HEST root with st/)")
    for kind in DETECTION_ORDER:
        if BY_KIND[kind].detect(p):
            return kind
    layouts = "; ".join(f"{i.layout}" for i in IMPORTERS)
    raise ImporterError(f"cannot tell the kind of {p}: expected one of: {layouts}; if it is one of these under other names, say which "
                        f"with --kind {' | '.join(k for k in KINDS if k != 'auto')} (kind=... in Python)")


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
    overwrite: bool = False,
    tile_um: float | None = None,
    min_tile_counts: int = DEFAULT_MIN_TILE_COUNTS,
    alignment: Path | str | None = None,
    per_cell: bool = False,
    pool_spots: int | None = None,
    subtile_um: float | None = None,
) -> dict:
    """Import one source folder (or several, written with one common gene set).

    sample_ids: for legacy ST / HEST, the sections / samples to import (default all); for Visium,
    Visium HD and Xenium, the name of each folder's sample (default the folder name).  image:
    full-resolution slide when not found in the folder (Visium, Visium HD, Xenium; legacy ST with one
    section).  prefer: HEST route ('auto' | 'patches' | 'wsi').  tile_um: Visium HD / Xenium tile
    side in µm (default patch_um); min_tile_counts: tiles with fewer counts are dropped.  alignment:
    Xenium H&E registration (10x alignment matrix CSV or Xenium Explorer keypoints CSV); per_cell:
    Xenium cells kept one observation each.  overwrite: replace a non-empty ``out_dir`` as a
    whole (refused otherwise; the new dataset never mixes with an old one).  pool_spots /
    subtile_um: write bags (``importers.bags``: K x K spots pooled into one observation, or each spot cut
    into sub-tiles of that many µm).  Returns a summary dict (per-sample counts of patches,
    padded / dropped spots, scale, files, warnings, seconds).
    """
    if kind not in KINDS:
        raise ImporterError(f"kind={kind!r}; use one of {KINDS}")
    check_bag_options(pool_spots, subtile_um, output)
    check_options(subtile_um or patch_um, target_um_per_px, normalize, output, source_um_per_px)
    check_import_target(Path(out_dir), overwrite)
    check_tile_options(tile_um, min_tile_counts)
    request = ImportRequest(patch_um=patch_um, target_um_per_px=target_um_per_px, source_um_per_px=source_um_per_px,
                            normalize=normalize, image=image, prefer=prefer, tile_um=tile_um,
                            min_tile_counts=min_tile_counts, alignment=alignment, per_cell=per_cell)
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise ImporterError("no source given")
    if isinstance(sample_ids, str):
        sample_ids = [sample_ids]
    kinds = [detect_kind(s) if kind == "auto" else kind for s in sources]
    n_folders = sum(BY_KIND[k].per_folder for k in kinds)
    if n_folders and sample_ids is not None and len(sample_ids) != n_folders:
        raise ImporterError(f"for Visium, Visium HD and Xenium folders, sample_ids names each folder's sample: "
                            f"{len(sample_ids)} names for {n_folders} folder(s)")
    specs: list[SampleSpec] = []
    names = iter(sample_ids) if (n_folders and sample_ids is not None) else None
    for s, k in zip(sources, kinds):
        imp = BY_KIND[k]
        which = (next(names) if names is not None else None) if imp.per_folder else sample_ids
        specs += imp.specs(Path(s), which, request)
    summary = run_import(specs, out_dir, kind=kinds[0] if len(set(kinds)) == 1 else "mixed", patch_um=patch_um,
                         target_um_per_px=target_um_per_px, normalize=normalize,
                         filter_background=filter_background, output=output, progress=progress,
                         overwrite=overwrite, pool_spots=pool_spots, subtile_um=subtile_um)
    summary["sources"] = [str(s) for s in sources]
    return summary


def check_tile_options(tile_um, min_tile_counts) -> None:
    if tile_um is not None and not (isinstance(tile_um, (int, float)) and tile_um > 0):
        raise ImporterError(f"tile_um must be a positive number of µm, got {tile_um!r}")
    if not (isinstance(min_tile_counts, int) and min_tile_counts >= 0):
        raise ImporterError(f"min_tile_counts must be an integer >= 0, got {min_tile_counts!r}")


__all__ = ["IMPORTERS", "KINDS", "ImportRequest", "detect_kind", "import_dataset"]
