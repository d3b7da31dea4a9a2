"""Context scales (--context-um): wider squares around each spot/tile, cut from the source slide by region."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import TINY_BACKBONE, write_challenge_dataset
from PIL import Image
from typer.testing import CliRunner

from hexpr import workflow
from hexpr.embedder.backbones import parse_backbone
from hexpr.embedder.context import ContextError, ContextWarning, parse_context_um
from hexpr.embedder.datasets import open_dataset
from hexpr.embedder.errors import UsageError
from hexpr.embedder.features import ensure_features
from hexpr.embedder.importers import import_dataset
from hexpr.heads.fitting import load_model
from hexpr.heads.uncertainty import predict_uncertain
from hexpr.pipeline import app

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
runner = CliRunner()
PITCH_PX = 80                     # 200 µm spot grid -> 2.5 µm/px
UM_PER_PX = 2.5
PATCH_UM = 100                    # 40 px source squares, kept at 2.5 µm/px: 40 px patches
EMBED = {"num_workers": 0, "precision": "fp32", "progress": False, "batch_size": 8}


def _section_image(seed: int) -> np.ndarray:
    """Textured 'tissue' whose colour changes smoothly over the section: what lies around a spot
    differs from the spot itself."""
    rng = np.random.default_rng(seed)
    h, w = 640, 700
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([120 + 100 * np.sin(xx / 90.0 + seed), 90 + 80 * np.cos(yy / 70.0), 150 + 60 * np.sin((xx + yy) / 120.0)], -1)
    img += rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_legacy_st(root: Path, sections=("S1", "S2"), n_genes: int = 6) -> Path:
    """her2st-like folder: PNG sections, spot files (80 px per 200 µm grid unit), counts tied to colour."""
    for d in ("ST-cnts", "ST-spotfiles"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for k, section in enumerate(sections):
        (root / "ST-imgs" / section).mkdir(parents=True)
        img = _section_image(k)
        Image.fromarray(img).save(root / "ST-imgs" / section / "HE.png")
        ax, ay = np.meshgrid(np.arange(1, 8), np.arange(1, 7))
        ax, ay = ax.ravel(), ay.ravel()
        px, py = 30 + PITCH_PX * ax, 20 + PITCH_PX * ay
        ids = [f"{a}x{b}" for a, b in zip(ax, ay)]
        pd.DataFrame({"x": ax, "y": ay, "new_x": ax, "new_y": ay, "pixel_x": px, "pixel_y": py, "selected": 1}).to_csv(
            root / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t", index=False)
        rng = np.random.default_rng(10 + k)
        mean_colour = np.array([img[max(0, y - 60):y + 60, max(0, x - 60):x + 60].mean(axis=(0, 1)) for x, y in zip(px, py)])
        lam = np.column_stack([mean_colour[:, g % 3] / 25.0 * (1 + g % 2) for g in range(n_genes)])
        counts = pd.DataFrame(rng.poisson(lam), index=ids, columns=[f"G{g}" for g in range(n_genes)])
        counts.to_csv(root / "ST-cnts" / f"{section}.tsv.gz", sep="\t")
    return root


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    """Two imported sections (HEST-style output recording source image and µm/px)."""
    root = tmp_path_factory.mktemp("context")
    raw = write_legacy_st(root / "raw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_dataset(raw, root / "data", patch_um=PATCH_UM, target_um_per_px=UM_PER_PX, progress=False)
    return {"root": root, "raw": raw, "data": root / "data", "cache": root / "cache"}


def _spec():
    return [parse_backbone(TINY_BACKBONE)]


def test_parse_context_um():
    assert parse_context_um("336,672") == (336.0, 672.0)
    assert parse_context_um(None) == () and parse_context_um("") == ()
    assert parse_context_um([300]) == (300.0,)
    for bad in ("abc", "300,-1", "300,300", "0"):
        with pytest.raises(UsageError, match="--context-um"):
            parse_context_um(bad)


def test_import_records_source_image(sections):
    with h5py.File(sections["data"] / "patches" / "S1.h5", "r") as f:
        assert Path(f.attrs["source_image"]) == (sections["raw"] / "ST-imgs" / "S1" / "HE.png").resolve()
        assert f.attrs["source_pixel_size_um"] == pytest.approx(UM_PER_PX, rel=1e-3)


def test_context_features_equal_an_independent_crop_and_embed(sections, tmp_path):
    """The 300 µm block is what embedding a PIL crop of the same square of the source image gives, and
    differs from the patch's own block."""
    dataset = open_dataset(sections["data"])
    features = ensure_features(dataset, _spec(), sections["cache"], context_um="300", **EMBED)
    patch_block, context_block = features.blocks
    assert context_block["context_um"] == 300.0 and context_block["kind"] == "context_scale"
    assert features.context_um == (300.0,) and features.meta()["context_um"] == [300.0]
    own = features.X[:, patch_block["start"]:patch_block["stop"]]
    wide = features.X[:, context_block["start"]:context_block["stop"]]
    assert own.shape == wide.shape and not np.allclose(own, wide, atol=1e-2)

    # independent: crop the square with PIL from the whole image, resample to the patch size, embed as a CSV dataset
    mpp = float(json.loads(json.dumps(h5py.File(sections["data"] / "patches" / "S1.h5", "r").attrs["source_pixel_size_um"])))
    side = 300 / mpp
    images = {s: Image.open(sections["raw"] / "ST-imgs" / s / "HE.png").convert("RGB") for s in ("S1", "S2")}
    inside = [i for i, sid in enumerate(dataset.ids)
              if all(side / 2 <= c + 0.5 and c + 0.5 + side / 2 <= lim for c, lim in zip(dataset.coords[i], images["S1"].size))]
    assert len(inside) >= 10
    (tmp_path / "img").mkdir()
    rows = []
    for i in inside:
        sample = dataset.ids[i].split("/")[0]
        cx, cy = dataset.coords[i] + 0.5
        crop = images[sample].resize((40, 40), Image.Resampling.LANCZOS, box=(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        crop.save(tmp_path / "img" / f"{i}.png")
        rows.append({"ID": dataset.ids[i], "path": f"img/{i}.png"})
    pd.DataFrame(rows).to_csv(tmp_path / "crops.csv", index=False)
    crops = ensure_features(open_dataset(tmp_path / "crops.csv"), _spec(), tmp_path / "cache", **EMBED)
    np.testing.assert_allclose(wide[inside], crops.X, rtol=1e-3, atol=1e-3 * np.abs(crops.X).max())


def test_each_scale_is_cached_once_and_reused(sections, monkeypatch):
    import hexpr.embedder.features as features_module

    dataset = open_dataset(sections["data"])
    first = ensure_features(dataset, _spec(), sections["cache"], context_um="300,600", **EMBED)
    keys = [b["key"] for b in first.blocks]
    assert len(set(keys)) == 3                      # patch, 300 µm, 600 µm: one cache file each
    padded = [b["n_padded"] for b in first.blocks[1:]]
    assert padded[1] > padded[0] >= 0               # wider squares reach the edge more often, counted
    embedded = []
    real = features_module.embed_dataset
    monkeypatch.setattr(features_module, "embed_dataset",
                        lambda ds, *a, **k: embedded.extend(e for e in real(ds, *a, **k) if not e.exists()) or real(ds, *a, **k))
    again = ensure_features(dataset, _spec(), sections["cache"], context_um="600", **EMBED)
    assert embedded == [] and again.blocks[1]["key"] == keys[2]
    np.testing.assert_array_equal(again.X[:, again.blocks[1]["start"]:], first.X[:, first.blocks[2]["start"]:])


def test_fit_records_scales_and_predict_applies_them(sections, tmp_path):
    out = tmp_path / "model"
    report = workflow.fit_head(sections["data"], _spec(), head="ridge", folds=2, out_dir=out, cache_dir=sections["cache"],
                               context_um="300", **EMBED)
    assert report["out_dir"] == str(out)
    model = load_model(out)
    assert model.feature_meta["context_um"] == [300.0] and model.feature_meta["n_features"] == 1024
    result = workflow.predict(out, sections["data"], out=tmp_path / "pred.h5ad", cache_dir=sections["cache"], **EMBED)
    predicted = ad.read_h5ad(result["out"])
    dataset = open_dataset(sections["data"])
    features = ensure_features(dataset, _spec(), sections["cache"], context_um="300", **EMBED)
    np.testing.assert_allclose(predicted.X, predict_uncertain(model, features.X, interval=None).mean, rtol=1e-5, atol=1e-6)
    plain = ensure_features(dataset, _spec(), sections["cache"], **EMBED)
    assert plain.n_features == 512                   # without the context block the model's input is another
    assert len(predicted.uns["hexpr"]["cache_files"]) == 2
    # a model with context on data without source images: one error naming what is missing
    csv = write_challenge_dataset(tmp_path / "csv", n=4, with_targets=False)
    with pytest.raises(ContextError, match="challenge CSV layout.*no source image"):
        workflow.predict(out, csv, out=tmp_path / "p.csv", cache_dir=tmp_path / "c2", **EMBED)
    assert not (tmp_path / "p.csv").exists()


def test_bad_context_sizes_and_missing_sources(sections, tmp_path):
    data = sections["data"]
    with pytest.raises(UsageError, match="larger than the patch it surrounds .*100 µm"):
        workflow.embed(data, _spec(), tmp_path / "cache", context_um="80", **EMBED)
    with pytest.raises(UsageError, match="larger than every source image"):
        workflow.embed(data, _spec(), tmp_path / "cache", context_um="300,5000", **EMBED)
    assert not (tmp_path / "cache").exists()        # refused before any embedding
    csv = write_challenge_dataset(tmp_path / "csv", n=4)
    with pytest.raises(ContextError, match="challenge CSV layout"):
        workflow.fit_head(csv, _spec(), context_um="300", out_dir=tmp_path / "m", cache_dir=tmp_path / "cache", **EMBED)
    with pytest.raises(UsageError, match="--sweep-backbones"):
        workflow.fit_head(data, _spec(), context_um="300", sweep_backbones=True, cache_dir=tmp_path / "cache", **EMBED)


def test_moved_source_image_is_named(sections, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(sections["data"], copy)
    with h5py.File(copy / "patches" / "S2.h5", "a") as f:
        f.attrs["source_image"] = str(tmp_path / "gone" / "HE.png")
    with pytest.raises(ContextError, match=r"gone/HE.png.*not found"):
        workflow.embed(copy, _spec(), tmp_path / "cache", context_um="300", **EMBED)


def test_cli_errors_are_one_line(sections, tmp_path):
    csv = write_challenge_dataset(tmp_path / "csv", n=4)
    for args in (["embed", str(sections["data"]), "--context-um", "50"],
                 ["embed", str(sections["data"]), "--context-um", "9000"],
                 ["embed", str(csv), "--context-um", "300"],
                 ["fit-head", str(sections["data"]), "--context-um", "3x"]):
        r = runner.invoke(app, [*args, "-b", TINY_BACKBONE, "--cache-dir", str(tmp_path / "cache"), "--quiet"])
        assert r.exit_code == 2, r.output
        errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "context" in errors[0], r.output
        assert "Traceback" not in r.output


def test_context_edges_are_padded_and_warned(sections, tmp_path):
    dataset = open_dataset(sections["data"])
    with pytest.warns(ContextWarning, match=r"of 84 context squares of 600 µm reach beyond the image edge"):
        ensure_features(dataset, _spec(), sections["cache"], context_um="600", **EMBED)


def test_predict_slide_cuts_the_models_scales_around_each_tile(sections, tmp_path):
    """A model fitted with a 300 µm context predicts a slide from the tile and the 300 µm square around its
    centre; the context features equal those of 300 µm tiles at the same centres (predict-slide's own tiling)."""
    from hexpr.embedder.slides import open_slide
    from hexpr.embedder.tiling import tile_dataset

    model_dir = tmp_path / "model"
    workflow.fit_head(sections["data"], _spec(), head="ridge", folds=2, out_dir=model_dir, cache_dir=sections["cache"],
                      context_um="300", **EMBED)
    slide = sections["raw"] / "ST-imgs" / "S1" / "HE.png"
    r = runner.invoke(app, ["predict-slide", str(model_dir), str(slide), "--um-per-px", str(UM_PER_PX), "--out", str(tmp_path / "maps"),
                            "--cache-dir", str(tmp_path / "cache"), "--outputs", "h5ad", "--min-tissue", "0", "--workers", "0", "--precision", "fp32",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    maps = ad.read_h5ad(tmp_path / "maps" / "HE" / "predictions.h5ad")
    provenance = maps.uns["hexpr"]
    assert list(provenance["feature_meta"]["context_um"]) == [300.0] and len(provenance["cache_files"]) == 2
    assert provenance["tile_um"] == pytest.approx(PATCH_UM)
    centres, ids = maps.obsm["spatial"], list(maps.obs_names)
    with open_slide(slide, UM_PER_PX) as opened:
        tiles = tile_dataset(slide, UM_PER_PX, centres, ids, PATCH_UM, 40, slide=opened)
        wide = tile_dataset(slide, UM_PER_PX, centres, ids, 300, 40, slide=opened)
        own = ensure_features(tiles, _spec(), tmp_path / "c2", **EMBED)
        context = ensure_features(wide, _spec(), tmp_path / "c2", **EMBED)
    model = load_model(model_dir)
    expected = predict_uncertain(model, np.hstack([own.X, context.X]), interval=None).mean
    np.testing.assert_allclose(maps.X, expected, rtol=1e-4, atol=1e-5)


def test_auto_tries_context_scales_with_grouped_cv(sections, tmp_path):
    """On imported data auto scores the plain embeddings, k-neighbour context, 3x and 3x + 6x context squares,
    and both contexts together; the chosen recipe's scales and neighbours are what the model records."""
    out = tmp_path / "auto"
    report = workflow.fit_head(sections["data"], _spec(), head="auto", params={"epochs": 2, "hidden": [8]}, bag=2, folds=2,
                               out_dir=out, cache_dir=sections["cache"], **EMBED)
    recipes = [c["recipe"] for c in report["auto"]["candidates"]]
    sets = {"plain": ([], 0), "k6": ([], 6), "c300": ([300.0], 0), "c300+600": ([300.0, 600.0], 0),
            "c300+k6": ([300.0], 6), "c300+600+k6": ([300.0, 600.0], 6)}
    for features in sets:
        assert f"ridge on {features}" in recipes and f"mlp bag2 on {features}" in recipes
    assert all(f"ridge + mlp bag2 on {features}" in [c["recipe"] for c in report["auto"]["candidates"]] for features in sets)
    assert all(f"ridge within slides + mlp bag2 on {features}" in recipes for features in sets)   # two sections
    scales, neighbours = sets[report["features"]]
    meta = load_model(out).feature_meta
    assert meta["context_um"] == scales and int(meta.get("neighbours") or 0) == neighbours
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == 5 * len(sets)      # ridge, ridge within slides, mlp bag2 and both blends on each set


def test_auto_without_source_images_tries_no_context(tmp_path):
    csv = write_challenge_dataset(tmp_path / "csv", n=12, groups=2)
    with pytest.warns(UserWarning, match="tries no context scales: .*challenge CSV"):
        report = workflow.fit_head(csv, _spec(), head="auto", params={"epochs": 2, "hidden": [8]}, bag=2, folds=2,
                                   out_dir=tmp_path / "auto", cache_dir=tmp_path / "cache", **EMBED)
    assert not any(c["recipe"].endswith(("c300", "c300+600")) for c in report["auto"]["candidates"])


def test_cli_embed_table_and_predict_error_name_the_scales(sections, tmp_path):
    r = runner.invoke(app, ["embed", str(sections["data"]), "--context-um", "300", "-b", TINY_BACKBONE, "--cache-dir",
                            str(sections["cache"]), "--workers", "0", "--precision", "fp32", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "300 µm context" in r.output
    model = tmp_path / "model"
    r = runner.invoke(app, ["fit-head", str(sections["data"]), "--context-um", "300", "-b", TINY_BACKBONE, "--folds", "2",
                            "--out", str(model), "--cache-dir", str(sections["cache"]), "--workers", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    csv = write_challenge_dataset(tmp_path / "csv", n=4, with_targets=False)
    r = runner.invoke(app, ["predict", str(model), str(csv), "--out", str(tmp_path / "p.csv"), "--cache-dir",
                            str(tmp_path / "cache"), "--quiet"])
    assert r.exit_code == 2
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "300 µm" in errors[0] and "no source image" in errors[0], r.output


def test_context_with_tta_neighbours_bagging_and_intervals(sections, tmp_path):
    out = tmp_path / "model"
    workflow.fit_head(sections["data"], _spec(), head="mlp", params={"epochs": 3, "hidden": [8]}, bag=2, folds=2, tta=True,
                      neighbours=2, context_um="300", out_dir=out, cache_dir=sections["cache"], **EMBED)
    meta = load_model(out).feature_meta
    assert meta["tta"] and meta["neighbours"] == 2 and meta["context_um"] == [300.0]
    assert meta["n_features"] == 2 * 2 * 512          # (patch + 300 µm) x (own + neighbour mean)
    result = workflow.predict(out, sections["data"], out=tmp_path / "p.h5ad", cache_dir=sections["cache"], interval=0.8, **EMBED)
    predicted = ad.read_h5ad(result["out"])
    assert {"std", "lower", "upper"} <= set(predicted.layers)
    assert (predicted.layers["lower"] <= predicted.X + 1e-6).all() and (predicted.X <= predicted.layers["upper"] + 1e-6).all()


def test_finetune_refuses_a_head_fitted_with_context(sections, tmp_path):
    from hexpr.heads.finetune import FinetuneError, _load_head_init

    out = tmp_path / "mlp"
    workflow.fit_head(sections["data"], _spec(), head="mlp", params={"epochs": 2, "hidden": [8]}, folds=2, context_um="300",
                      out_dir=out, cache_dir=sections["cache"], **EMBED)
    with pytest.raises(FinetuneError, match="context scales .*300 µm.*without --context-um"):
        _load_head_init(out, _spec())
