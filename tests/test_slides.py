"""embedder/slides.py: reading slides (regions, thumbnails, scale) and the squares tiles are cut from."""
import numpy as np
import pytest
from PIL import Image

from hexpr.embedder.slides import (
    ArraySlide,
    SlideError,
    block_mean,
    find_slides,
    open_slide,
    read_square,
    slide_thumbnail,
    thumbnail_factor,
)


def gradient(h=90, w=120):
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 2 % 256, y * 2 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def test_block_mean_equals_the_mean_of_each_block_with_edges_replicated():
    a = np.random.default_rng(0).integers(0, 256, (7, 10, 3)).astype(np.uint8)
    out = block_mean(a, 3)
    assert out.shape == (3, 4, 3)
    padded = np.pad(a.astype(float), ((0, 2), (0, 2), (0, 0)), mode="edge")
    expected = padded.reshape(3, 3, 4, 3, 3).mean(axis=(1, 3))
    assert np.abs(out.astype(float) - expected).max() <= 0.5
    np.testing.assert_array_equal(block_mean(a, 1), a)


@pytest.mark.parametrize("w, h, max_side", [(1000, 800, 100), (99, 40, 100), (100, 100, 100), (101, 5, 100), (7, 3, 1)])
def test_thumbnail_factor_is_the_smallest_that_fits(w, h, max_side):
    f = thumbnail_factor(w, h, max_side)
    assert -(-max(w, h) // f) <= max_side
    assert f == 1 or -(-max(w, h) // (f - 1)) > max_side


def test_region_pads_outside_the_slide_with_white():
    arr = gradient()
    slide = ArraySlide(arr)
    region = np.asarray(slide.region(-5, -3, 10, 8))
    assert region.shape == (11, 15, 3)
    assert (region[:3] == 255).all() and (region[:, :5] == 255).all()
    np.testing.assert_array_equal(region[3:, 5:], arr[:8, :10])


def test_thumbnail_of_a_slide_is_its_block_mean_within_max_side():
    arr = gradient(90, 120)
    thumb, scale = slide_thumbnail(ArraySlide(arr), max_side=50)
    f = thumbnail_factor(120, 90, 50)
    assert scale == 1 / f and max(thumb.shape[:2]) <= 50
    np.testing.assert_array_equal(thumb, block_mean(arr, f))


def test_read_square_inside_the_slide_at_full_size_is_the_pixels_themselves():
    arr = gradient()
    patch, padded = read_square(ArraySlide(arr), 40.0, 30.0, 20, 20)
    assert not padded
    np.testing.assert_array_equal(patch, arr[20:40, 30:50])
    small, _ = read_square(ArraySlide(arr), 40.0, 30.0, 20, 10)
    assert small.shape == (10, 10, 3)
    assert np.abs(small.astype(float).mean((0, 1)) - arr[20:40, 30:50].mean((0, 1))).max() < 3


def test_read_square_reaching_outside_is_flagged_padded_and_white_there():
    patch, padded = read_square(ArraySlide(gradient()), 2.0, 2.0, 20, 20)
    assert padded
    assert (patch[:5, :5] >= 250).all()


def test_open_slide_takes_the_given_scale_and_refuses_a_missing_or_bad_one(tmp_path):
    path = tmp_path / "slide.png"
    Image.fromarray(gradient()).save(path)
    with open_slide(path, um_per_px=0.5) as slide:
        assert (slide.width, slide.height, slide.um_per_px, slide.um_per_px_source) == (120, 90, 0.5, "given")
        np.testing.assert_array_equal(np.asarray(slide.region(0, 0, 120, 90)), gradient())
    with pytest.raises(SlideError, match="does not record its scale.*--um-per-px"):
        open_slide(path)
    with pytest.raises(SlideError, match="--um-per-px must be a positive number"):
        open_slide(path, um_per_px=-1)


def test_find_slides_lists_slide_files_of_folders_once_and_names_what_is_missing(tmp_path):
    (tmp_path / "b.tif").write_bytes(b"x")
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    found = find_slides([tmp_path, tmp_path / "a.svs"])
    assert found == [tmp_path / "a.svs", tmp_path / "b.tif"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideError, match="holds no slide file"):
        find_slides([tmp_path / "empty"])
    with pytest.raises(SlideError, match="does not exist"):
        find_slides([tmp_path / "absent.tif"])
