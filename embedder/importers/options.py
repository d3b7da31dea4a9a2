"""Validation of the options every import takes (clear error naming the option)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ImporterError
from .expression import NORMALIZATIONS
from .patches import patch_size_px

OUTPUTS = ("hest", "challenge")


def given_file(path: Path | str | None, what: str) -> Path | None:
    """The file the user named for ``what`` (e.g. "image", "alignment"), checked to exist; None when not given."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ImporterError(f"{what} file not found: {p}")
    return p


def check_options(patch_um, target_um_per_px, normalize, output, source_um_per_px=None) -> None:
    if not (isinstance(patch_um, (int, float)) and patch_um > 0):
        raise ImporterError(f"patch_um must be a positive number of µm, got {patch_um!r}")
    if not (isinstance(target_um_per_px, (int, float)) and target_um_per_px > 0):
        raise ImporterError(f"target_um_per_px must be positive, got {target_um_per_px!r}")
    if source_um_per_px is not None and not (isinstance(source_um_per_px, (int, float)) and source_um_per_px > 0):
        raise ImporterError(f"source_um_per_px must be positive, got {source_um_per_px!r}")
    if normalize not in NORMALIZATIONS:
        raise ImporterError(f"normalize={normalize!r}; use one of {NORMALIZATIONS}")
    if output not in OUTPUTS:
        raise ImporterError(f"output={output!r}; use one of {OUTPUTS}")
    patch_size_px(patch_um, target_um_per_px)


@dataclass(frozen=True)
class ImportSettings:
    """The options of one import, checked, with the patch side in pixels derived from them."""

    kind: str
    out_dir: Path
    patch_um: float
    target_um_per_px: float
    size: int                           # patch side in pixels: round(patch_um / target_um_per_px)
    normalize: str
    filter_background: bool
    output: str
    max_inmemory_bytes: int | None = None
    pool_spots: int | None = None       # K x K spots pooled into one observation (importers.bags)
    subtile_um: float | None = None     # each spot cut into sub-tiles of this side (then patch_um == subtile_um)
