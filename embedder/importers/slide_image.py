"""A sample's full-resolution slide: opened through embedder.slides' reader table, spots outside it dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hexpr.embedder import slides
from hexpr.embedder.slides import SlideError, SlideImage

from .errors import ImporterError, warn

OUTSIDE_ERROR_FRACTION = 0.5            # more spots than this outside the image -> error


def open_image(path: Path | str, messages: list[str] | None = None,
               max_inmemory_bytes: int | None = None) -> SlideImage:
    """Open a full-resolution slide (any format of :data:`embedder.slides.SLIDE_READERS`)."""
    try:
        s = slides.open_image(path, messages, max_inmemory_bytes)
    except ImporterError:
        raise
    except SlideError as e:
        raise ImporterError(str(e)) from e
    if getattr(s, "exif_orientation", 1) not in (1, None):
        warn(messages, f"{path}: EXIF orientation {s.exif_orientation} is ignored; spot "
                       f"coordinates are taken in the stored pixel layout")
    return s


def drop_spots_outside(image: SlideImage, coords: np.ndarray, keep: np.ndarray, sid: str, path: Path,
                       messages: list[str] | None) -> tuple[np.ndarray, int]:
    """(``keep`` without the spots whose centre lies outside the image, how many those were).

    An error when more than :data:`OUTSIDE_ERROR_FRACTION` of the spots are outside: the spot
    positions then belong to another image.
    """
    W, H = image.width, image.height
    inside = (coords[:, 0] >= 0) & (coords[:, 0] < W) & (coords[:, 1] >= 0) & (coords[:, 1] < H)
    n_out = int((keep & ~inside).sum())
    if n_out and n_out > OUTSIDE_ERROR_FRACTION * max(1, int(keep.sum())):
        raise ImporterError(
            f"{sid}: {n_out} of {int(keep.sum())} spot centres lie outside the {W}x{H} image "
            f"{path} (x range {np.nanmin(coords[:, 0]):.0f}..{np.nanmax(coords[:, 0]):.0f}, "
            f"y range {np.nanmin(coords[:, 1]):.0f}..{np.nanmax(coords[:, 1]):.0f}); the coordinates "
            f"are probably for a different (full-resolution) image: pass the slide the spot "
            f"positions refer to")
    if n_out:
        warn(messages, f"{sid}: {n_out} spot centre(s) lie outside the {W}x{H} image "
                       f"{path} and are skipped")
    return keep & inside, n_out
