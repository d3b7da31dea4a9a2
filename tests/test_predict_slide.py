"""predict-slide: slide reading and scale, tissue mask, tile grid, GeoJSON, outputs; real her2st C3 run."""
from __future__ import annotations

import json
import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import HER2ST, MOBILENET_WEIGHTS, TINY_BACKBONE, needs_shared, write_challenge_dataset
from PIL import Image
from typer.testing import CliRunner

from hexpr.embedder.slides import SlideError, find_slides, open_slide, read_square, slide_thumbnail
from hexpr.embedder.tiling import tile_dataset, tile_grid, tissue_fraction, tissue_mask
from hexpr.pipeline import app

runner = CliRunner()
W, H = 1000, 800         # synthetic slide, 0.5 µm/px
BLOB = (250, 200, 750, 600)   # x0, y0, x1, y1 of the tissue rectangle


def synthetic_slide(seed: int = 0) -> np.ndarray:
    """White glass with a textured pink-purple 'tissue' rectangle."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), 245, np.uint8)
    x0, y0, x1, y1 = BLOB
    pink = np.array([200, 110, 170], float) + rng.normal(0, 25, (y1 - y0, x1 - x0, 3))
    pink[:, : (x1 - x0) // 2] -= np.array([60, 40, 10])     # darker left half: a spatial signal
    img[y0:y1, x0:x1] = np.clip(pink, 0, 255).astype(np.uint8)
    return img


def write_tiff(path, img, um_per_px=0.5, pyramid=True):
    res = 1e4 / um_per_px
    with tifffile.TiffWriter(path) as tif:
        opts = dict(photometric="rgb", tile=(128, 128), resolution=(res, res), resolutionunit="CENTIMETER")
        tif.write(img, subifds=1 if pyramid else 0, **opts)
        if pyramid:
            tif.write(img[::2, ::2], subfiletype=1, **opts)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A ridge head on the tiny random backbone, fitted on generated patches (records no patch size)."""
    root = tmp_path_factory.mktemp("model")
    train = write_challenge_dataset(root / "train", n=16, n_genes=4)
    r = runner.invoke(app, ["fit-head", str(train), "-b", TINY_BACKBONE, "--folds", "2", "--out", str(root / "model"),
                            "--cache-dir", str(root / "cache"), "--quiet"])
    assert r.exit_code == 0, r.output
    return root / "model"


def predict_cli(model, *slides, out, cache, extra=()):
    return runner.invoke(app, ["predict-slide", str(model), *map(str, slides), "--out", str(out), "--cache-dir", str(cache),
                               "--tile-um", "100", "--tile-um-per-px", "2", "--quiet", *extra])


def test_tiff_scale_from_resolution_tags_pyramid_and_regions(tmp_path):
    img = synthetic_slide()
    path = write_tiff(tmp_path / "s.tif", img, um_per_px=0.5)
    with open_slide(path) as s:
        assert (s.width, s.height) == (W, H)
        assert s.um_per_px == pytest.approx(0.5) and "TIFF resolution" in s.um_per_px_source
        np.testing.assert_array_equal(np.asarray(s.region(10, 20, 60, 90)), img[20:90, 10:60])
        assert (np.asarray(s.region(-5, -5, 5, 5))[:5, :5] == 255).all()      # white outside
        thumb, scale = slide_thumbnail(s, 500)
        assert scale == 0.5 and thumb.shape == (400, 500, 3)
        patch, padded = read_square(s, 500.0, 400.0, 100.0, 50)
        assert patch.shape == (50, 50, 3) and not padded
    with open_slide(path, um_per_px=0.52) as s:           # a given value within 10 % wins
        assert s.um_per_px == 0.52 and s.um_per_px_source == "given"
    with pytest.raises(SlideError, match=r"0\.25 disagrees with the 0\.5 µm/px.*--force-um-per-px"):
        open_slide(path, um_per_px=0.25)
    with open_slide(path, um_per_px=0.25, force_um_per_px=True) as s:      # forced: used, and said so
        assert s.um_per_px == 0.25 and s.um_per_px_source == "given (forced)"


def test_openslide_reader_matches_tifffile(tmp_path):
    """OpenSlide (used for NDPI/MRXS/SCN) on a generic tiled TIFF: same pixels, scale from openslide.mpp-x."""
    pytest.importorskip("openslide")
    from hexpr.embedder.slides import OpenSlideSlide, slide_um_per_px

    img = synthetic_slide()
    with OpenSlideSlide(write_tiff(tmp_path / "s.tif", img)) as s:
        assert (s.width, s.height) == (W, H)
        assert slide_um_per_px(s) == (pytest.approx(0.5), "OpenSlide openslide.mpp-x")
        np.testing.assert_array_equal(np.asarray(s.region(10, 20, 60, 90)), img[20:90, 10:60])
        assert (np.asarray(s.region(-5, -5, 5, 5))[:5, :5] == 255).all()
        assert s.thumbnail(4).shape == (200, 250, 3)


def test_jpeg_without_scale_is_a_clear_error(tmp_path, tiny_model):
    Image.fromarray(synthetic_slide()).save(tmp_path / "s.jpg", quality=90)
    with pytest.raises(SlideError, match="--um-per-px"):
        open_slide(tmp_path / "s.jpg")
    r = runner.invoke(app, ["predict-slide", str(tiny_model), str(tmp_path / "s.jpg"), "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 2 and "Error:" in r.output and "--um-per-px" in r.output
    assert not (tmp_path / "o" / "s").exists()
    with pytest.raises(SlideError, match="does not exist"):
        find_slides([tmp_path / "nope.svs"])


def test_tissue_mask_finds_the_blob():
    img = synthetic_slide()
    mask = tissue_mask(img[::4, ::4])
    x0, y0, x1, y1 = (v // 4 for v in BLOB)
    assert mask[y0 + 3:y1 - 3, x0 + 3:x1 - 3].mean() > 0.98
    outside = mask.copy()
    outside[y0 - 3:y1 + 3, x0 - 3:x1 + 3] = False
    assert outside.mean() < 0.01
    assert not tissue_mask(np.full((50, 60, 3), 240, np.uint8)).any()      # blank glass: no tissue


def test_grid_stride_and_tissue_fraction():
    g = tile_grid(1000, 800, 200, None)
    assert (g.n_rows, g.n_cols, len(g)) == (4, 5, 20)
    assert g.centres[0].tolist() == [100, 100] and g.ids()[6] == "tile_r1_c1"
    g2 = tile_grid(1000, 800, 200, 100)                     # 50 % overlap
    assert (g2.n_rows, g2.n_cols) == (7, 9) and g2.x0[1] == 100
    mask = np.zeros((80, 100), bool)
    mask[:, :30] = True                                      # left 300 level-0 px at scale 0.1
    f = tissue_fraction(mask, 0.1, g)
    assert f[0] == 1.0 and f[1] == pytest.approx(0.5) and f[2] == 0.0
    with pytest.raises(ValueError):
        tile_grid(10, 10, 0)


def test_tile_dataset_reads_tiles_and_fingerprint_tracks_geometry(tmp_path):
    path = write_tiff(tmp_path / "s.tif", synthetic_slide(), pyramid=False)
    centres = np.array([[300.0, 300.0], [500.0, 400.0]])
    ds = tile_dataset(path, 0.5, centres, ["a", "b"], tile_um=50, patch_px=40)
    assert ds.read_image(0).shape == (40, 40, 3)
    other = tile_dataset(path, 0.5, centres + 1, ["a", "b"], tile_um=50, patch_px=40)
    assert ds.fingerprint() != other.fingerprint()
    assert ds.fingerprint() == tile_dataset(path, 0.5, centres, ["a", "b"], 50, 40).fingerprint()
    import pickle

    assert pickle.loads(pickle.dumps(ds)).read_image(1).shape == (40, 40, 3)   # DataLoader workers


def test_predict_slide_outputs_overwrite_and_folder(tmp_path, tiny_model):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_tiff(slides / "one.tif", synthetic_slide(0))
    Image.fromarray(synthetic_slide(1)).save(slides / "two.png")
    out, cache = tmp_path / "out", tmp_path / "cache"
    # a folder of slides, the PNG needs its scale; the model records no patch size: announced
    r = predict_cli(tiny_model, slides, out=out, cache=cache, extra=["--um-per-px", "0.5", "--gene", "G1"])
    assert r.exit_code == 0, r.output
    for stem in ("one", "two"):
        d = out / stem
        assert sorted(p.name for p in d.iterdir()) == ["heatmap_G1.png", "predictions.h5ad", "tiles.geojson",
                                                       "uncertainty_G1.png"]
        a = ad.read_h5ad(d / "predictions.h5ad")
        assert list(a.var_names) == ["G0", "G1", "G2", "G3"] and a.n_obs > 0
        assert {k: v.shape for k, v in a.layers.items()} == {"lower": a.shape, "upper": a.shape}  # ridge: no spread
        assert (a.layers["lower"] <= a.X).all() and (a.X <= a.layers["upper"]).all()
        xy = a.obsm["spatial"]
        x0, y0, x1, y1 = BLOB
        assert (xy[:, 0] > x0).all() and (xy[:, 0] < x1).all() and (xy[:, 1] > y0).all() and (xy[:, 1] < y1).all()
        prov = a.uns["hexpr"]
        assert prov["tile_um"] == 100 and prov["tile_px_level0"] == pytest.approx(200) and prov["um_per_px"] == 0.5
        assert (a.obs["tissue_fraction"] >= 0.25).all()
        gj = json.loads((d / "tiles.geojson").read_text())
        assert len(gj["features"]) == a.n_obs and set(gj["features"][0]["properties"]["measurements"]) == set(a.var_names)
        assert Image.open(d / "heatmap_G1.png").size[0] > 100
    # --um-per-px applies to every slide, the TIFF too; nothing temporary is left behind
    assert ad.read_h5ad(out / "one" / "predictions.h5ad").uns["hexpr"]["um_per_px_source"] == "given"
    assert sorted(p.name for p in out.iterdir()) == ["one", "two"]
    # existing output: refused with one line, then replaced with --overwrite (embeddings come from the cache)
    r = predict_cli(tiny_model, slides / "one.tif", out=out, cache=cache)
    assert r.exit_code == 2 and "Error:" in r.output and "--overwrite" in r.output
    before = ad.read_h5ad(out / "one" / "predictions.h5ad").X
    r = predict_cli(tiny_model, slides / "one.tif", out=out, cache=cache, extra=["--overwrite", "--stride-um", "50"])
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(out / "one" / "predictions.h5ad")
    assert a.n_obs > len(before) and a.uns["hexpr"]["um_per_px_source"] == "TIFF resolution tags (cm)"
    r = predict_cli(tiny_model, slides / "one.tif", out=out, cache=cache, extra=["--overwrite", "--gene", "NOPE"])
    assert r.exit_code == 2 and "NOPE" in r.output
    assert ad.read_h5ad(out / "one" / "predictions.h5ad").n_obs == a.n_obs      # failed run changed nothing


def test_interrupted_embedding_resumes_and_writes_nothing_before(tmp_path, tiny_model):
    from hexpr.embedder.cache import CacheError
    from hexpr.workflow import predict_slide

    slide = write_tiff(tmp_path / "s.tif", synthetic_slide())
    opts = dict(tile_um=50, tile_um_per_px=2, cache_dir=tmp_path / "cache", progress=False, chunk_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CacheError, match="run again to resume"):
            predict_slide(tiny_model, [slide], tmp_path / "out", max_chunks=1, **opts)
        assert not (tmp_path / "out" / "s").exists()
        report = predict_slide(tiny_model, [slide], tmp_path / "out", **opts)
    assert report["slides"][str(slide)]["n_tiles"] > 8 and (tmp_path / "out" / "s" / "predictions.h5ad").is_file()


# ----------------------------------------------------------------------------- real data: her2st C3


def _mean_gene_r(a: np.ndarray, b: np.ndarray) -> float:
    from hexpr.heads.metrics import pearson_per_gene

    r = pearson_per_gene(a, b)
    return float(np.nanmean(r))


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads contend badly (30x slower measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@needs_shared
def test_her2st_c3_slide_map_agrees_with_spot_predictions(tmp_path, one_torch_thread):
    """Fit on C2 + C4 (MobileNetV2, 64 px patches of 112 µm), predict the whole C3 image, and compare
    the map at C3's measured spots with spot-level `predict` and with the measured expression."""
    import time

    from hexpr.embedder.backbones import parse_backbone
    from hexpr.embedder.datasets import open_dataset
    from hexpr.embedder.importers import import_dataset
    from hexpr.embedder.slides import open_slide
    from hexpr.heads.fitting import load_model
    from hexpr.workflow import fit_head, predict, predict_slide
    from hexpr.workflow.slides import predict_tiles, tile_scale

    t0 = time.perf_counter()
    spec = parse_backbone(f"mobilenetv2_100:weights={MOBILENET_WEIGHTS},pad_type=same,mean=0.5/0.5/0.5,std=0.5/0.5/0.5,"
                          "size=64")   # the model sees 64 px too: fast on CPU
    opts = dict(cache_dir=tmp_path / "cache", progress=False, precision="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_dataset(HER2ST, tmp_path / "train", sample_ids=["C2", "C4"], target_um_per_px=1.75, progress=False)
        c3 = import_dataset(HER2ST, tmp_path / "c3", sample_ids=["C3"], target_um_per_px=1.75, progress=False)
        fit_head(tmp_path / "train", [spec], head="ridge", genes="hvg:50", folds=2, out_dir=tmp_path / "model",
                 n_jobs=1, **opts)
        predict(tmp_path / "model", tmp_path / "c3", out=tmp_path / "c3_spots.csv", **opts)
    fitted = load_model(tmp_path / "model")
    assert fitted.feature_meta["patch"] == {"patch_um": 112.0, "patch_px": 64, "um_per_px": 1.75}
    image = next((HER2ST / "ST-imgs" / "C3").glob("*.jpg"))
    mpp = c3["samples"]["C3"]["scale"]["um_per_px"] if "scale" in c3["samples"]["C3"] else 0.69
    t1 = time.perf_counter()
    report = predict_slide(tmp_path / "model", [image], tmp_path / "maps", um_per_px=mpp, genes=["ERBB2"]
                           if "ERBB2" in fitted.genes else None, **opts)
    slide_s = time.perf_counter() - t1
    r = report["slides"][str(image)]
    out = tmp_path / "maps" / image.stem
    assert {p.name for p in out.iterdir()} >= {"predictions.h5ad", "tiles.geojson"} and r["n_tiles"] > 300

    # the map at the measured spots: the tile under each spot centre
    spots = open_dataset(tmp_path / "c3")
    spot_pred = pd.read_csv(tmp_path / "c3_spots.csv", index_col="ID").loc[spots.ids, fitted.genes]
    truth = spots.targets.loc[spots.ids, fitted.genes]
    centres = spots.coords + 0.5
    tiles = ad.read_h5ad(out / "predictions.h5ad")
    half = tiles.uns["hexpr"]["tile_px_level0"] / 2
    d = np.abs(tiles.obsm["spatial"][None, :, :] - centres[:, None, :]).max(axis=2)
    under = d.argmin(axis=1)
    covered = d[np.arange(len(centres)), under] <= half
    assert covered.mean() > 0.8, covered.mean()
    map_at_spots = tiles[under[covered]].to_df()[fitted.genes].to_numpy()
    r_spot = _mean_gene_r(map_at_spots, spot_pred.to_numpy()[covered])
    r_truth = _mean_gene_r(map_at_spots, truth.to_numpy()[covered])
    r_spot_level_truth = _mean_gene_r(spot_pred.to_numpy(), truth.to_numpy())
    # tiles centred exactly on the spots reproduce spot-level predict (same geometry, same model)
    with open_slide(image, mpp) as slide:
        exact, _, _ = predict_tiles(fitted, slide, centres, spots.ids, tile_scale(fitted.feature_meta), **opts)
    r_exact = _mean_gene_r(exact.to_numpy(), spot_pred.to_numpy())
    print(f"\nher2st C3: {r['n_tiles']} tissue tiles of {r['n_grid_tiles']}; {covered.sum()} of {len(centres)} spots under a "
          f"tile; mean gene r: map vs spot predict {r_spot:.3f}, map vs measured {r_truth:.3f}, spot predict vs "
          f"measured {r_spot_level_truth:.3f}, tiles at spot centres vs spot predict {r_exact:.3f}; predict-slide "
          f"{slide_s:.1f} s, test {time.perf_counter() - t0:.1f} s")
    assert r_spot > 0.25 and r_truth > 0.1 and r_exact > 0.95


def test_a_bad_slide_among_several_is_skipped_and_the_rest_written(tmp_path, tiny_model):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_tiff(slides / "good.tif", synthetic_slide(0))
    Image.fromarray(synthetic_slide(1)).save(slides / "noscale.png")   # no µm/px recorded, none given
    (slides / "broken.tif").write_bytes(b"not a tiff at all")
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = predict_cli(tiny_model, slides, out=out, cache=cache)
    assert r.exit_code == 1, r.output
    assert "2 of 3 slides failed" in r.output and "broken.tif" in r.output and "noscale.png" in r.output
    assert "--um-per-px" in r.output            # the PNG's own reason is shown
    assert sorted(p.name for p in out.iterdir()) == ["good"]
    assert ad.read_h5ad(out / "good" / "predictions.h5ad").n_obs > 0
    # every slide failing is one error (exit 2), and nothing is written
    r = predict_cli(tiny_model, slides / "noscale.png", slides / "broken.tif", out=tmp_path / "none", cache=cache)
    assert r.exit_code == 2 and "none of the 2 slides" in r.output
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def test_a_finetuned_model_predicts_slides_too(tmp_path):
    import torch

    from hexpr.embedder.backbones import parse_backbone
    from hexpr.heads.finetune import finetune, load_finetuned

    train = write_challenge_dataset(tmp_path / "train", n=12, n_genes=3, size=48, groups=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune(train, [parse_backbone("test_resnet:weights=none,size=48")], tmp_path / "ft", epochs=1, val_fold=None,
                 freeze_epochs=0, batch_size=4, num_workers=0, progress=False, device="cpu")
        write_tiff(tmp_path / "s.tif", synthetic_slide(0))
        r = predict_cli(tmp_path / "ft", tmp_path / "s.tif", out=tmp_path / "out", cache=tmp_path / "cache")
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(tmp_path / "out" / "s" / "predictions.h5ad")
    model = load_finetuned(tmp_path / "ft")
    assert list(a.var_names) == model.genes and a.n_obs > 0 and np.isfinite(a.X).all()
    assert a.uns["hexpr"]["config"]["finetuned"] == str(tmp_path / "ft")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.h5"))  # embeds on the fly
    # same tiles, same network: the map is what predict_dataset gives on those tiles
    from hexpr.embedder.slides import open_slide
    from hexpr.embedder.tiling import tile_dataset

    obs = a.obs
    ds = tile_dataset(tmp_path / "s.tif", 0.5, a.obsm["spatial"], list(obs.index), 100.0, 50, slide=open_slide(tmp_path / "s.tif"))
    direct = model.predict_dataset(ds, batch_size=8, num_workers=0, progress=False, device="cpu")
    ds.close()
    np.testing.assert_allclose(a.X, direct.to_numpy(np.float32), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_torchrun_ranks_split_the_slides_and_match_one_process(tmp_path, tiny_model):
    import socket
    import subprocess
    import sys

    from conftest import REPO

    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        write_tiff(slides / f"s{i}.tif", synthetic_slide(i))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["predict-slide", str(tiny_model), str(slides), "--cache-dir", str(tmp_path / "cache"), "--tile-um", "100",
            "--tile-um-per-px", "2", "--workers", "0", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(port), "-m", "hexpr", *args, "--out", str(tmp_path / "multi")]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # each slide is in exactly one rank's table: the ranks split the slides, none is done twice
    assert [result.stdout.count(f"s{i}.tif") for i in range(3)] == [1, 1, 1], result.stdout
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "single")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == ["s0", "s1", "s2"]
    for stem in ("s0", "s1", "s2"):
        multi = ad.read_h5ad(tmp_path / "multi" / stem / "predictions.h5ad")
        single = ad.read_h5ad(tmp_path / "single" / stem / "predictions.h5ad")
        np.testing.assert_allclose(multi.X, single.X, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_model_with_neighbour_context_gets_it_from_the_tile_grid(tmp_path):
    from hexpr.embedder.backbones import parse_backbone
    from hexpr.embedder.features import add_neighbour_context, ensure_features
    from hexpr.embedder.slides import open_slide
    from hexpr.heads.fitting import load_model

    train = write_challenge_dataset(tmp_path / "train", n=16, n_genes=4)
    table = pd.read_csv(train)
    table["x"], table["y"] = (np.arange(len(table)) % 4) * 100.0, (np.arange(len(table)) // 4) * 100.0
    table.to_csv(train, index=False)
    cache = tmp_path / "cache"
    r = runner.invoke(app, ["fit-head", str(train), "-b", TINY_BACKBONE, "--folds", "2", "--neighbours", "3",
                            "--out", str(tmp_path / "model"), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    write_tiff(tmp_path / "s.tif", synthetic_slide(0))
    r = predict_cli(tmp_path / "model", tmp_path / "s.tif", out=tmp_path / "out", cache=cache)
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(tmp_path / "out" / "s" / "predictions.h5ad")
    assert a.n_obs > 4
    # the map is the head applied to each tile's embedding + the mean of its 3 nearest tiles
    fitted = load_model(tmp_path / "model")
    assert fitted.feature_meta["neighbours"] == 3
    tiles = tile_dataset(tmp_path / "s.tif", 0.5, a.obsm["spatial"], list(a.obs_names), 100.0, 50,
                         slide=open_slide(tmp_path / "s.tif"))
    plain = ensure_features(tiles, [parse_backbone(TINY_BACKBONE)], cache, progress=False, num_workers=0)
    tiles.close()
    expected = fitted.predict(add_neighbour_context(plain, a.obsm["spatial"], None, 3).X)
    np.testing.assert_allclose(a.X, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(a.X, fitted.predict(np.concatenate([plain.X, plain.X], axis=1)), atol=1e-4)  # context mattered


def test_a_slide_centred_model_centres_the_slide_by_its_own_tiles(tmp_path):
    """A ridge fitted with --centre-slides predicts, over a slide's tiles, the training mean on average:
    the tiles' features are centred on the slide's own mean before the head sees them."""
    from hexpr.heads.fitting import load_model

    train = write_challenge_dataset(tmp_path / "train", n=24, n_genes=4, groups=2)
    cache = tmp_path / "cache"
    r = runner.invoke(app, ["fit-head", str(train), "-b", TINY_BACKBONE, "--folds", "2", "--centre-slides",
                            "--out", str(tmp_path / "model"), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    write_tiff(tmp_path / "s.tif", synthetic_slide(0))
    r = predict_cli(tmp_path / "model", tmp_path / "s.tif", out=tmp_path / "out", cache=cache, extra=["--no-clip"])
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(tmp_path / "out" / "s" / "predictions.h5ad")
    fitted = load_model(tmp_path / "model")
    assert fitted.feature_meta["slide_centred"] and a.n_obs > 4
    training_mean = pd.read_csv(train)[fitted.genes].mean().to_numpy()
    np.testing.assert_allclose(np.asarray(a.X).mean(axis=0), training_mean, rtol=1e-4, atol=1e-4)
    assert np.asarray(a.X).std(axis=0).min() > 1e-4     # yet the map still varies over the slide
