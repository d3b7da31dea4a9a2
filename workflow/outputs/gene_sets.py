"""Gene programs: read gene sets (GMT, or a two-column CSV/TSV ``set,gene``) and score tiles by them.

The score of a set at a tile is the mean, over the set's genes that the model predicts, of each
gene's predicted value z-scored across the slide's tiles (mean 0, standard deviation 1 per gene;
a gene predicted constant over the slide contributes 0). Like scanpy's ``score_genes`` in spirit,
but without its random reference set of control genes: the score says where on this slide the
program is high or low relative to the slide's own average, and is not comparable across slides.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.errors import DataError, MissingInputError

SCORE_PREFIX = "score_"
GMT_SUFFIXES = (".gmt",)
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
SCORE_METHOD = ("score_<set> = mean over the set's predicted genes of each gene's prediction z-scored across this "
                "slide's tiles (constant genes count 0); no control-gene reference, so relative within the slide")


def _read_gmt(path: Path) -> dict[str, list[str]]:
    """GMT: one set a line, tab-separated: name, description, gene, gene, ..."""
    sets: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) < 3 or not fields[0]:
            raise DataError(f"{path}, line {number}: a GMT line is 'name<TAB>description<TAB>gene<TAB>...'; "
                            f"found {len(fields)} tab-separated field(s)")
        sets.setdefault(fields[0], []).extend(g for g in fields[2:] if g)
    return sets


def _read_pairs(path: Path, delimiter: str) -> dict[str, list[str]]:
    """Two columns, one (set, gene) pair a row; an optional header row ``set,gene``."""
    sets: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        for number, row in enumerate(csv.reader(f, delimiter=delimiter), 1):
            row = [c.strip() for c in row]
            if not any(row):
                continue
            if len(row) != 2 or not all(row):
                raise DataError(f"{path}, line {number}: expected two columns 'set{delimiter}gene', found {row[:4]}")
            if number == 1 and [c.lower() for c in row] == ["set", "gene"]:
                continue
            sets.setdefault(row[0], []).append(row[1])
    return sets


def read_gene_sets(path: str | Path, model_genes: list[str]) -> dict[str, list[str]]:
    """{set: the set's genes that ``model_genes`` holds, in file order}. A file that is missing, of an
    unknown format or empty, or a set none of whose genes the model predicts, is a DataError naming
    the file and the set."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"--gene-sets {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in GMT_SUFFIXES:
        sets = _read_gmt(path)
    elif suffix in TABLE_SUFFIXES:
        sets = _read_pairs(path, TABLE_SUFFIXES[suffix])
    else:
        raise DataError(f"--gene-sets {path}: unknown format {suffix or '(no suffix)'!r}; give a .gmt file or a two-column "
                        f"{'/'.join(TABLE_SUFFIXES)} table of set,gene rows")
    if not sets:
        raise DataError(f"--gene-sets {path} holds no gene set")
    known = set(model_genes)
    used = {}
    for name, genes in sets.items():
        present = [g for g in dict.fromkeys(genes) if g in known]
        if not present:
            raise DataError(f"--gene-sets {path}: set {name!r} has none of its {len(set(genes))} genes (e.g. {genes[:3]}) "
                            f"among the model's {len(model_genes)} genes; remove the set or use a model that predicts them")
        used[name] = present
    return used


def score_gene_sets(predictions: pd.DataFrame, gene_sets: dict[str, list[str]]) -> pd.DataFrame:
    """One column ``score_<set>`` per set: the mean over the set's genes of their predictions
    z-scored across the rows (tiles); see the module docstring."""
    columns = sorted({g for genes in gene_sets.values() for g in genes})
    values = predictions[columns].to_numpy(np.float64)
    std = values.std(axis=0)
    z = np.divide(values - values.mean(axis=0), std, out=np.zeros_like(values), where=std > 0)
    z = pd.DataFrame(z, index=predictions.index, columns=columns)
    return pd.DataFrame({f"{SCORE_PREFIX}{name}": z[genes].mean(axis=1).astype(np.float32)
                         for name, genes in gene_sets.items()}, index=predictions.index)
