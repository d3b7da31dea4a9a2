"""Score predictions against measured expression (the challenge score and per-gene Pearson)."""
from __future__ import annotations

from pathlib import Path

from hexpr.embedder.files import write_json
from hexpr.heads.metrics import N_TOP_DEFAULT
from hexpr.workflow.expression_tables import evaluate_tables, per_observation, read_expression_table, read_observations
from hexpr.workflow.options import WHOLE_POSITIVE, check_option, check_output_folder
from hexpr.workflow.outputs.plots import make_report_plots
from hexpr.workflow.outputs.tables import write_table


def evaluate(pred_path: str | Path, truth_path: str | Path, out_dir: str | Path | None = None,
             n_top: int = N_TOP_DEFAULT, gene_list_path: str | Path | None = None) -> dict:
    """Score predictions against truth; writes ``<pred>.scores.json`` and ``<pred>.per_gene.csv``.
    Sub-tile predictions of a bagged dataset (rows naming their ``observation``) scored against truth
    measured per observation are averaged per observation first.

    Example::

        >>> scores = hexpr.evaluate("pred.csv", "demo/test_truth.csv")
        >>> scores["score"]                              # the 2024 challenge score
    """
    check_option("--n-top", n_top, WHOLE_POSITIVE)
    check_output_folder("--out-dir", out_dir)
    pred_path = Path(pred_path)
    pred = read_expression_table(pred_path)
    truth = read_expression_table(truth_path)
    regions = per_observation(pred, read_observations(pred_path), truth)
    if regions is not None:   # sub-tile predictions against region-level truth: each region's mean prediction
        pred = regions
    genes = None
    if gene_list_path is not None:
        genes = [g.strip() for g in Path(gene_list_path).read_text().replace(",", "\n").splitlines() if g.strip()]
    report, per_gene = evaluate_tables(pred, truth, n_top=n_top, gene_list=genes,
                                       pred_name=str(pred_path), truth_name=str(truth_path))
    out_dir = Path(out_dir) if out_dir is not None else pred_path.parent
    stem = pred_path.stem
    report["predictions"], report["truth"] = str(pred_path), str(truth_path)
    if regions is not None:
        report["aggregated"] = "the mean of each observation's sub-tile predictions (column 'observation')"
    report["scores_json"] = str(write_json(out_dir / f"{stem}.scores.json", report))
    report["per_gene_csv"] = str(write_table(out_dir / f"{stem}.per_gene.csv", per_gene, index_label=None))
    return report


def plot(pred_path, truth_path, out_dir, *, genes=None, n_genes: int = 4, n_top: int = N_TOP_DEFAULT) -> dict:
    """The report figures (Pearson distribution, scatter, spatial maps) of predictions against truth.

    Example::

        >>> hexpr.plot("pred.csv", "demo/test_truth.csv", "figures")
    """
    check_option("--n-genes", n_genes, WHOLE_POSITIVE)
    check_option("--n-top", n_top, WHOLE_POSITIVE)
    check_output_folder("--out", out_dir)
    return make_report_plots(pred_path, truth_path, out_dir, genes=genes, n_genes=n_genes, n_top=n_top)
