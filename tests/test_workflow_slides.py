"""workflow/slides.py: the tile scale (options, the model's record, the default) and each rank's share of slides."""
import warnings

import pytest

from hexpr.embedder.errors import HexprError
from hexpr.workflow.slides import rank_share, tile_scale

RECORDED = {"patch": {"patch_um": 112.0, "patch_px": 64, "um_per_px": 1.75}}


def test_rank_share_splits_slides():
    items = list("abcde")
    assert rank_share(items, 0, 2) == ["a", "c", "e"] and rank_share(items, 1, 2) == ["b", "d"]
    assert rank_share(items, 0, 1) == items


def test_rank_share_reads_torchrun_variables_and_every_item_goes_to_one_rank(monkeypatch):
    items = list(range(11))
    monkeypatch.setenv("WORLD_SIZE", "3")
    shares = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        shares.append(rank_share(items))
    assert sorted(x for share in shares for x in share) == items and [len(s) for s in shares] == [4, 4, 3]


def test_tile_scale_from_model_or_default():
    assert tile_scale(RECORDED)["tile_px"] == 64
    with pytest.warns(UserWarning, match="does not record"):
        s = tile_scale({})
    assert (s["tile_um"], s["tile_px"], s["source"]) == (112.0, 224, "default")


def test_tile_scale_from_the_model_without_a_warning_and_options_win():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = tile_scale(RECORDED)
        assert (s["tile_um"], s["tile_um_per_px"], s["source"]) == (112.0, 1.75, "model")
        s = tile_scale(RECORDED, tile_um=100.0)                       # one option, the rest from the model
        assert (s["tile_um"], s["tile_um_per_px"], s["tile_px"], s["source"]) == (100.0, 1.75, round(100 / 1.75), "options")
        s = tile_scale({}, tile_um=50.0, tile_um_per_px=0.5)          # both given: no warning without a record
        assert (s["tile_px"], s["source"]) == (100, "options")


@pytest.mark.parametrize("um, mpp, message", [(-5.0, 0.5, r"-5\.0"), (10.0, 5.0, "only 2 px")])
def test_tile_scale_refuses_sizes_that_make_no_tile(um, mpp, message):
    """A user mistake (a HexprError: one Error: line), naming the value or what it gives."""
    with pytest.raises(HexprError, match=message):
        tile_scale(RECORDED, tile_um=um, tile_um_per_px=mpp)
