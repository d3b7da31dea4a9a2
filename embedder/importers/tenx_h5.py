"""The 10x Genomics HDF5 feature-barcode matrix (Space Ranger, Visium HD bins, Xenium cells).

    matrix/data, indices, indptr, shape     CSC over barcodes: column j = barcode j, rows = features
    matrix/barcodes                         one id per column
    matrix/features/name, feature_type      gene symbol and type ("Gene Expression", control probes, ...)

Read whole (:func:`read_10x_h5`) or barcode chunk by barcode chunk (:meth:`TenxH5.row_chunks`), so
that millions of Visium HD bins are pooled without holding the matrix twice.  CellRanger 2 files
(one group per genome with gene_names) are read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import scipy.sparse as sp

from .errors import ImporterError, warn
from .expression import counts_to_csr
from .names import make_unique

GENE_EXPRESSION = "Gene Expression"
NNZ_PER_CHUNK = 20_000_000           # stored values read at once by row_chunks


def decode(a) -> list[str]:
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in np.asarray(a).ravel()]


@dataclass
class TenxH5:
    """An opened-and-closed 10x HDF5 matrix: its barcodes, features and where the values are."""

    path: Path
    group: str                       # HDF5 group holding data / indices / indptr
    barcodes: list[str]
    names: list[str]                 # feature names as stored (not yet unique)
    feature_types: list[str] | None
    n_features: int

    @classmethod
    def open(cls, path: Path | str, barcodes: bool = True) -> "TenxH5":
        """Read the feature table and (unless ``barcodes=False``, e.g. for the gene list) the barcodes."""
        path = Path(path)
        try:
            f = h5py.File(path, "r")
        except Exception as e:  # noqa: BLE001
            raise ImporterError(f"cannot open 10x matrix {path}: {e}") from e
        with f:
            if "matrix" in f:
                g = f["matrix"]
                feats = g.get("features")
                if feats is None or "name" not in feats:
                    raise ImporterError(f"{path}: matrix/features/name missing; not a 10x feature-barcode matrix")
                names = decode(feats["name"][:])
                ftype = decode(feats["feature_type"][:]) if "feature_type" in feats else None
            else:   # CellRanger 2: one group per genome with genes / gene_names
                groups = [k for k in f.keys() if isinstance(f[k], h5py.Group) and "gene_names" in f[k]]
                if not groups:
                    raise ImporterError(f"{path}: no 'matrix' group; not a 10x HDF5 count matrix")
                g = f[groups[0]]
                names = decode(g["gene_names"][:])
                ftype = None
            for k in ("data", "indices", "indptr", "shape", "barcodes"):
                if k not in g:
                    raise ImporterError(f"{path}: dataset {g.name}/{k} missing; not a 10x HDF5 count matrix")
            n_feat, n_bc = (int(v) for v in g["shape"][:])
            bcs = decode(g["barcodes"][:]) if barcodes else []
            if (barcodes and len(bcs) != n_bc) or len(names) != n_feat:
                raise ImporterError(f"{path}: shape {n_feat} x {n_bc} does not match {len(names)} features and "
                                    f"{len(bcs)} barcodes")
            return cls(path, g.name, bcs, names, ftype, n_feat)

    def row_chunks(self, nnz_per_chunk: int = NNZ_PER_CHUNK) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """(first barcode, end barcode, counts barcodes x all features as CSR) chunk by chunk."""
        with h5py.File(self.path, "r") as f:
            g = f[self.group]
            indptr = np.asarray(g["indptr"][:], np.int64)
            n = len(indptr) - 1
            start = 0
            while start < n:
                stop = int(np.searchsorted(indptr, indptr[start] + max(1, nnz_per_chunk), side="right")) - 1
                stop = min(n, max(stop, start + 1))
                a, b = int(indptr[start]), int(indptr[stop])
                m = sp.csr_matrix((g["data"][a:b], g["indices"][a:b], indptr[start:stop + 1] - a),
                                  shape=(stop - start, self.n_features))
                yield start, stop, m
                start = stop

    def gene_columns(self) -> np.ndarray:
        """Columns of the 'Gene Expression' features (all columns when types are not stored)."""
        if self.feature_types is None:
            return np.arange(self.n_features)
        keep = np.array([t == GENE_EXPRESSION for t in self.feature_types])
        return np.flatnonzero(keep) if keep.any() else np.arange(self.n_features)

    def genes(self) -> list[str]:
        """Unique symbols of the gene-expression features (AnnData-style -1, -2 suffixes)."""
        return make_unique([self.names[j] for j in self.gene_columns()])[0]

    def dropped_features(self) -> dict[str, int]:
        """Number of features per non-gene-expression type (controls, unassigned codewords, ...)."""
        if self.feature_types is None or not any(t == GENE_EXPRESSION for t in self.feature_types):
            return {}
        out: dict[str, int] = {}
        for t in self.feature_types:
            if t != GENE_EXPRESSION:
                out[t] = out.get(t, 0) + 1
        return out


def read_10x_h5(path: Path | str, messages: list[str] | None = None) -> tuple[list[str], list[str], sp.csr_matrix]:
    """(barcodes, gene symbols (unique), counts barcodes x genes CSR) of a 10x HDF5 matrix."""
    m = TenxH5.open(path)
    with h5py.File(m.path, "r") as f:
        g = f[m.group]
        csc = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=(m.n_features, len(m.barcodes)))
    return finish_matrix(m.path, m.barcodes, m.names, m.feature_types, csc.T.tocsr(), messages)


def read_10x_h5_genes(path: Path | str) -> list[str]:
    """Gene symbols only (cheap) — same names and order as :func:`read_10x_h5`."""
    return TenxH5.open(path, barcodes=False).genes()


def finish_matrix(path, barcodes, names, ftype, m, messages):
    """Keep the gene-expression features, make symbols unique, check barcodes, counts as CSR."""
    if ftype is not None:
        keep = np.array([t == GENE_EXPRESSION for t in ftype])
        if not keep.all():
            if keep.any():
                warn(messages, f"{path}: {int((~keep).sum())} non-'Gene Expression' feature(s) dropped")
                m = m[:, np.flatnonzero(keep)]
                names = [n for n, k in zip(names, keep) if k]
    genes, n_ren = make_unique(names)
    if n_ren:
        warn(messages, f"{path}: {n_ren} duplicated gene symbol(s) renamed with -1, -2, ... suffixes")
    if len(set(barcodes)) != len(barcodes):
        raise ImporterError(f"{path}: duplicated barcodes in the count matrix")
    counts, _ = counts_to_csr(m)
    return barcodes, genes, counts
