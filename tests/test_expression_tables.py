"""workflow/expression_tables.py and workflow/scoring.py: reading expression tables and scoring them."""
import json

import numpy as np
import pandas as pd
import pytest

from hexpr.embedder.errors import DataError, MissingInputError
from hexpr.workflow.expression_tables import EvaluationError, align, evaluate_tables, read_expression_table
from hexpr.workflow.scoring import evaluate


@pytest.fixture
def truth():
    rng = np.random.default_rng(7)
    return pd.DataFrame(rng.gamma(2, 2, (20, 6)), index=[f"s{i}" for i in range(20)], columns=[f"G{i}" for i in range(6)])


def test_align_matches_rows_by_id_and_columns_by_name(truth):
    pred = truth.iloc[::-1, ::-1] * 2
    p, t = align(pred, truth)
    assert t is truth or t.equals(truth)
    assert list(p.index) == list(truth.index) and list(p.columns) == list(truth.columns)
    np.testing.assert_allclose(p.to_numpy(), truth.to_numpy() * 2)


@pytest.mark.parametrize("change, message", [
    (lambda p: p.drop(index=["s3"]), "lacks 1 spot ids of truth.*s3"),
    (lambda p: p.drop(columns=["G2"]), "lacks 1 genes of truth.*G2"),
    (lambda p: p.assign(G4=p["G4"].where(p.index != "s5", np.nan)), "NaN/inf at id 's5', gene 'G4'"),
    (lambda p: pd.concat([p, p.iloc[:1]]), "duplicate ids, e.g. 's0'"),
])
def test_align_names_what_does_not_match(truth, change, message):
    with pytest.raises(EvaluationError, match=message):
        align(change(truth.copy()), truth)


def test_per_gene_pearson_and_panels_agree_with_numpy(truth):
    rng = np.random.default_rng(8)
    pred = truth + rng.normal(0, 1.5, truth.shape)
    report, per_gene = evaluate_tables(pred, truth, n_top=3, gene_list=["G1", "G4"])
    r = {g: np.corrcoef(pred[g], truth[g])[0, 1] for g in truth.columns}
    assert dict(zip(per_gene["gene"], per_gene["pearson"])) == pytest.approx(r)
    assert list(per_gene["pearson"]) == sorted(per_gene["pearson"], reverse=True)
    top_var = truth.var().sort_values(ascending=False).index[:3]
    assert set(per_gene.loc[per_gene["is_top_hvg"], "gene"]) == set(top_var)
    assert report["mean_corr_hvg"] == pytest.approx(np.mean([r[g] for g in top_var]))
    assert report["mean_corr_gene_list"] == pytest.approx((r["G1"] + r["G4"]) / 2) and report["n_gene_list"] == 2
    with pytest.raises(EvaluationError, match="gene list names 1 genes absent"):
        evaluate_tables(pred, truth, gene_list=["G1", "NOPE"])


def test_read_expression_table_from_csv_and_clear_errors(truth, tmp_path):
    truth.rename_axis("ID").reset_index().to_csv(tmp_path / "t.csv", index=False)
    back = read_expression_table(tmp_path / "t.csv")
    assert list(back.index) == list(truth.index)
    np.testing.assert_allclose(back.to_numpy(), truth.to_numpy())
    with pytest.raises(MissingInputError, match="does not exist"):
        read_expression_table(tmp_path / "absent.csv")
    truth.to_csv(tmp_path / "noid.csv")
    with pytest.raises(DataError, match="needs an 'ID' column"):
        read_expression_table(tmp_path / "noid.csv")


def test_evaluate_writes_scores_and_per_gene_table_beside_the_predictions(truth, tmp_path):
    truth.rename_axis("ID").reset_index().to_csv(tmp_path / "truth.csv", index=False)
    pred = truth * 0.5 + 1
    pred.rename_axis("ID").reset_index().to_csv(tmp_path / "pred.csv", index=False)
    report = evaluate(tmp_path / "pred.csv", tmp_path / "truth.csv", n_top=3)
    scores = json.loads((tmp_path / "pred.scores.json").read_text())
    assert scores["mean_corr_hvg"] == pytest.approx(1.0) and scores["score"] == pytest.approx(report["score"])
    per_gene = pd.read_csv(tmp_path / "pred.per_gene.csv")
    assert sorted(per_gene["gene"]) == list(truth.columns) and np.allclose(per_gene["pearson"], 1.0)
