"""Decode any patch image to an (H, W, 3) uint8 RGB array.

Handles grayscale, palette, RGBA/LA (composited over white, the slide background), CMYK,
16-bit and float images (PNG, TIFF, JPEG and whatever Pillow or tifffile reads).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # whole-slide JPEGs are large; patches are read by id, not blindly

_TIFF_SUFFIXES = {".tif", ".tiff"}


def array_to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Any 2-D or (H, W, C) numeric array -> (H, W, 3) uint8 RGB."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        scaled = arr
    elif arr.dtype.kind == "f":
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        scale = 255.0 if peak <= 1.0 else (255.0 / 65535.0 if peak > 255.0 else 1.0)
        scaled = np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    elif arr.dtype.kind in "ui":
        peak = int(arr.max()) if arr.size else 0
        if arr.dtype.itemsize == 1 or peak <= 255:
            scaled = np.clip(arr, 0, 255).astype(np.uint8)
        else:  # 16-bit range (also 16-bit data held in 32-bit ints)
            scaled = np.clip(arr.astype(np.float64) / 257.0, 0, 255).round().astype(np.uint8)
    elif arr.dtype == bool:
        scaled = arr.astype(np.uint8) * 255
    else:
        raise ValueError(f"unsupported image dtype {arr.dtype}")
    channels = scaled.shape[2]
    if channels == 1:
        return np.repeat(scaled, 3, axis=2)
    if channels == 2:  # gray + alpha
        return _composite_over_white(np.repeat(scaled[:, :, :1], 3, axis=2), scaled[:, :, 1])
    if channels == 3:
        return np.ascontiguousarray(scaled)
    if channels == 4:
        return _composite_over_white(scaled[:, :, :3], scaled[:, :, 3])
    return np.ascontiguousarray(scaled[:, :, :3])


def _composite_over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[:, :, None] / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return out.round().astype(np.uint8)


def pil_to_rgb_uint8(img: Image.Image) -> np.ndarray:
    if img.mode == "RGB":
        return np.array(img)  # a writable copy (torch.from_numpy needs one)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    return array_to_rgb_uint8(np.asarray(img))


def read_image_file(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB. Raises OSError/ValueError on bad files."""
    path = Path(path)
    if path.suffix.lower() in _TIFF_SUFFIXES:
        arr = tifffile.imread(path)
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 2, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) -> (H, W, C)
        return array_to_rgb_uint8(arr)
    with Image.open(path) as img:
        img.load()
        return pil_to_rgb_uint8(img)
