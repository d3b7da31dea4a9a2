"""The one gene set of an import: the genes every sample has (intersection across samples)."""

from __future__ import annotations

from typing import Sequence

from .errors import ImporterError, warn
from .sample import SampleSpec


def common_genes(specs: Sequence[SampleSpec], messages: list[str] | None) -> tuple[list[str], dict]:
    """Genes present in every sample (order of the first sample)."""
    if not specs:
        raise ImporterError("no sample to import")
    sets = [set(s.genes) for s in specs]
    inter = set.intersection(*sets)
    genes = [g for g in specs[0].genes if g in inter]
    union = set.union(*sets)
    info = {
        "n_genes": len(genes),
        "n_genes_union": len(union),
        "n_genes_dropped": len(union) - len(genes),
        "dropped_per_sample": {s.sample_id: len(s.genes) - len(genes) for s in specs},
    }
    if len(specs) > 1 and info["n_genes_dropped"]:
        warn(messages, f"gene intersection over {len(specs)} samples keeps {len(genes)} genes and "
                       f"drops {info['n_genes_dropped']} of {len(union)} "
                       f"(dropped per sample: "
                       + ", ".join(f"{sample} {n:,}" for sample, n in info["dropped_per_sample"].items()) + ")")
    if not genes:
        raise ImporterError("the samples share no gene symbol; check that they use the same gene "
                            "naming (symbols vs Ensembl ids) or import them separately")
    return genes, info
