"""Each report command's --json parses and holds the numbers its human output shows; import refuses an
existing dataset folder without --overwrite and replaces it as a whole with it."""
import json

import pytest
from conftest import TINY_BACKBONE, write_challenge_dataset
from PIL import Image
from test_importers import make_visium
from test_predict_slide import synthetic_slide
from typer.testing import CliRunner

from hexpr.embedder.datasets import open_dataset
from hexpr.pipeline import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def both(*args) -> tuple[dict, str]:
    """(the --json report, the human output) of one command line."""
    as_json = run(*args, "--json")
    assert as_json.exit_code == 0, as_json.output
    human = run(*args)
    assert human.exit_code == 0, human.output
    return json.loads(as_json.stdout), human.stdout


def rows(text: str) -> dict[str, list[str]]:
    """Tab-separated rows (CliRunner's stdout is a pipe) keyed by their first field."""
    return {r[0]: r[1:] for r in (line.split("\t") for line in text.splitlines() if "\t" in line)}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    train = write_challenge_dataset(root / "train", n=24, n_genes=4, groups=3)
    report, human = both("fit-head", train, "-b", TINY_BACKBONE, "--folds", 3, "--out", root / "model",
                         "--cache-dir", root / "cache", "--quiet")
    return root, train, report, human


def test_fit_head_json_holds_the_cv_table(fitted):
    root, train, report, human = fitted
    table = rows(human)
    assert table[report["head"]][0] == f"{report['cv']['score']:.4f}"
    assert table["mean head"][0] == f"{report['mean_head']['score']:.4f}"
    assert report["out_dir"] in human and report["n_spots"] == 24


def test_cv_folds_name_the_sections_they_held_out(fitted):
    _, _, report, human = fitted
    table = rows(human)
    held = [fold["held_out"] for fold in report["folds"]]
    assert sorted(g for groups in held for g in groups) == ["slide0", "slide1", "slide2"]   # each section once
    for i, fold in enumerate(report["folds"]):
        assert table[f"fold {i + 1} ({', '.join(fold['held_out'])})"][0] == f"{fold['score']:.4f}"


def test_predict_evaluate_inspect_json(fitted, tmp_path):
    root, train, _, _ = fitted
    report, human = both("predict", root / "model", train, "--out", tmp_path / "pred.csv", "--cache-dir", root / "cache",
                         "--quiet")
    assert f"{report['n_spots']} spots x {report['n_genes']} genes to {report['out']}" in human
    report, human = both("evaluate", tmp_path / "pred.csv", train, "--n-top", 2)
    table = rows(human)
    assert table["score"] == [f"{report['score']:.4f}"] and table["n_spots"] == [str(report["n_spots"])] == ["24"]
    report, human = both("inspect", train, "--out", tmp_path / "inspect", "--n-top", 3)
    table = rows(human)
    assert table["spots"] == [str(report["summary"]["n_spots"])] and table["genes"] == [str(report["summary"]["n_genes"])]


def test_predict_slide_json_holds_the_summary_and_whole_paths(fitted, tmp_path):
    root, _, _, _ = fitted
    Image.fromarray(synthetic_slide()).save(tmp_path / "slide.png")
    args = ["predict-slide", root / "model", tmp_path / "slide.png", "--um-per-px", "0.5", "--cache-dir", root / "cache",
            "--tile-um", "100", "--tile-um-per-px", "2", "--outputs", "h5ad", "--quiet"]
    as_json = run(*args, "--out", tmp_path / "a", "--json")
    human = run(*args, "--out", tmp_path / "b")
    assert as_json.exit_code == 0 and human.exit_code == 0, as_json.output + human.output
    report = json.loads(as_json.stdout)
    (slide, info), = report["slides"].items()
    row = rows(human.stdout)[str(tmp_path / "slide.png")]       # the slide and output paths whole, never cut
    assert row[1] == f"{info['n_tiles']}/{info['n_grid_tiles']}" and row[-1] == str(tmp_path / "b" / "slide")


def test_import_refuses_an_existing_dataset_and_replaces_it_whole_with_overwrite(tmp_path):
    first = make_visium(tmp_path / "src" / "first")
    second = make_visium(tmp_path / "src" / "second", seed=3)
    out = tmp_path / "dataset"
    report, human = both("import", first["root"], "--out", tmp_path / "probe", "--um-per-px", "1", "--quiet", "--overwrite")
    assert rows(human)["first"][0] == str(report["samples"]["first"]["n_patches"])
    assert open_dataset(tmp_path / "probe").target_unit == "log1p CP10k"     # named on colour bars downstream
    assert run("import", first["root"], "--out", out, "--um-per-px", "1", "--quiet").exit_code == 0
    (out / "notes.txt").write_text("a file from before\n")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    refused = run("import", second["root"], "--out", out, "--um-per-px", "1", "--quiet")
    assert refused.exit_code == 2 and "--overwrite" in refused.output and refused.output.startswith("Error:")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before          # untouched
    replaced = run("import", second["root"], "--out", out, "--um-per-px", "1", "--quiet", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(tmp_path / "probe")).replace("first", "second")
                           for p in (tmp_path / "probe").rglob("*") if p.is_file())    # the new import alone
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []     # no temporary folder left


def test_predict_given_a_slide_image_points_to_predict_slide(fitted, tmp_path):
    root, _, _, _ = fitted
    Image.fromarray(synthetic_slide()).save(tmp_path / "slide.png")
    r = run("predict", root / "model", tmp_path / "slide.png", "--cache-dir", root / "cache", "--quiet")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"hexpr predict-slide MODEL {tmp_path / 'slide.png'}" in r.output


def test_every_output_records_the_hexpr_version(fitted, tmp_path):
    import anndata
    import hexpr

    root, train, _, _ = fitted
    version = hexpr.__version__
    assert run("--version").stdout.strip() == f"hexpr {version}"
    for name in ("model.json", "cv_report.json"):
        assert json.loads((root / "model" / name).read_text())["hexpr_version"] == version
    assert run("predict", root / "model", train, "--out", tmp_path / "p.h5ad", "--cache-dir", root / "cache",
               "--quiet").exit_code == 0
    assert anndata.read_h5ad(tmp_path / "p.h5ad").uns["hexpr"]["hexpr_version"] == version
    assert run("evaluate", tmp_path / "p.h5ad", train, "--out-dir", tmp_path / "scores").exit_code == 0
    assert json.loads((tmp_path / "scores" / "p.scores.json").read_text())["hexpr_version"] == version
    Image.fromarray(synthetic_slide()).save(tmp_path / "slide.png")
    r = run("predict-slide", root / "model", tmp_path / "slide.png", "--um-per-px", "0.5", "--cache-dir", root / "cache",
            "--tile-um", "100", "--tile-um-per-px", "2", "--out", tmp_path / "maps", "--quiet")
    assert r.exit_code == 0, r.output
    out = tmp_path / "maps" / "slide"
    assert anndata.read_h5ad(out / "predictions.h5ad").uns["hexpr"]["hexpr_version"] == version
    assert json.loads((out / "tiles.geojson").read_text())["hexpr_version"] == version
    heatmap = next(out.glob("heatmap_*.png"))
    assert Image.open(heatmap).text["Software"] == f"hexpr {version}"
