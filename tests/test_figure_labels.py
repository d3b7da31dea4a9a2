"""Figures say what they show: each heatmap's colour bar names the quantity and its unit, titles name the
slide, the model and the gene; uncertainty_<gene>.png is labelled as an interval width, not as expression."""
import pandas as pd
from test_slide_outputs import marked_slide_map

import hexpr.workflow.outputs.plots as plots
from hexpr.workflow.outputs.slide_maps import write_slide_outputs


def drawn_labels(monkeypatch) -> dict:
    """{file name: (title, colour-bar label)} of every figure saved while the test runs."""
    seen = {}
    real = plots.save_png

    def capture(fig, out_png):
        image_ax, bar_ax = fig.axes[:2]
        seen[str(out_png).rsplit("/", 1)[-1]] = (image_ax.get_title(), bar_ax.get_ylabel())
        return real(fig, out_png)
    monkeypatch.setattr(plots, "save_png", capture)
    return seen


def test_heatmaps_and_uncertainty_maps_name_model_gene_quantity_and_unit(tmp_path, monkeypatch):
    m = marked_slide_map(tmp_path, scores=None)
    half = pd.DataFrame(1.0, index=m.predictions.index, columns=m.predictions.columns)
    m.layers = {"lower": m.predictions - half, "upper": m.predictions + 2 * half}
    m.model, m.unit = "her2st__ridge", "log1p CP10k"
    m.provenance["config"] = {"uncertainty": {"interval": 0.9}}
    seen = drawn_labels(monkeypatch)
    write_slide_outputs(m, tmp_path / "out", ("heatmaps",))
    title, label = seen["heatmap_G0.png"]
    assert title == "marked: predicted G0\nmodel her2st__ridge" and label == "predicted G0 (log1p CP10k)"
    title, label = seen["uncertainty_G0.png"]
    assert "expression" not in label and "predicted" not in label
    assert label == "G0 90% prediction interval width (log1p CP10k)"
    assert title == "marked: uncertainty of G0: 90% prediction interval width\nmodel her2st__ridge"


def test_a_model_without_a_recorded_unit_says_so(tmp_path, monkeypatch):
    m = marked_slide_map(tmp_path)
    seen = drawn_labels(monkeypatch)
    write_slide_outputs(m, tmp_path / "out", ("heatmaps",))
    assert seen["heatmap_G0.png"][1] == "predicted G0 (training target units)"
