"""predict-slide at scale: tissue on dense real crops and against ink/glass, scale checks, big-image
refusal, pyramid-level reads, checkpoints on Ctrl-C, one slide shared by torchrun ranks, SVS/OME/JPEG TIFF."""
from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import HER2ST, needs_shared
from PIL import Image
from test_predict_slide import predict_cli, runner, synthetic_slide, tiny_model, write_tiff  # noqa: F401 (fixture)

from hexpr.embedder import slides as slides_module
from hexpr.embedder.slides import SlideError, open_slide, read_square, slide_thumbnail
from hexpr.embedder.tiling import tile_grid, tissue_fraction, tissue_mask
from hexpr.pipeline import app

TILE_UM, HER2ST_UM_PER_PX = 112.0, 0.69


def _section(sec: str, reduce: int = 4):
    """(image reduced ``reduce`` times by JPEG DCT scaling, measured spot centres in its pixels)."""
    path = next((HER2ST / "ST-imgs" / sec).glob("*.jpg"))
    with Image.open(path) as im:
        full_w = im.width
        im.draft("RGB", (im.width // reduce, im.height // reduce))
        arr = np.asarray(im.convert("RGB"))
    spots = pd.read_csv(HER2ST / "ST-spotfiles" / f"{sec}_selection.tsv", sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots.x, spots.y)]
    measured = pd.read_csv(HER2ST / "ST-cnts" / f"{sec}.tsv.gz", sep="\t", usecols=[0]).iloc[:, 0].astype(str)
    spots = spots.loc[spots.index.intersection(measured)]
    return arr, spots[["pixel_x", "pixel_y"]].to_numpy(float) * arr.shape[1] / full_w, full_w / arr.shape[1]


@needs_shared
@pytest.mark.parametrize("sec", ["B4", "C2", "C3", "C4"])
def test_tissue_dense_her2st_crops_keep_the_measured_spots_tiles(sec):
    """A crop filled with tissue (pale stroma, fat edges): >= 95 % of the measured spots' tiles kept;
    on the whole section the glass around the tissue is still dropped."""
    arr, spots, f = _section(sec)
    side = int(6400 / f)                                   # 6400 full-res px ~ 4.4 mm, centred on the spots
    cx, cy = np.median(spots, axis=0)
    x0, y0 = int(max(cx - side / 2, 0)), int(max(cy - side / 2, 0))
    crop = arr[y0:y0 + side, x0:x0 + side]
    inside = spots[(spots[:, 0] >= x0) & (spots[:, 0] < x0 + crop.shape[1]) & (spots[:, 1] >= y0) & (spots[:, 1] < y0 + crop.shape[0])]
    inside = inside - [x0, y0]
    assert len(inside) >= 15
    tile = TILE_UM / HER2ST_UM_PER_PX / f
    grid = tile_grid(crop.shape[1], crop.shape[0], tile)
    keep = (tissue_fraction(tissue_mask(crop), 1.0, grid) >= 0.25).reshape(grid.n_rows, grid.n_cols)
    rows = np.clip((inside[:, 1] // tile).astype(int), 0, grid.n_rows - 1)
    cols = np.clip((inside[:, 0] // tile).astype(int), 0, grid.n_cols - 1)
    kept = keep[rows, cols].mean()
    print(f"\n{sec}: {kept:.1%} of {len(inside)} measured spots' tiles kept; {keep.mean():.1%} of the crop's tiles")
    assert kept >= 0.95
    whole = tissue_mask(arr[::2, ::2])
    corners = np.concatenate([whole[:40, :40].ravel(), whole[-40:, -40:].ravel(), whole[:40, -40:].ravel(), whole[-40:, :40].ravel()])
    assert corners.mean() < 0.05 and 0.05 < whole.mean() < 0.6


def _textured_tissue(rng, h, w):
    base = np.array([215, 170, 210], float) + rng.normal(0, 12, (h, w, 3))     # pale pink stroma
    nuclei = rng.random((h, w)) < 0.08
    base[nuclei] = [110, 80, 160]
    return np.clip(base, 0, 255).astype(np.uint8)


def test_tissue_mask_rejects_glass_haze_and_ink_and_keeps_pale_tissue():
    rng = np.random.default_rng(0)
    img = np.clip(np.array([236, 226, 236], float) + rng.normal(0, 1.5, (400, 600, 3)), 0, 255).astype(np.uint8)  # glass
    img[50:350, 50:250] = _textured_tissue(rng, 300, 200)
    yy, xx = np.mgrid[0:400, 0:600]
    haze = np.exp(-(((xx - 420) / 60.0) ** 2 + ((yy - 100) / 60.0) ** 2))       # smooth eosin haze on glass (saturation up to 0.15, as on her2st C3)
    img[..., 1] = np.clip(img[..., 1] - 25 * haze, 0, 255).astype(np.uint8)
    img[200:240, 300:580] = [30, 60, 190]       # blue ink
    img[260:300, 300:580] = [40, 150, 70]       # green ink
    img[320:360, 300:580] = [20, 20, 25]        # black ink
    mask = tissue_mask(img)
    assert mask[60:340, 60:240].mean() > 0.97                       # the pale tissue
    assert mask[:, 280:].mean() < 0.01                               # haze, ink and glass
    glass = np.clip(236 + rng.normal(0, 2, (300, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()


def test_um_per_px_far_from_the_recorded_scale_is_refused_unless_forced(tmp_path, tiny_model):
    path = write_tiff(tmp_path / "s.tif", synthetic_slide(0), um_per_px=0.5)
    r = predict_cli(tiny_model, path, out=tmp_path / "o", cache=tmp_path / "c", extra=["--um-per-px", "0.25"])
    assert r.exit_code == 2 and "0.25" in r.output and "0.5 µm/px" in r.output and "--force-um-per-px" in r.output
    assert not (tmp_path / "o" / "s").exists()
    r = predict_cli(tiny_model, path, out=tmp_path / "o", cache=tmp_path / "c",
                    extra=["--um-per-px", "0.25", "--force-um-per-px", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert ad.read_h5ad(tmp_path / "o" / "s" / "predictions.h5ad").uns["hexpr"]["um_per_px_source"] == "given (forced)"


def test_a_big_jpeg_is_refused_with_advice_and_thumbnails_skip_the_full_decode(tmp_path, monkeypatch):
    Image.fromarray(synthetic_slide()).save(tmp_path / "s.jpg", quality=90)
    with open_slide(tmp_path / "s.jpg", 0.5) as s:
        thumb, scale = slide_thumbnail(s, 250)
        assert thumb.shape == (200, 250, 3) and scale == 0.25 and s._im is None    # decoded at 1/4 scale only
        full = np.asarray(Image.open(tmp_path / "s.jpg").convert("RGB").reduce(4))
        assert np.abs(thumb.astype(int) - full).mean() < 3
    monkeypatch.setattr(slides_module, "MAX_WHOLE_DECODE_PIXELS", 500 * 500)
    with pytest.raises(SlideError, match=r"1,000 x 800 px JPG.*vips tiffsave s\.jpg s\.tif --tile --pyramid"):
        open_slide(tmp_path / "s.jpg", 0.5)


def test_tiles_are_read_from_the_pyramid_level_that_is_fine_enough(tmp_path):
    from hexpr.embedder.slides import block_mean

    img = synthetic_slide()
    path = tmp_path / "s.tif"
    with tifffile.TiffWriter(path) as tif:      # level 1 = 2x2 block means, as scanners and vips make it
        opts = dict(photometric="rgb", tile=(128, 128), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        tif.write(img, subifds=1, **opts)
        tif.write(block_mean(img, 2), subfiletype=1, **opts)
    with open_slide(path, max_inmemory_bytes=0) as s:           # region reader, as for a gigapixel slide
        assert s.mode == "region" and s.level_downsamples == [(1.0, 1.0), (2.0, 2.0)]
        assert s.best_level(1.5) == 0 and s.best_level(4.0) == 1
        coarse, _ = read_square(s, 500.0, 400.0, 200.0, 50)     # 4x down: read from level 1
        assert 1 in s._levels and s._levels[1].tiles_decoded > 0
    with open_slide(path) as whole:                              # in memory: level 0 only
        fine, _ = read_square(whole, 500.0, 400.0, 200.0, 50)
    assert np.abs(coarse.astype(int) - fine).mean() < 4


class _InterruptAt:
    """Wraps a dataset: Ctrl-C (KeyboardInterrupt) when image ``at`` is read."""

    def __init__(self, dataset, at):
        self.dataset, self.at = dataset, at

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def read_image(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        return self.dataset.read_image(i)


def test_ctrl_c_keeps_finished_tiles_and_a_rerun_resumes_to_the_same_features(tmp_path):
    from conftest import TINY_BACKBONE

    from hexpr.embedder.backbones import parse_backbone
    from hexpr.embedder.cache import read_cache
    from hexpr.embedder.extract import embed_dataset
    from hexpr.embedder.tiling import tile_dataset

    path = write_tiff(tmp_path / "s.tif", synthetic_slide(0))
    grid = tile_grid(1000, 800, 200)
    ds = tile_dataset(path, 0.5, grid.centres, grid.ids(), 100, 32)
    spec = [parse_backbone(TINY_BACKBONE)]
    opts = dict(batch_size=4, num_workers=0, progress=False, device="cpu", precision="fp32", chunk_size=512)
    with pytest.warns(UserWarning, match=r"interrupted: 8 of 20 tiles kept in .*rerun the same command to resume"):
        with pytest.raises(KeyboardInterrupt):
            embed_dataset(_InterruptAt(ds, 9), spec, tmp_path / "cache", **opts)   # before the first chunk ends
    assert list((tmp_path / "cache" / "embeddings" / ".partial").rglob("chunk_000000.part.npy"))
    resumed = embed_dataset(ds, spec, tmp_path / "cache", **opts)[0]
    fresh = embed_dataset(ds, spec, tmp_path / "fresh", **opts)[0]
    ids, resumed_x, _ = read_cache(resumed.path)
    np.testing.assert_allclose(resumed_x, read_cache(fresh.path)[1], rtol=1e-5, atol=1e-6)
    assert ids == ds.ids


@pytest.mark.slow
def test_two_torchrun_ranks_share_one_slide_by_tiles(tmp_path, tiny_model):
    import socket
    import subprocess
    import sys

    from hexpr.embedder.cache import read_attrs

    slide = write_tiff(tmp_path / "s.tif", synthetic_slide(0))
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, warnings\nwarnings.simplefilter('ignore')\nfrom workflow import predict_slide\n"
        "r = predict_slide(sys.argv[1], [sys.argv[2]], sys.argv[3], cache_dir=sys.argv[4], tile_um=50, tile_um_per_px=2,"
        " progress=False, chunk_size=8, num_workers=0, precision='fp32')\n"
        "print('RESULT', r['split'], len(r['slides']), len(r['helped']))\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(slides_module.Path(__file__).parents[1])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(port), str(script), str(tiny_model), str(slide), str(tmp_path / "multi"), str(tmp_path / "cache")]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(result.stdout.split("RESULT")[1:]) == sorted([" tiles 1 0\n", " tiles 0 1\n"]), result.stdout
    cache_file = next((tmp_path / "cache" / "embeddings").glob("*.h5"))
    assert read_attrs(cache_file)["world_size"] == 2                 # both ranks embedded tiles of the one slide
    from hexpr.workflow import predict_slide

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predict_slide(tiny_model, [slide], tmp_path / "single", cache_dir=tmp_path / "cache1", tile_um=50, tile_um_per_px=2,
                      progress=False, chunk_size=8, num_workers=0, precision="fp32")
    multi, single = (ad.read_h5ad(tmp_path / d / "s" / "predictions.h5ad") for d in ("multi", "single"))
    assert multi.n_obs > 16
    np.testing.assert_allclose(multi.X, single.X, rtol=1e-5, atol=1e-6)


APERIO = "Aperio Image Library v12.0.15\r\n1000x800 [0,0 1000x800] (128x128) RAW|AppMag = 20|MPP = 0.5"
OME = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
       '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="1000" SizeY="800" SizeC="3" '
       'SizeZ="1" SizeT="1" PhysicalSizeX="0.5" PhysicalSizeY="0.5" Interleaved="true">'
       '<Channel ID="Channel:0:0" SamplesPerPixel="3"/><TiffData/></Pixels></Image></OME>')


def _write_format(path, img, fmt):
    if fmt == "svs":      # Aperio: scale only in the ImageDescription; a reduced level after the baseline
        with tifffile.TiffWriter(path) as tif:
            tif.write(img, photometric="rgb", tile=(128, 128), description=APERIO, metadata=None)
            tif.write(img[::4, ::4], photometric="rgb", tile=(128, 128), description="Aperio Image Library v12.0.15\r\nlevel",
                      metadata=None)
    elif fmt == "ome":
        with tifffile.TiffWriter(path) as tif:
            tif.write(img, photometric="rgb", tile=(128, 128), description=OME, metadata=None)
    elif fmt == "jpeg":   # JPEG-compressed pyramidal TIFF with resolution tags
        res = 1e4 / 0.5
        with tifffile.TiffWriter(path) as tif:
            opts = dict(photometric="rgb", tile=(128, 128), compression="jpeg", resolution=(res, res), resolutionunit="CENTIMETER")
            tif.write(img, subifds=1, **opts)
            tif.write(img[::2, ::2], subfiletype=1, **opts)
    return path


@pytest.mark.parametrize("fmt, reader, source", [("svs", "openslide", "OpenSlide openslide.mpp-x"),
                                                  ("ome", "memory", "OME PhysicalSizeX"),
                                                  ("jpeg", "memory", "TIFF resolution tags (cm)")])
def test_slide_formats_give_their_scale_and_the_plain_tiff_predictions(tmp_path, tiny_model, fmt, reader, source):
    if fmt == "svs":
        pytest.importorskip("openslide")
    img = synthetic_slide(1)
    path = _write_format(tmp_path / f"s.{'svs' if fmt == 'svs' else 'tif'}", img, fmt)
    with open_slide(path) as s:
        assert s.mode == reader and s.um_per_px == pytest.approx(0.5) and s.um_per_px_source == source
        pixels = np.asarray(s.region(0, 0, s.width, s.height))
    plain = write_tiff(tmp_path / "plain" / "p.tif" if (tmp_path / "plain").mkdir() is None else None, pixels, pyramid=False)
    if fmt != "jpeg":
        np.testing.assert_array_equal(pixels, img)
    outs = []
    for slide in (path, plain):
        # 100 µm tiles at 1 µm/px: 2x down, finer than the SVS's 4x level, so every reader cuts them from level 0
        r = predict_cli(tiny_model, slide, out=tmp_path / "out", cache=tmp_path / "cache",
                        extra=["--workers", "0", "--tile-um-per-px", "1"])
        assert r.exit_code == 0, r.output
        outs.append(ad.read_h5ad(tmp_path / "out" / slide.stem / "predictions.h5ad"))
    assert outs[0].uns["hexpr"]["um_per_px_source"] == source
    np.testing.assert_array_equal(outs[0].obs_names, outs[1].obs_names)
    np.testing.assert_allclose(outs[0].X, outs[1].X, rtol=1e-4, atol=1e-5)
