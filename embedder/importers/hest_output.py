"""HEST-style output of one sample: ``patches/<sample>.h5`` (img, barcode, coords, attrs) and
``st/<sample>.h5ad`` (normalised X, raw counts in ``layers['counts']``, ``obsm['spatial']``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp


def patch_file_path(out_dir: Path, sid: str) -> Path:
    return out_dir / "patches" / f"{sid}.h5"


def expression_file_path(out_dir: Path, sid: str) -> Path:
    return out_dir / "st" / f"{sid}.h5ad"


class H5PatchSink:
    """Patches written straight into ``img`` of an HDF5 file; dropped rows compacted by finish()."""

    def __init__(self, path: Path, n: int, size: int):
        self.path = path
        self.f = h5py.File(path, "w")
        self.size = size
        self.img = self.f.create_dataset("img", shape=(n, size, size, 3), maxshape=(None, size, size, 3),
                                         dtype=np.uint8, chunks=(1, size, size, 3))

    def put(self, i: int, patch: np.ndarray) -> None:
        self.img[i] = patch

    def finish(self, keep: np.ndarray, barcodes: list[str], coords: np.ndarray, attrs: dict,
               bags: list[str] | None = None) -> None:
        """``bags``: the observation id of each patch (a bagged dataset, see importers.bags)."""
        idx = np.flatnonzero(keep)
        if len(idx) != len(keep):
            for j, i in enumerate(idx):        # in-place compaction (j <= i)
                if i != j:
                    self.img[j] = self.img[i]
            self.img.resize((len(idx), self.size, self.size, 3))
        b = [barcodes[i].encode("utf-8") for i in idx]
        width = max(1, max((len(x) for x in b), default=1))
        self.f.create_dataset("barcode", data=np.array(b, dtype=f"S{width}").reshape(-1, 1))
        self.f.create_dataset("coords", data=np.asarray(coords, np.float64)[idx].reshape(-1, 2))
        if bags is not None:
            labels = [bags[i].encode("utf-8") for i in idx]
            self.f.create_dataset("bag", data=np.array(labels, dtype=f"S{max(1, max(map(len, labels), default=1))}").reshape(-1, 1))
        for k, v in attrs.items():
            self.f.attrs[k] = v
        self.f.close()

    def close(self):
        try:
            self.f.close()
        except Exception:  # noqa: BLE001
            pass


def spot_table(sid: str, barcodes: list[str], extra: pd.DataFrame | None) -> pd.DataFrame:
    """obs of a sample: ``group`` = the sample id, then the importer's extra per-spot columns."""
    obs = pd.DataFrame(index=pd.Index(barcodes, dtype=object))
    obs["group"] = sid
    if extra is not None:
        for c in extra.columns:
            if c != "group":
                obs[c] = extra[c].to_numpy()
    return obs


def write_h5ad(path: Path, X: Any, counts: sp.csr_matrix, obs: pd.DataFrame, genes: list[str],
               coords: np.ndarray, provenance: dict) -> None:
    var = pd.DataFrame(index=pd.Index(genes, dtype=object))
    adata = ad.AnnData(X=X, obs=obs, var=var, layers={"counts": counts})
    adata.obsm["spatial"] = np.asarray(coords, np.float64)
    adata.uns["hexpr_import"] = provenance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # anndata's str->categorical notices
        adata.write_h5ad(path)
