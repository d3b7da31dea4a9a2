"""embedder/tiling.py: tissue mask, tile grid, tissue fraction per tile, slide identity."""
import numpy as np
import pytest

from hexpr.embedder.tiling import saturation, slide_digest, tile_grid, tissue_fraction, tissue_mask


def disc_on_glass(h=300, w=400, centre=(150, 180), radius=90, seed=0):
    """Grey-white glass with a textured pink disc of known area; returns (image, true mask)."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(238, 4, (h, w, 3)), 0, 255)
    y, x = np.ogrid[:h, :w]
    disc = (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius ** 2
    pink = np.clip(np.array([190, 100, 160]) + rng.normal(0, 20, (h, w, 3)), 0, 255)
    img[disc] = pink[disc]
    return img.astype(np.uint8), disc


def test_saturation_is_zero_for_grey_and_one_for_pure_colour():
    rgb = np.array([[[128, 128, 128], [255, 0, 0], [0, 0, 0], [200, 100, 100]]], np.uint8)
    np.testing.assert_allclose(saturation(rgb)[0], [0.0, 1.0, 0.0, 0.5])


def test_tissue_mask_area_matches_the_known_tissue_area():
    img, disc = disc_on_glass()
    mask = tissue_mask(img)
    assert mask.shape == disc.shape
    assert abs(int(mask.sum()) - int(disc.sum())) < 0.03 * disc.sum()
    assert (mask & disc).sum() > 0.97 * disc.sum()          # the tissue is found where it is


def test_tissue_mask_drops_specks_and_fills_small_holes():
    img, _ = disc_on_glass()
    img[10:13, 10:13] = [150, 60, 120]                       # a 3x3 px speck of stain on the glass
    img[148:152, 178:182] = 240                              # a 4x4 px hole in the tissue
    mask = tissue_mask(img, smooth_px=1)
    assert not mask[5:20, 5:20].any()
    assert mask[148:152, 178:182].all()


@pytest.mark.parametrize("thumbnail", [np.full((50, 60, 3), 240, np.uint8), np.zeros((50, 60, 3), np.uint8)],
                         ids=["white glass", "black"])
def test_tissue_mask_of_an_empty_slide_is_empty(thumbnail):
    assert not tissue_mask(thumbnail).any()


@pytest.mark.parametrize("width, height, tile, stride", [(1000, 800, 200, None), (1000, 800, 224, 100),
                                                         (513, 257, 64, 48.5), (100, 90, 40, 40)])
def test_tile_grid_covers_the_slide_with_the_given_stride(width, height, tile, stride):
    g = tile_grid(width, height, tile, stride)
    step = tile if stride is None else stride
    assert len(g) == g.n_rows * g.n_cols == len(set(g.ids()))
    # every tile inside the slide, on the stride lattice from (0, 0), row-major
    assert (g.x0 >= 0).all() and (g.y0 >= 0).all()
    assert (g.x0 + tile <= width).all() and (g.y0 + tile <= height).all()
    np.testing.assert_allclose(g.x0, g.cols * step)
    np.testing.assert_allclose(g.y0, g.rows * step)
    assert list(zip(g.rows, g.cols)) == sorted(zip(g.rows, g.cols))
    # no further tile would fit: the grid reaches the far edges to within one stride
    assert g.x0.max() + step + tile > width and g.y0.max() + step + tile > height
    np.testing.assert_allclose(g.centres, np.column_stack([g.x0 + tile / 2, g.y0 + tile / 2]))


def test_tile_grid_of_a_slide_smaller_than_a_tile_is_empty_and_bad_sizes_are_refused():
    assert len(tile_grid(50, 500, 64)) == 0
    with pytest.raises(ValueError, match="must be positive"):
        tile_grid(100, 100, 10, -5)


def test_tissue_fraction_equals_the_mean_of_the_mask_under_each_tile():
    rng = np.random.default_rng(1)
    mask = rng.random((60, 80)) < 0.3
    g = tile_grid(80, 60, 16, 12)
    expected = [mask[int(y):int(y) + 16, int(x):int(x) + 16].mean() for x, y in zip(g.x0, g.y0)]
    np.testing.assert_allclose(tissue_fraction(mask, 1.0, g), expected)
    # the same mask at half resolution, tiles in level-0 px
    g0 = tile_grid(160, 120, 32, 24)
    np.testing.assert_allclose(tissue_fraction(mask, 0.5, g0), expected)


def test_slide_digest_tracks_content_not_name(tmp_path):
    data = np.random.default_rng(2).integers(0, 255, 3 << 20, dtype=np.uint8).tobytes()   # 3 MiB: middle unsampled
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    a.write_bytes(data)
    b.write_bytes(data)
    assert slide_digest(a) == slide_digest(b)
    changed = bytearray(data)
    changed[-1] ^= 0xFF                                  # the last MiB is hashed
    b.write_bytes(bytes(changed))
    assert slide_digest(a) != slide_digest(b)
