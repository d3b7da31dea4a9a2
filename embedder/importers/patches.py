"""Patch cutting in µm: a square of ``patch_um`` µm centred on each spot, resampled to a fixed size.

A spot coordinate ``(x, y)`` names the pixel at column ``x``, row ``y`` (numpy ``img[y, x]``);
its centre is the continuous position ``(x + 0.5, y + 0.5)`` where pixel ``i`` spans ``[i, i + 1)``
(Pillow's convention).  The patch is centred there, so a marker drawn as
``img[y-k:y+k+1, x-k:x+k+1]`` lands centred in the patch (centroid at ``((P-1)/2, (P-1)/2)``).
Patches come from a slide (:func:`cut_slide_patches`) or from HEST's ready patches
(:func:`copy_ready_patches`, resampled / centre-cropped when their scale differs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import h5py
import numpy as np

from hexpr.embedder.slides import ArraySlide, SlideImage, _to_rgb8, read_square

from .errors import ImporterError
from .sample import SampleData

NEAR_WHITE_LEVEL = 220                  # a pixel is "near-white" when all channels >= this
BACKGROUND_MAX_WHITE_FRACTION = 0.9     # patches whiter than this are background


def patch_size_px(patch_um: float, target_um_per_px: float) -> int:
    p = int(round(patch_um / target_um_per_px))
    if p < 8:
        raise ImporterError(f"patch of {patch_um} µm at {target_um_per_px} µm/px is only {p} px; "
                            f"increase patch_um or lower target_um_per_px")
    return p


def cut_patch(image: SlideImage, x: float, y: float, side_src: float, size: int) -> tuple[np.ndarray, bool]:
    """Square patch of ``side_src`` source pixels centred on pixel (x, y), resampled to ``size``.

    Returns ((size, size, 3) uint8, padded) where padded says the square reached outside the image.
    """
    return read_square(image, x + 0.5, y + 0.5, side_src, size, use_pyramid=False)


def white_fraction(patch: np.ndarray, level: int = NEAR_WHITE_LEVEL) -> float:
    return float((patch >= level).all(axis=-1).mean())


@dataclass
class PatchFlags:
    """Per spot: kept (not dropped as background), padded (reached beyond the slide), white fraction."""

    kept: np.ndarray
    padded: np.ndarray
    white: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "PatchFlags":
        return cls(np.ones(n, bool), np.zeros(n, bool), np.zeros(n, np.float32))

    def place(self, i: int, patch: np.ndarray, sink: Any, filter_background: bool) -> None:
        """Hand patch ``i`` to ``sink`` unless it is background (and background is filtered)."""
        self.white[i] = white_fraction(patch)
        if filter_background and self.white[i] > BACKGROUND_MAX_WHITE_FRACTION:
            self.kept[i] = False
        else:
            sink.put(i, patch)


def cut_slide_patches(image: SlideImage, coords: np.ndarray, side_src: float, size: int, sink: Any,
                      flags: PatchFlags, filter_background: bool, advance: Callable[[int], None]) -> None:
    """Cut one patch per spot centre (in the slide's cache-friendly order) into ``sink``."""
    for i in image.order(coords):
        patch, flags.padded[i] = cut_patch(image, coords[i, 0], coords[i, 1], side_src, size)
        flags.place(i, patch, sink, filter_background)
        advance(1)


def copy_ready_patches(data: SampleData, idx: np.ndarray, sink: Any, flags: PatchFlags, size: int,
                       patch_um: float, target_um_per_px: float, filter_background: bool,
                       advance: Callable[[int], None]) -> None:
    """HEST ready patches: copy (or resample/centre-crop) rows of patches_h5['img']."""
    assert data.patches_h5 is not None and data.patches_rows is not None
    rows = np.asarray(data.patches_rows)[idx]
    with h5py.File(data.patches_h5, "r") as f:
        img = f["img"]
        src_size = int(img.shape[1])
        src_mpp = float(data.patches_um_per_px or target_um_per_px)
        src_um = src_size * src_mpp
        if patch_um > src_um * 1.001:
            raise ImporterError(
                f"{data.patches_h5}: ready patches cover {src_um:.1f} µm but patch_um={patch_um}; "
                f"cut from the whole-slide image instead (put wsis/{data.sample_id}.tif beside st/) "
                f"or use patch_um <= {src_um:.1f}")
        same = src_size == size and abs(src_um - patch_um) < 1e-6 * max(1.0, patch_um)
        side_src = patch_um / src_mpp
        for i, r in enumerate(rows):
            p = np.asarray(img[int(r)])
            if p.ndim != 3 or p.shape[-1] < 3:
                raise ImporterError(f"{data.patches_h5}: img rows must be (H, W, 3) RGB, got {p.shape}")
            p = _to_rgb8(p, data.patches_h5)
            if not same:
                c = (src_size - 1) / 2.0
                p, _ = cut_patch(ArraySlide(p), c, c, side_src, size)
            flags.place(i, p, sink, filter_background)
            advance(1)
