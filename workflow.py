"""End-to-end stages that compose the embedder and the heads; what the CLI calls, usable from Python.

Each function takes paths and options, does one stage, writes its outputs atomically (temporary
name, then rename) and returns a plain dict report.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from embedder.backbones import BackboneSpec
from embedder.cache import DEFAULT_CACHE_DIR
from embedder.datasets import ID_COLUMN, DatasetError, open_dataset
from embedder.features import FeatureSet, ensure_features
from heads.evaluation import evaluate_tables
from heads.metrics import N_TOP_DEFAULT


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))
    return Path(path)


def write_table(path: str | Path, frame: pd.DataFrame, index_label: str | None = ID_COLUMN) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index_label is not None, index_label=index_label, float_format="%.6g")
    return Path(path)


# ----------------------------------------------------------------------------- embed


def embed(data: str | Path, specs: list[BackboneSpec], cache_dir=DEFAULT_CACHE_DIR, **options) -> FeatureSet:
    """Open a dataset and make sure every backbone's features are cached; returns the aligned features."""
    return ensure_features(open_dataset(data), specs, cache_dir, **options)


# ----------------------------------------------------------------------------- evaluate


def read_expression_table(path: str | Path) -> pd.DataFrame:
    """A truth or prediction table: a CSV with ID + genes, a dataset (CSV with paths, HEST .h5/folder) or an .h5ad."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    if path.suffix.lower() == ".h5ad":
        import anndata

        adata = anndata.read_h5ad(path)
        matrix = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
        return pd.DataFrame(matrix, index=adata.obs_names.astype(str), columns=adata.var_names.astype(str))
    if path.suffix.lower() == ".csv":
        header = pd.read_csv(path, nrows=0).columns
        if ID_COLUMN not in header:
            raise DatasetError(f"{path}: needs an {ID_COLUMN!r} column (found {list(header)[:5]})")
        if "path" not in header:
            frame = pd.read_csv(path, dtype={ID_COLUMN: str}).set_index(ID_COLUMN)
            bad = frame.apply(pd.to_numeric, errors="coerce").isna() & frame.notna()
            if bad.to_numpy().any():
                r, c = np.argwhere(bad.to_numpy())[0]
                raise DatasetError(f"{path}, line {r + 2}, column {frame.columns[c]!r}: {frame.iat[r, c]!r} is not a number")
            return frame.astype(np.float64)
    dataset = open_dataset(path)
    if dataset.targets is None:
        raise DatasetError(f"{path} holds no expression values to compare with")
    return dataset.targets


def evaluate(pred_path: str | Path, truth_path: str | Path, out_dir: str | Path | None = None,
             n_top: int = N_TOP_DEFAULT, gene_list_path: str | Path | None = None) -> dict:
    """Score predictions against truth; writes ``<pred>.scores.json`` and ``<pred>.per_gene.csv``."""
    pred_path = Path(pred_path)
    pred = read_expression_table(pred_path)
    truth = read_expression_table(truth_path)
    genes = None
    if gene_list_path is not None:
        genes = [g.strip() for g in Path(gene_list_path).read_text().replace(",", "\n").splitlines() if g.strip()]
    report, per_gene = evaluate_tables(pred, truth, n_top=n_top, gene_list=genes,
                                       pred_name=str(pred_path), truth_name=str(truth_path))
    out_dir = Path(out_dir) if out_dir is not None else pred_path.parent
    stem = pred_path.stem
    report["predictions"], report["truth"] = str(pred_path), str(truth_path)
    report["scores_json"] = str(write_json(out_dir / f"{stem}.scores.json", report))
    report["per_gene_csv"] = str(write_table(out_dir / f"{stem}.per_gene.csv", per_gene, index_label=None))
    return report
