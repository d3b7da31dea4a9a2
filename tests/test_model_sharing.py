"""Sharing models: the card fit-head writes, --trust-pickle and convert-model for old pickles, export-model,
loading by Hugging Face id from an offline hub cache, and the model id + units in every output."""
import json
import shutil

import anndata as ad
import joblib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY_BACKBONE, write_challenge_dataset
from PIL import Image
from typer.testing import CliRunner

from hexpr.heads.fitting import load_model
from hexpr.pipeline import app

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one `Error:` line of a refused command (exit code 2, no traceback)."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    train = write_challenge_dataset(root / "train", n=16, n_genes=4, groups=2)
    write_challenge_dataset(root / "test", n=6, n_genes=4, seed=1, with_targets=False)
    r = run("fit-head", train, "-b", TINY_BACKBONE, "--folds", 2, "--out", root / "model", "--cache-dir", root / "cache",
            "--quiet")
    assert r.exit_code == 0, r.output
    return root


def predict(work, model, out, *extra):
    return run("predict", model, work / "test" / "data.csv", "--out", out, "--cache-dir", work / "cache", "--quiet", *extra)


def test_fit_head_writes_a_hugging_face_model_card(work):
    from huggingface_hub import ModelCard

    text = (work / "model" / "README.md").read_text()
    card = ModelCard.load(work / "model" / "README.md")        # read as the hub reads it
    meta = card.data.to_dict()
    assert meta["library_name"] == "hexpr" and meta["license"] == "" and "hexpr" in meta["tags"]
    assert meta["metrics"] == ["pearsonr"]
    fitted = load_model(work / "model")
    [result] = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in result["metrics"]}["pearsonr"] == pytest.approx(fitted.cv["pearson_all_genes"], abs=1e-4)
    assert f"hexpr predict-slide {work / 'model'} SLIDE.svs --out maps" in text
    assert "resnet18" in text and "random-init" in text and "sha256" in text      # backbone, weights identity, checksum
    assert "2-fold, grouped by slide" in text and "16 spots, 2 slide(s)" in text
    assert "units:" in text and "G0" in text and "| gene | r |" in text
    assert yaml.safe_load(text.split("---")[1])["library_name"] == "hexpr"


def test_old_pickled_model_needs_trust_pickle_then_converts(work, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(work / "model", old)
    model = load_model(old)
    for name in ("config.json", "model.safetensors", "README.md"):
        (old / name).unlink()
    joblib.dump(model, old / "model.joblib")                  # what hexpr wrote before this format
    refused = error_line(predict(work, old, tmp_path / "p.csv"))
    assert "pickle" in refused and "runs any code" in refused and "--trust-pickle" in refused and "convert-model" in refused
    assert not (tmp_path / "p.csv").exists()
    r = predict(work, old, tmp_path / "trusted.csv", "--trust-pickle")
    assert r.exit_code == 0, r.output
    r = run("convert-model", old, tmp_path / "new")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "new" / "model.joblib").exists() and (tmp_path / "new" / "README.md").is_file()
    r = predict(work, tmp_path / "new", tmp_path / "converted.csv")
    assert r.exit_code == 0, r.output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "converted.csv"), pd.read_csv(tmp_path / "trusted.csv"))
    r = run("convert-model", old)                             # in place: the pickle is gone afterwards
    assert r.exit_code == 0, r.output
    assert not (old / "model.joblib").exists() and (old / "config.json").is_file()
    assert "already in hexpr's safetensors format" in error_line(run("convert-model", old))


def test_tampered_model_is_one_error_line(work, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(work / "model", bad)
    config = json.loads((bad / "config.json").read_text())
    config["schema_version"] = 7
    (bad / "config.json").write_text(json.dumps(config))
    assert "schema version 7" in error_line(predict(work, bad, tmp_path / "p.csv"))


def hub_cache(root, exported, repo="org/name"):
    """A Hugging Face hub cache holding ``exported`` as ``repo`` at COMMIT (refs/main points at it)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(exported, repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return root


def test_export_then_load_by_hub_id_offline(work, tmp_path, monkeypatch):
    r = run("export-model", work / "model", tmp_path / "export", "--repo-id", "org/name")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "export" / "README.md").read_text()
    assert "hexpr predict-slide org/name SLIDE.svs --out maps" in card and str(work) not in card
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["README.md", "config.json", "model.json",
                                                                       "model.safetensors"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", tmp_path / "export")))
    for ref in ("org/name", f"org/name@{COMMIT}"):
        out = tmp_path / f"{ref.replace('/', '_')}.h5ad"
        r = predict(work, ref, out)
        assert r.exit_code == 0, r.output
        uns = ad.read_h5ad(out).uns["hexpr"]
        assert uns["model_id"] == ref and "units" in uns
    local = tmp_path / "local.h5ad"
    assert predict(work, work / "model", local).exit_code == 0
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "org_name.h5ad").X, ad.read_h5ad(local).X)
    missing = error_line(predict(work, "org/unknown", tmp_path / "x.csv"))
    assert "not found in the local Hugging Face cache" in missing and str(tmp_path / "hub" / "models--org--unknown") in missing


def test_slide_outputs_carry_the_model_id_and_units(work, tmp_path):
    rng = np.random.default_rng(0)
    slide = np.full((400, 400, 3), 245, np.uint8)
    slide[100:300, 100:300] = np.clip(rng.normal([200, 110, 170], 25, (200, 200, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(slide).save(tmp_path / "s.png")
    r = run("predict-slide", work / "model", tmp_path / "s.png", "--out", tmp_path / "maps", "--um-per-px", "0.5",
            "--tile-um", "50", "--tile-um-per-px", "1", "--outputs", "h5ad,geojson,spatialdata", "--cache-dir", work / "cache",
            "--quiet")
    assert r.exit_code == 0, r.output
    uns = ad.read_h5ad(tmp_path / "maps" / "s" / "predictions.h5ad").uns["hexpr"]
    assert uns["model_id"] == str(work / "model") and uns["units"]
    tiles = json.loads((tmp_path / "maps" / "s" / "tiles.geojson").read_text())["features"]
    assert {t["properties"]["model_id"] for t in tiles} == {str(work / "model")}
    assert {t["properties"]["units"] for t in tiles} == {uns["units"]}
    import spatialdata

    table = spatialdata.read_zarr(tmp_path / "maps" / "s" / "spatialdata.zarr").tables["table"]
    assert table.uns["hexpr"]["model_id"] == str(work / "model") and table.uns["hexpr"]["units"] == uns["units"]


def test_a_model_without_backbone_checksums_predicts_with_a_warning(work, tmp_path):
    import hexpr

    edited = tmp_path / "edited"
    shutil.copytree(work / "model", edited)
    config = json.loads((edited / "config.json").read_text())
    del config["content"]["feature_meta"]["identities"]
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="records no backbone checksums"):
        hexpr.predict(edited, work / "test" / "data.csv", out=tmp_path / "p.csv", cache_dir=work / "cache", progress=False)
    assert pd.read_csv(tmp_path / "p.csv").shape == (6, 5)
