"""Expression tables (spots x genes): read from any supported file, and scored against a truth table
joined by spot id and gene name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.datasets import ID_COLUMN, OBSERVATION_COLUMN, numeric_columns, open_dataset
from hexpr.embedder.errors import DataError, MissingInputError
from hexpr.heads.metrics import N_TOP_DEFAULT, challenge_score, pearson_per_gene, top_genes


class EvaluationError(DataError):
    """Prediction and truth cannot be compared; the message says why and what to do."""


def _examples(items, limit: int = 5) -> str:
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def align(pred: pd.DataFrame, truth: pd.DataFrame, pred_name: str = "predictions", truth_name: str = "truth") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of ``truth`` order and columns of ``truth`` order, matched by index and name."""
    for frame, name in ((pred, pred_name), (truth, truth_name)):
        if frame.index.duplicated().any():
            raise EvaluationError(f"{name}: duplicate ids, e.g. {frame.index[frame.index.duplicated()][0]!r}")
    missing_ids = truth.index.difference(pred.index)
    if len(missing_ids):
        raise EvaluationError(f"{pred_name} lacks {len(missing_ids)} spot ids of {truth_name} (e.g. {_examples(missing_ids)})")
    pred_genes = set(pred.columns)
    missing_genes = [g for g in truth.columns if g not in pred_genes]
    if missing_genes:
        raise EvaluationError(f"{pred_name} lacks {len(missing_genes)} genes of {truth_name} (e.g. {_examples(missing_genes)})")
    pred = pred.loc[truth.index, list(truth.columns)]
    for frame, name in ((pred, pred_name), (truth, truth_name)):
        values = frame.to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            r, c = np.argwhere(~np.isfinite(values))[0]
            raise EvaluationError(f"{name}: NaN/inf at id {frame.index[r]!r}, gene {frame.columns[c]!r}")
    return pred, truth


def evaluate_tables(pred: pd.DataFrame, truth: pd.DataFrame, n_top: int = N_TOP_DEFAULT, gene_list: list[str] | None = None,
                    pred_name: str = "predictions", truth_name: str = "truth") -> tuple[dict, pd.DataFrame]:
    """Challenge score and terms, mean Pearson over the top-``n_top`` HVGs and over ``gene_list``; per-gene table."""
    pred, truth = align(pred, truth, pred_name, truth_name)
    p, t = pred.to_numpy(np.float64), truth.to_numpy(np.float64)
    report = challenge_score(p, t, n_top=n_top)
    r = pearson_per_gene(p, t)
    hvg = top_genes(t, n_top, "variance")
    report["mean_corr_hvg"] = float(r[hvg].mean())
    if gene_list:
        unknown = [g for g in gene_list if g not in set(truth.columns)]
        if unknown:
            raise EvaluationError(f"gene list names {len(unknown)} genes absent from {truth_name} (e.g. {_examples(unknown)})")
        index = truth.columns.get_indexer(gene_list)
        report["mean_corr_gene_list"] = float(r[index].mean())
        report["n_gene_list"] = len(gene_list)
    per_gene = pd.DataFrame({
        "gene": truth.columns,
        "pearson": r,
        "truth_mean": t.mean(axis=0),
        "truth_variance": t.var(axis=0),
        "is_top_hvg": np.isin(np.arange(t.shape[1]), hvg),
        "is_top_heg": np.isin(np.arange(t.shape[1]), top_genes(t, n_top, "sum")),
    }).sort_values("pearson", ascending=False, kind="stable")
    return report, per_gene


def read_expression_table(path: str | Path) -> pd.DataFrame:
    """A truth or prediction table: a CSV with ID + genes, a dataset (CSV with paths, HEST .h5/folder) or an .h5ad.

    Example::

        >>> truth = hexpr.read_expression_table("demo/test_truth.csv")
        >>> truth.shape                                 # spots x genes, indexed by id
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path} does not exist")
    if path.suffix.lower() == ".h5ad":
        import anndata

        adata = anndata.read_h5ad(path)
        matrix = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
        return pd.DataFrame(matrix, index=adata.obs_names.astype(str), columns=adata.var_names.astype(str))
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, newline="") as f:
            header = [c.strip() for c in next(csv.reader(f), [])]
        if ID_COLUMN not in header:
            raise DataError(f"{path}: needs an {ID_COLUMN!r} column (found {list(header)[:5]})")
        if "path" not in header:
            frame = pd.read_csv(path, dtype={ID_COLUMN: str}, low_memory=False)
            genes = [c for c in frame.columns if c not in (ID_COLUMN, OBSERVATION_COLUMN)]
            return numeric_columns(frame, genes, path, "expression").set_axis(pd.Index(frame[ID_COLUMN], name=ID_COLUMN))
    dataset = open_dataset(path)
    if dataset.targets is None:
        raise DataError(f"{path} holds no expression values to compare with")
    return dataset.targets


def read_observations(path: str | Path) -> pd.Series | None:
    """The observation each row of a prediction table belongs to (``hexpr predict`` on a bagged
    dataset writes it: the CSV's ``observation`` column, ``obs['observation']`` of an .h5ad), by row
    id; None when the table has none."""
    path = Path(path)
    if path.suffix.lower() == ".h5ad":
        import anndata

        obs = anndata.read_h5ad(path, backed="r").obs
        if OBSERVATION_COLUMN not in obs:
            return None
        return pd.Series(obs[OBSERVATION_COLUMN].astype(str).to_numpy(), index=obs.index.astype(str))
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, newline="") as f:
            header = [c.strip() for c in next(csv.reader(f), [])]
        if OBSERVATION_COLUMN not in header or ID_COLUMN not in header:
            return None
        frame = pd.read_csv(path, usecols=[ID_COLUMN, OBSERVATION_COLUMN], dtype=str)
        return pd.Series(frame[OBSERVATION_COLUMN].to_numpy(), index=frame[ID_COLUMN].to_numpy())
    return None


def per_observation(pred: pd.DataFrame, observations: pd.Series | None, truth: pd.DataFrame) -> pd.DataFrame | None:
    """Sub-tile predictions averaged per observation, when ``truth`` is measured per observation (its
    ids are the observations, not the rows); None when that does not apply."""
    if observations is None or truth.index.isin(pred.index).any():
        return None
    labels = observations.reindex(pred.index.astype(str))
    if labels.isna().any() or not truth.index.isin(labels.to_numpy()).all():
        return None
    return pred.groupby(labels.to_numpy()).mean()
