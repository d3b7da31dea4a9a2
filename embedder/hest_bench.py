"""HEST-Bench task folders: the task's samples, its train/test splits, its 50 genes and its targets.

    <task>/splits/train_<i>.csv, test_<i>.csv   sample_id, patches_path, expr_path (relative to <task>)
    <task>/patches/<sample>.h5                   img, barcode, coords (224 px at 0.5 µm/px)
    <task>/adata/<sample>.h5ad                   raw counts in X, obs index = barcodes
    <task>/var_50genes.json                      {"genes": [...]}: the genes the task scores

The task is a HEST-style dataset (ids ``<sample>/<barcode>``, group = sample), so every hexpr command
opens it.  Its targets follow HEST-Bench: log1p of the raw counts of the 50 genes, no size factor, for
the barcodes of each sample's patch file (HEST's ``load_adata(..., normalize=True)``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from hexpr.embedder.datasets import DatasetError, HestPatchDataset, read_hest

GENES_FILE = "var_50genes.json"
_SPLIT = re.compile(r"^(train|test)_(\d+)\.csv$")


@dataclass(frozen=True)
class Split:
    name: str
    train: tuple[str, ...]         # sample ids
    test: tuple[str, ...]


@dataclass
class BenchTask:
    root: Path
    genes: list[str]
    splits: list[Split]
    expression: dict[str, Path]    # sample -> its .h5ad

    @property
    def name(self) -> str:
        return self.root.name

    def dataset(self) -> HestPatchDataset:
        """The task's patches (every sample of any split), without reading the expression files."""
        return read_hest(self.root, with_expression=False)

    def targets(self, ids: list[str]) -> np.ndarray:
        """(len(ids), genes) float64: log1p of raw counts of the task genes, rows joined by id."""
        samples = pd.Series([i.split("/", 1)[0] for i in ids])
        barcodes = [i.split("/", 1)[1] for i in ids]
        Y = np.full((len(ids), len(self.genes)), np.nan)
        for sample, rows in samples.groupby(samples).groups.items():
            path = self.expression.get(sample)
            if path is None:
                raise DatasetError(f"{self.root}: sample {sample!r} has patches but no expression file in the splits")
            a = ad.read_h5ad(path, backed="r")
            try:
                missing = [g for g in self.genes if g not in a.var_names]
                if missing:
                    raise DatasetError(f"{path}: task gene(s) {missing[:5]} missing ({len(missing)} of {len(self.genes)})")
                want = [barcodes[r] for r in rows]
                obs = pd.Index(a.obs_names.astype(str))
                pos = obs.get_indexer(want)
                if (pos < 0).any():
                    raise DatasetError(f"{path}: {int((pos < 0).sum())} patch barcode(s) have no row, e.g. "
                                       f"{[w for w, p in zip(want, pos) if p < 0][:3]}")
                cols = pd.Index(a.var_names.astype(str)).get_indexer(self.genes)
                X = a.X[np.sort(pos)]
                X = X.toarray() if sp.issparse(X) else np.asarray(X)
                order = np.argsort(np.argsort(pos))
                Y[np.asarray(rows)] = np.log1p(np.asarray(X[order][:, cols], np.float64))
            finally:
                a.file.close()
        return Y


def is_bench_task(path: Path | str) -> bool:
    p = Path(path)
    return (p / "splits").is_dir() and (p / GENES_FILE).is_file() and (p / "patches").is_dir()


def _read_split_file(root: Path, path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str)
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"cannot read split file {path}: {e}") from e
    need = {"sample_id", "patches_path", "expr_path"}
    if not need <= set(df.columns):
        raise DatasetError(f"{path}: columns {sorted(need - set(df.columns))} missing; a HEST-Bench split lists "
                           f"sample_id, patches_path, expr_path")
    return df


def read_task(path: Path | str) -> BenchTask:
    """A HEST-Bench task folder (clear error naming what is missing)."""
    root = Path(path)
    if not is_bench_task(root):
        raise DatasetError(f"{root} is not a HEST-Bench task folder: expected splits/train_<i>.csv + test_<i>.csv, "
                           f"patches/, adata/ and {GENES_FILE}")
    try:
        genes = [str(g) for g in json.loads((root / GENES_FILE).read_text())["genes"]]
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"{root / GENES_FILE}: expected {{\"genes\": [...]}} ({e})") from e
    files: dict[tuple[str, int], pd.DataFrame] = {}
    for p in sorted((root / "splits").iterdir()):
        m = _SPLIT.match(p.name)
        if m:
            files[(m.group(1), int(m.group(2)))] = _read_split_file(root, p)
    numbers = sorted({i for _, i in files})
    if not numbers:
        raise DatasetError(f"{root / 'splits'}: no train_<i>.csv / test_<i>.csv")
    splits, expression = [], {}
    for i in numbers:
        if ("train", i) not in files or ("test", i) not in files:
            raise DatasetError(f"{root / 'splits'}: split {i} needs both train_{i}.csv and test_{i}.csv")
        for part in ("train", "test"):
            for _, row in files[(part, i)].iterrows():
                expression[str(row["sample_id"])] = root / str(row["expr_path"])
                if not (root / str(row["patches_path"])).is_file():
                    raise DatasetError(f"{root / 'splits' / f'{part}_{i}.csv'}: {row['patches_path']} not found")
        train = tuple(files[("train", i)]["sample_id"].astype(str))
        test = tuple(files[("test", i)]["sample_id"].astype(str))
        if set(train) & set(test):
            raise DatasetError(f"split {i}: sample(s) {sorted(set(train) & set(test))} are in both train and test")
        splits.append(Split(f"split {i}", train, test))
    return BenchTask(root, genes, splits, expression)
