"""QuPath-readable GeoJSON of tile predictions: one square Polygon feature per tile.

Coordinates are level-0 slide pixels (x right, y down), as QuPath expects for an image's
objects. Each feature carries ``objectType`` "tile" and a ``measurements`` mapping
gene -> predicted value, so QuPath shows the predictions in its measurement table and can colour
tiles by any gene (File > Import objects from file, or drag the .geojson onto the open slide).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.files import atomic_path, hexpr_version

OBJECT_TYPE = "tile"


def tile_features(predictions: pd.DataFrame, centres: np.ndarray, tile_px: float, about: dict | None = None) -> dict:
    """FeatureCollection of squares of ``tile_px`` around ``centres`` (level-0 px), one per row;
    ``about`` (e.g. the model id and the units) joins every feature's properties."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if len(centres) != len(predictions):
        raise ValueError(f"{len(predictions)} prediction rows for {len(centres)} tile centres")
    half = float(tile_px) / 2
    genes = [str(g) for g in predictions.columns]
    values = predictions.to_numpy(np.float64)
    features = []
    for i, (tile_id, (cx, cy)) in enumerate(zip(predictions.index.astype(str), centres)):
        x0, y0, x1, y1 = (round(v, 2) for v in (cx - half, cy - half, cx + half, cy + half))
        features.append({
            "type": "Feature",
            "id": tile_id,
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": OBJECT_TYPE,
                "name": tile_id,
                **(about or {}),
                "measurements": {g: float(f"{v:.6g}") for g, v in zip(genes, values[i])},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_tile_geojson(path: str | Path, predictions: pd.DataFrame, centres: np.ndarray, tile_px: float,
                       about: dict | None = None) -> Path:
    """Write :func:`tile_features` atomically to ``path``."""
    collection = {**tile_features(predictions, centres, tile_px, about), "hexpr_version": hexpr_version()}  # a foreign member
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(collection, f, separators=(",", ":"))
    return Path(path)
