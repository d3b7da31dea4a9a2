"""Unknown --gene names: known aliases (HER2 -> ERBB2) and close spellings are suggested, in one Error: line."""
import numpy as np
import pandas as pd
from typer.testing import CliRunner

from hexpr.embedder.gene_names import ALIASES, gene_suggestions, unknown_gene_message
from hexpr.pipeline import app

GENES = ["ERBB2", "ESR1", "MKI67", "KRT19", "GRB7", "CD74"]


def test_aliases_map_to_the_symbol_present_and_spellings_to_close_names():
    assert gene_suggestions("HER2", GENES)[0] == "ERBB2"
    assert gene_suggestions("her2", GENES)[0] == "ERBB2"
    assert gene_suggestions("Ki-67", GENES)[0] == "MKI67"
    assert gene_suggestions("erbb2", GENES) == ["ERBB2"]              # another case
    assert "GRB7" in gene_suggestions("GRB77", GENES)                  # a typo
    assert gene_suggestions("XYZ", GENES) == []
    assert all(symbol == symbol.upper() and alias == alias.upper() for alias, symbol in ALIASES.items())


def test_message_says_alias_or_lists_examples():
    assert unknown_gene_message("--gene", "HER2", GENES, "this model").endswith("HER2 is an alias of ERBB2: use --gene ERBB2")
    assert "did you mean GRB7" in unknown_gene_message("--gene", "GRB77", GENES, "this model")
    assert unknown_gene_message("--gene", "XYZ", GENES, "this model").endswith("e.g. ERBB2, ESR1, MKI67, KRT19, GRB7")
    assert "alias of ERBB2, which is not there either" in unknown_gene_message("--gene", "HER2", ["GRB7"], "x")


def test_plot_gene_her2_suggests_erbb2(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(12, len(GENES))), columns=GENES)
    frame.insert(0, "ID", [f"s{i}" for i in range(12)])
    frame.to_csv(tmp_path / "pred.csv", index=False)
    frame.to_csv(tmp_path / "truth.csv", index=False)
    r = CliRunner().invoke(app, ["plot", str(tmp_path / "pred.csv"), str(tmp_path / "truth.csv"), "--gene", "HER2",
                                 "--out", str(tmp_path / "plots")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith("Error: --gene 'HER2' is not in") and "use --gene ERBB2" in r.output
