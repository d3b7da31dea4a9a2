"""The browser viewer: the pyramid and data files it writes, hexpr view and its errors, and, in headless
Chromium (marked `browser`), the page itself opened from file:// with no server."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import HER2ST, MOBILENET_WEIGHTS, needs_shared
from PIL import Image
from test_predict_slide import predict_cli, runner, synthetic_slide, tiny_model, write_tiff  # noqa: F401 (fixture)

from hexpr.embedder.slides import open_slide
from hexpr.pipeline import app
from hexpr.workflow.outputs import pyramid as pyramid_module
from hexpr.workflow.outputs.pyramid import TILE, level_size, max_level, write_pyramid
from hexpr.workflow.outputs.viewer import QUANT_MAX, quantise, top_genes

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[1]


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


# CI sets HEXPR_REQUIRE_BROWSER=1 (.ci/run installs Chromium): there a missing browser fails instead of skipping
_BROWSER_MISSING = None if CHROMIUM.is_file() and _has_playwright() else \
    f"needs {CHROMIUM} (apt-get install chromium) and playwright (pip install playwright)"
_skip_browser = pytest.mark.skipif(bool(_BROWSER_MISSING) and os.environ.get("HEXPR_REQUIRE_BROWSER") != "1",
                                   reason=_BROWSER_MISSING or "")


def browser_test(func):
    """A test in headless Chromium: marked `browser` (-m browser selects them), skipped without the browser."""
    return pytest.mark.browser(_skip_browser(func))


# ---------------------------------------------------------------------------------------------------------
# files, without a browser
# ---------------------------------------------------------------------------------------------------------
def test_quantised_values_come_back_within_half_a_step():
    rng = np.random.default_rng(0)
    block = rng.normal(size=(500, 3)) * [1, 100, 0]
    block[7, 0] = np.nan
    codes, lo, hi = quantise(block)
    assert codes.shape == (3, 500) and codes.dtype == np.uint16
    assert codes[0, 7] == QUANT_MAX + 1 and (codes[2] == 0).all()          # NaN code; a constant column
    back = lo[:, None] + codes.astype(float) * ((hi - lo) / QUANT_MAX)[:, None]
    ok = codes <= QUANT_MAX
    err = np.abs(back - block.T)[ok]
    assert err.max() <= ((hi - lo).max() / QUANT_MAX) / 2 + 1e-9
    assert lo[1] == np.nanmin(block[:, 1]) and hi[1] == np.nanmax(block[:, 1])


def test_top_genes_are_the_highest_z_scores_of_each_tile():
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.normal(size=(40, 12)), columns=[f"g{i}" for i in range(12)])
    idx, z = top_genes(frame, k=3, chunk=7)
    zs = ((frame - frame.mean()) / frame.std(ddof=0)).to_numpy()
    expected = np.argsort(-zs, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(z, np.take_along_axis(zs, expected, 1), rtol=1e-5)


def test_pyramid_levels_tiles_and_tissue_blocks(tmp_path, monkeypatch):
    """Deep Zoom level sizes; a level-0 tile holds the slide's own pixels; fine levels exist only in
    blocks that a predicted tile overlaps; coarse levels are complete."""
    monkeypatch.setattr(pyramid_module, "BLOCK_STEPS", 1)            # blocks of 512 px on this 1000 x 800 slide
    img = synthetic_slide(0)
    with open_slide(write_tiff(tmp_path / "s.tif", img)) as slide:
        pyr = write_pyramid(slide, tmp_path / "pyr", np.array([[260.0, 210.0, 360.0, 310.0]]))
    top = max_level(1000, 800)
    assert (top, pyr.max_level, pyr.fine_from, pyr.block_px) == (10, 10, 9, 512)
    assert pyr.blocks.tolist() == [[True, False], [False, False]]
    for level in range(top + 1):
        files = {p.name for p in (tmp_path / "pyr" / str(level)).glob("*.jpg")}
        w, h = level_size(1000, 800, level, top)
        complete = {f"{c}_{r}.jpg" for c in range(-(-w // TILE)) for r in range(-(-h // TILE))}
        if level < pyr.fine_from:
            assert files == complete, level
        else:                                   # only the top-left block: 2 x 2 tiles at 10, 1 at 9
            n = 2 ** (level - pyr.fine_from)
            assert files == {f"{c}_{r}.jpg" for c in range(n) for r in range(n)}, level
        for name in files:                      # edge tiles are cut to the level's size
            c, r = map(int, name[:-4].split("_"))
            size = Image.open(tmp_path / "pyr" / str(level) / name).size
            assert size == (min(TILE, w - c * TILE), min(TILE, h - r * TILE))
    tile = np.asarray(Image.open(tmp_path / "pyr" / "10" / "1_0.jpg"), float)      # level 0 px (256..511, 0..255)
    assert np.abs(tile - img[0:256, 256:512]).mean() < 6                            # JPEG of the same pixels
    half = np.asarray(Image.open(tmp_path / "pyr" / "9" / "0_0.jpg"), float)        # 2x reduced, x 0..511 -> 0..255
    reduced = img[:512, :512].reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - reduced).mean() < 6
    assert pyr.n_tiles == sum(1 for _ in (tmp_path / "pyr").rglob("*.jpg"))


@pytest.fixture(scope="module")
def viewer_run(tmp_path_factory, tiny_model):  # noqa: F811
    """predict-slide --outputs h5ad,viewer on two slides (one 2,000 x 1,600 px with 4 tissue blobs) with a gene set."""
    root = tmp_path_factory.mktemp("viewer")
    write_tiff(root / "big.tif", np.tile(synthetic_slide(0), (2, 2, 1)))
    write_tiff(root / "small.tif", synthetic_slide(1))
    (root / "sets.gmt").write_text("prog\t\tG0\tG1\n")
    r = predict_cli(tiny_model, root / "big.tif", root / "small.tif", out=root / "maps", cache=root / "cache",
                    extra=["--outputs", "h5ad,viewer", "--gene-sets", str(root / "sets.gmt")])
    assert r.exit_code == 0, r.output
    assert "viewer:" in r.output and "index of every slide:" in r.output
    return root


def test_predict_slide_writes_a_viewer_per_slide_and_a_run_index(viewer_run):
    maps = viewer_run / "maps"
    assert (maps / "index.html").is_file()
    for name in ("big", "small"):
        viewer = maps / name / "viewer"
        adata = ad.read_h5ad(maps / name / "predictions.h5ad")
        assert {p.name for p in (viewer / "data" / "genes").iterdir()} == {f"{i}.js" for i in range(adata.n_vars)}
        assert (viewer / "assets" / "openseadragon.min.js").is_file() and (viewer / "assets" / "LICENSE-openseadragon.txt").is_file()
        text = (viewer / "index.html").read_text() + (viewer / "assets" / "viewer.js").read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text)          # nothing from the network
        # a gene file holds that gene's values of the h5ad, uint16-quantised
        i = 2
        payload = (viewer / "data" / "genes" / f"{i}.js").read_text()
        lo, hi, b64 = re.search(r'"v":\[([^,]+),([^,]+),"([^"]+)"\]', payload).groups()
        codes = np.frombuffer(base64.b64decode(b64), "<u2")
        values = float(lo) + codes * ((float(hi) - float(lo)) / QUANT_MAX)
        step = (float(hi) - float(lo)) / QUANT_MAX
        np.testing.assert_allclose(values, adata.X[:, i], atol=step / 2 + 1e-6)
        assert '"lower":' in payload and '"upper":' in payload


def test_view_rewrites_the_viewer_and_says_what_to_pass_on_bad_input(viewer_run, tmp_path):
    maps = viewer_run / "maps"
    r = runner.invoke(app, ["view", str(maps / "small")])
    assert r.exit_code == 0, r.output
    assert "small/viewer/index.html" in r.output and "pyramid" in r.output
    # no predictions
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["view", str(tmp_path / "empty")])
    assert r.exit_code == 2 and r.output.count("Error:") == 1
    assert "holds no predictions.h5ad" in r.output and "OUT/<slide>" in r.output
    # the slide file moved: the error names it and both ways out; nothing is written
    moved = tmp_path / "moved"
    shutil.copytree(maps / "small", moved / "small", ignore=shutil.ignore_patterns("viewer"))
    slide = Path(ad.read_h5ad(moved / "small" / "predictions.h5ad").uns["hexpr"]["slide"])
    hidden = slide.with_name("elsewhere.tif")
    slide.rename(hidden)
    try:
        r = runner.invoke(app, ["view", str(moved / "small")])
        assert r.exit_code == 2 and r.output.count("Error:") == 1, r.output
        assert str(slide) in r.output.replace("\n", "") and "--slide" in r.output and "--no-pyramid" in r.output
        assert not (moved / "small" / "viewer").exists()
        r = runner.invoke(app, ["view", str(moved / "small"), "--slide", str(tmp_path / "nope.tif")])
        assert r.exit_code == 2 and "no such file" in r.output
        r = runner.invoke(app, ["view", str(moved / "small"), "--slide", str(hidden)])
        assert r.exit_code == 0, r.output
        assert (moved / "small" / "viewer" / "pyramid").is_dir()
    finally:
        hidden.rename(slide)
    # without the slide at all: the thumbnail stored in the h5ad, with a note on the page
    r = runner.invoke(app, ["view", str(moved / "small"), "--no-pyramid"])
    assert r.exit_code == 0, r.output
    assert not (moved / "small" / "viewer" / "pyramid").exists()
    assert "No tile pyramid" in (moved / "small" / "viewer" / "data" / "slide.js").read_text()


# ---------------------------------------------------------------------------------------------------------
# in the browser
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if _BROWSER_MISSING:
        pytest.fail(f"HEXPR_REQUIRE_BROWSER=1 but the browser tests cannot run: {_BROWSER_MISSING}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A page opened from file:// with its console messages, page errors and requests recorded."""

    def __init__(self, browser, path: Path, width: int = 1100, height: int = 700):
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.errors.append(f"failed: {r.url}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(path.as_uri())

    def wait_drawn(self):
        self.page.wait_for_function("window.hexprViewer && hexprViewer.ready && hexprViewer.fullyLoaded()", timeout=30_000)

    def screen_xy(self, x: float, y: float) -> tuple[float, float]:
        """Page position of level-0 slide pixel (x, y)."""
        return tuple(self.page.evaluate("""([x, y]) => {
            const S = hexprViewer, item = S.viewer.world.getItemAt(0), k = S.imageScale;
            const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x * k, y * k));
            const r = S.viewer.container.getBoundingClientRect();
            return [r.left + p.x, r.top + p.y]; }""", [x, y]))

    def pixel(self, xy) -> np.ndarray:
        shot = Image.open(io.BytesIO(self.page.screenshot())).convert("RGB")
        return np.asarray(shot, int)[int(round(xy[1])), int(round(xy[0]))]

    def pyramid_levels(self) -> set[int]:
        return {int(m.group(1)) for u in self.requests if (m := re.search(r"/pyramid/(\d+)/", u))}

    def close(self):
        self.page.close()


def viridis(value: float, lo: float, hi: float) -> np.ndarray:
    from matplotlib import colormaps

    k = int(np.clip(round((value - lo) / (hi - lo) * 255), 0, 255)) if hi > lo else 128
    return np.round(np.asarray(colormaps["viridis"](k / 255))[:3] * 255).astype(int)


def _set_opacity(page, value: float):
    page.page.eval_on_selector("#opacity", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(value))


@browser_test
def test_page_loads_from_file_with_no_errors_and_no_outside_requests(viewer_run, browser):
    viewer = viewer_run / "maps" / "big" / "viewer"
    page = Page(browser, viewer / "index.html")
    try:
        page.wait_drawn()
        assert page.errors == []
        assert page.requests and all(u.startswith(viewer.as_uri() + "/") for u in page.requests), page.requests
        assert page.pyramid_levels()                      # the slide is drawn from the pyramid
        assert page.page.inner_text("#scalebar-label").endswith(("µm", "mm"))
        assert "No tile pyramid" not in page.page.inner_text("#panel")
    finally:
        page.close()


@browser_test
def test_typing_a_gene_recolours_tiles_with_the_h5ad_value(viewer_run, browser):
    slide_dir = viewer_run / "maps" / "big"
    adata = ad.read_h5ad(slide_dir / "predictions.h5ad")
    page = Page(browser, slide_dir / "viewer" / "index.html")
    try:
        page.wait_drawn()
        _set_opacity(page, 1.0)
        # the tile whose values differ most between two genes' colour scales
        x = np.asarray(adata.X, float)
        norm = (x - x.min(0)) / np.where(np.ptp(x, 0) > 0, np.ptp(x, 0), 1)
        first = page.page.evaluate("hexprViewer.gene")
        other = int(np.argmax(np.abs(norm - norm[:, [first]]).max(axis=0)))
        tile = int(np.argmax(np.abs(norm[:, other] - norm[:, first])))
        xy = page.screen_xy(*adata.obsm["spatial"][tile])
        before = page.pixel(xy)
        np.testing.assert_allclose(before, viridis(x[tile, first], x[:, first].min(), x[:, first].max()), atol=4)
        gene = adata.var_names[other]
        page.page.fill("#gene", "")
        page.page.type("#gene", gene[:-1])
        assert gene in page.page.inner_text("#suggestions")          # autocomplete over the predicted genes
        page.page.type("#gene", gene[-1])
        page.page.press("#gene", "Enter")
        page.page.wait_for_function(f"hexprViewer.gene === {other} && hexprViewer.switches.length >= 2")
        page.wait_drawn()
        after = page.pixel(xy)
        np.testing.assert_allclose(after, viridis(x[tile, other], x[:, other].min(), x[:, other].max()), atol=4)
        assert np.abs(after - before).max() > 20
        assert page.page.inner_text("#legend-title").startswith(gene)
        lo, hi = (float(page.page.inner_text(s)) for s in ("#legend-min", "#legend-max"))
        assert lo == pytest.approx(x[:, other].min(), rel=1e-3) and hi == pytest.approx(x[:, other].max(), rel=1e-3)
        # the interval width and the gene-set score recolour the same tile
        page.page.select_option("#mode", "spread")
        width = adata.layers["upper"][:, other] - adata.layers["lower"][:, other]
        np.testing.assert_allclose(page.pixel(xy), viridis(width[tile], width.min(), width.max()), atol=6)
        page.page.select_option("#mode", "score")
        page.page.wait_for_function("document.getElementById('legend-title').textContent.startsWith('gene set')")
        score = adata.obs["score_prog"].to_numpy(float)
        np.testing.assert_allclose(page.pixel(xy), viridis(score[tile], score.min(), score.max()), atol=4)
        assert page.errors == []
    finally:
        page.close()


@browser_test
def test_hover_shows_the_stored_value_position_and_interval(viewer_run, browser):
    slide_dir = viewer_run / "maps" / "big"
    adata = ad.read_h5ad(slide_dir / "predictions.h5ad")
    page = Page(browser, slide_dir / "viewer" / "index.html")
    try:
        page.wait_drawn()
        gene = page.page.evaluate("hexprViewer.gene")
        page.page.wait_for_function("hexprViewer.top !== null")
        for tile in (0, len(adata) // 2, len(adata) - 1):
            cx, cy = adata.obsm["spatial"][tile]
            page.page.mouse.move(*page.screen_xy(cx, cy))
            text = page.page.inner_text("#info")
            row, col = (int(v) for v in re.search(r"row (\d+), col (\d+)", text).groups())
            assert (row, col) == (adata.obs["row"].iloc[tile], adata.obs["col"].iloc[tile])
            shown = re.search(rf"{adata.var_names[gene]}: (\S+)\s+\[(\S+), (\S+)\]", text)
            value, lower, upper = (float(v) for v in shown.groups())
            assert value == pytest.approx(adata.X[tile, gene], rel=2e-3, abs=1e-3)
            assert lower == pytest.approx(adata.layers["lower"][tile, gene], rel=2e-3, abs=1e-3)
            assert upper == pytest.approx(adata.layers["upper"][tile, gene], rel=2e-3, abs=1e-3)
            um = 0.5                                                         # the slide's µm/px
            x_um, y_um = (float(v) for v in re.search(r"centre x (\S+) µm, y (\S+) µm", text).groups())
            assert (x_um, y_um) == (pytest.approx(cx * um, rel=1e-3), pytest.approx(cy * um, rel=1e-3))
            assert "top genes vs this slide:" in text
    finally:
        page.close()


@browser_test
def test_zooming_in_fetches_finer_pyramid_levels(viewer_run, browser):
    slide_dir = viewer_run / "maps" / "big"
    adata = ad.read_h5ad(slide_dir / "predictions.h5ad")
    page = Page(browser, slide_dir / "viewer" / "index.html")
    try:
        page.wait_drawn()
        first = page.pyramid_levels()
        top = page.page.evaluate("hexprViewer.data.pyramid.max_level")
        assert max(first) < top
        cx, cy = adata.obsm["spatial"][0]
        page.page.evaluate("""([x, y]) => { const v = hexprViewer.viewer, item = v.world.getItemAt(0);
            v.viewport.zoomTo(v.viewport.getMaxZoom(), null, true);
            v.viewport.panTo(item.imageToViewportCoordinates(x, y), true); }""", [float(cx), float(cy)])
        for _ in range(150):                                      # OpenSeadragon asks for tiles on its next frames
            if max(page.pyramid_levels()) == top:
                break
            page.page.wait_for_timeout(200)
        page.wait_drawn()
        assert max(page.pyramid_levels()) == top                  # the slide's own pixels
        assert page.errors == []
    finally:
        page.close()


@browser_test
def test_the_index_page_links_to_every_slide(viewer_run, browser):
    maps = viewer_run / "maps"
    page = Page(browser, maps / "index.html")
    try:
        links = page.page.eval_on_selector_all("a.card", "els => els.map(e => e.getAttribute('href'))")
        assert sorted(links) == ["big/viewer/index.html", "small/viewer/index.html"]
        page.page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        page.page.click("a.card >> text=small")
        page.wait_drawn()
        assert page.page.url == (maps / "small" / "viewer" / "index.html").as_uri()
        assert page.errors == []
    finally:
        page.close()


@browser_test
def test_a_viewer_without_pyramid_works_from_the_thumbnail_with_a_note(viewer_run, browser, tmp_path):
    folder = tmp_path / "small"
    shutil.copytree(viewer_run / "maps" / "small", folder, ignore=shutil.ignore_patterns("viewer"))
    r = runner.invoke(app, ["view", str(folder), "--no-pyramid"])
    assert r.exit_code == 0, r.output
    adata = ad.read_h5ad(folder / "predictions.h5ad")
    page = Page(browser, folder / "viewer" / "index.html")
    try:
        page.wait_drawn()
        assert "No tile pyramid" in page.page.inner_text("#note")
        assert not page.pyramid_levels() and any(u.endswith("/thumbnail.jpg") for u in page.requests)
        _set_opacity(page, 1.0)
        gene = page.page.evaluate("hexprViewer.gene")
        x = np.asarray(adata.X, float)[:, gene]
        tile = int(np.argmax(x))
        np.testing.assert_allclose(page.pixel(page.screen_xy(*adata.obsm["spatial"][tile])), viridis(x[tile], x.min(), x.max()),
                                   atol=4)
        assert page.errors == []
    finally:
        page.close()


def test_pyramid_cut_in_worker_processes_equals_one_process(tmp_path, monkeypatch):
    """A slide read by region is cut by several processes, each opening it through the reader table:
    the same tiles, byte for byte, as in one process."""
    monkeypatch.setattr(pyramid_module, "BLOCK_STEPS", 1)
    path = write_tiff(tmp_path / "s.tif", np.tile(synthetic_slide(0), (2, 2, 1)))
    boxes = np.array([[0.0, 0.0, 2000.0, 1600.0]])
    with open_slide(path, max_inmemory_bytes=0) as slide:             # read by region, like a gigapixel slide
        assert slide.mode == "region"
        monkeypatch.setattr(pyramid_module, "MIN_BLOCKS_PER_WORKER", 100)
        assert pyramid_module.pyramid_workers(slide, 16) == 1
        one = write_pyramid(slide, tmp_path / "one", boxes)
        monkeypatch.setattr(pyramid_module, "MIN_BLOCKS_PER_WORKER", 2)
        assert pyramid_module.pyramid_workers(slide, 16) == 2 or (os.cpu_count() or 1) == 1
        several = write_pyramid(slide, tmp_path / "several", boxes)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.jpg"))
    assert files == sorted(p.relative_to(tmp_path / "several") for p in (tmp_path / "several").rglob("*.jpg"))
    assert (one.n_tiles, one.n_bytes) == (several.n_tiles, several.n_bytes) == (len(files), one.n_bytes)
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "several" / f).read_bytes() for f in files)


@pytest.mark.slow
@browser_test
@needs_shared
def test_her2st_section_in_the_viewer(tmp_path, browser):
    """A real section: ridge on C2 + C4 (MobileNetV2 at 64 px, 50 HVG), predict-slide C3 with the viewer;
    the page opens cleanly, the chosen gene's colour sits on its tile, and (HEXPR_UPDATE_SCREENSHOT=1)
    the screenshot is README's docs/viewer.png."""
    from hexpr.embedder.backbones import parse_backbone
    from hexpr.embedder.importers import import_dataset
    from hexpr.workflow import fit_head, predict_slide

    spec = parse_backbone(f"mobilenetv2_100:weights={MOBILENET_WEIGHTS},pad_type=same,mean=0.5/0.5/0.5,std=0.5/0.5/0.5,"
                          "size=64")
    opts = dict(cache_dir=tmp_path / "cache", progress=False, precision="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_dataset(HER2ST, tmp_path / "train", sample_ids=["C2", "C4"], target_um_per_px=1.75, progress=False)
        fit_head(tmp_path / "train", [spec], head="ridge", genes="hvg:50", folds=2, out_dir=tmp_path / "model", n_jobs=1,
                 **opts)
        image = next((HER2ST / "ST-imgs" / "C3").glob("*.jpg"))
        predict_slide(tmp_path / "model", [image], tmp_path / "maps", um_per_px=0.69, outputs="h5ad,viewer", **opts)
    slide_dir = tmp_path / "maps" / image.stem
    adata = ad.read_h5ad(slide_dir / "predictions.h5ad")
    page = Page(browser, slide_dir / "viewer" / "index.html", width=1280, height=760)
    try:
        page.wait_drawn()
        gene = page.page.evaluate("hexprViewer.gene")
        x = np.asarray(adata.X, float)[:, gene]
        _set_opacity(page, 1.0)
        tile = int(np.argmax(x))
        np.testing.assert_allclose(page.pixel(page.screen_xy(*adata.obsm["spatial"][tile])), viridis(x[tile], x.min(), x.max()),
                                   atol=4)
        _set_opacity(page, 0.6)
        page.page.mouse.move(*page.screen_xy(*adata.obsm["spatial"][tile]))
        page.page.wait_for_function("hexprViewer.top !== null")
        page.page.mouse.move(*page.screen_xy(*adata.obsm["spatial"][tile]))
        page.wait_drawn()
        page.page.screenshot(path=str(tmp_path / "viewer.png"))
        if os.environ.get("HEXPR_UPDATE_SCREENSHOT"):
            shutil.copyfile(tmp_path / "viewer.png", REPO / "docs" / "viewer.png")
        assert page.errors == [] and all(u.startswith((slide_dir / "viewer").as_uri() + "/") for u in page.requests)
    finally:
        page.close()
