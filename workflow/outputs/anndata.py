"""Predictions as AnnData (.h5ad): X = predicted expression, obs = spots or tiles, obsm['spatial'], uns provenance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.files import atomic_path, hexpr_version


def _h5ad_safe(value):
    """Drop None (h5ad cannot store it) and turn lists of mixed types into strings."""
    if isinstance(value, dict):
        return {k: _h5ad_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        if all(isinstance(v, dict) for v in value):
            return {str(i): _h5ad_safe(v) for i, v in enumerate(value)}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) or all(isinstance(v, str) for v in value):
            return value
        return [json.dumps(v) for v in value]
    return value


def provenance_uns(provenance: dict) -> dict:
    """``provenance`` as AnnData can store it in ``uns`` (JSON types, no None, no mixed lists), with the
    hexpr version that wrote it (``hexpr_version``)."""
    return _h5ad_safe(json.loads(json.dumps({"hexpr_version": hexpr_version(), **provenance}, default=str)))


def write_anndata(path, predictions: pd.DataFrame, coords, groups, provenance: dict,
                  obs: pd.DataFrame | None = None, uns: dict | None = None, layers: dict | None = None,
                  compression: str | None = None) -> Path:
    """Predictions as AnnData: X = predicted expression, obs = spots, obsm['spatial'] when known.
    ``obs``: extra per-row columns (same row order); ``uns``: extra entries (e.g. scanpy's 'spatial');
    ``layers``: name -> array or frame shaped like the predictions (e.g. ``std``, ``lower``, ``upper``);
    ``compression``: h5py compression of every array (e.g. "gzip"), none by default."""
    import anndata

    obs = pd.DataFrame(index=predictions.index.astype(str)) if obs is None else obs.set_axis(predictions.index.astype(str))
    if groups is not None:
        obs["group"] = pd.Categorical(np.asarray(groups).astype(str))
    adata = anndata.AnnData(X=predictions.to_numpy(np.float32), obs=obs, var=pd.DataFrame(index=predictions.columns.astype(str)))
    if coords is not None:
        adata.obsm["spatial"] = np.asarray(coords, dtype=np.float64)
    adata.uns["hexpr"] = provenance_uns(provenance)
    adata.uns.update(uns or {})
    for name, values in (layers or {}).items():
        adata.layers[name] = np.asarray(values, dtype=np.float32)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression=compression)
    return Path(path)


