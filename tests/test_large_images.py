"""Pillow's decompression-bomb guard, replaced deliberately: a JPEG/PNG slide up to hexpr's bound opens with
one calm note (no "DOS attack" warning); far above it, a bomb is one clear SlideError."""
import warnings

import numpy as np
import pytest
from PIL import Image

import hexpr.embedder.slides as slides
from hexpr import pipeline
from hexpr.embedder.slides import LargeImageNote, SlideError, open_slide


@pytest.fixture
def small_bounds(monkeypatch):
    """Bounds scaled down 100x so that a 1000 x 800 image plays a 92 Mpx section."""
    monkeypatch.setattr(slides, "PILLOW_WARNING_PIXELS", 700 * 700)
    monkeypatch.setattr(slides, "MAX_WHOLE_DECODE_PIXELS", 1000 * 1000)


def test_a_large_section_within_the_bound_opens_with_one_note_and_no_pillow_warning(tmp_path, small_bounds):
    Image.fromarray(np.full((800, 1000, 3), 200, np.uint8)).save(tmp_path / "section.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_slide(tmp_path / "section.jpg", 0.5) as slide:
            assert np.asarray(slide.region(0, 0, 10, 10)).shape == (10, 10, 3)      # decoded whole
    kinds = [w.category for w in caught]
    assert kinds == [LargeImageNote], [str(w.message) for w in caught]
    assert "up to 1 Mpx" in str(caught[0].message)


def test_a_bomb_far_above_the_bound_is_one_clear_error(tmp_path, monkeypatch):
    Image.fromarray(np.full((800, 1000, 3), 200, np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(slides, "MAX_WHOLE_DECODE_PIXELS", 100 * 100)       # the image is 80x the bound
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SlideError, match=r"bomb\.png: 1,000 x 800 px PNG .*above hexpr's bound.*decompression bomb"):
            open_slide(tmp_path / "bomb.png", 0.5)
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []


def test_the_cli_prints_each_warning_once_and_notes_calmly(capsys):
    @pipeline._friendly_errors
    def command():
        for _ in range(3):
            with warnings.catch_warnings():     # (resets Python's own "once" memory)
                pass
            warnings.warn("JPEG/PNG slides are decoded whole", LargeImageNote)
        warnings.warn("a real problem", UserWarning)
    command()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["Note: JPEG/PNG slides are decoded whole", "Warning: a real problem"]
