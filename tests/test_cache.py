"""embedder/cache.py: cache keys, feature files read back aligned by id."""
import json

import numpy as np
import pytest
from conftest import write_challenge_dataset
from PIL import Image

from hexpr.embedder.backbones import parse_backbone
from hexpr.embedder.cache import CacheError, cache_key, load_aligned, read_cache, write_feature_file
from hexpr.embedder.datasets import open_dataset

SPEC = "resnet18:weights=none,size=64"


def _key(csv, spec=SPEC, tta=False, precision="fp32"):
    return cache_key(open_dataset(csv).fingerprint(), parse_backbone(spec), tta, precision)


def test_cache_key_changes_with_image_bytes_and_not_with_where_the_images_are(tmp_path):
    first = write_challenge_dataset(tmp_path / "a", seed=3)
    copy = write_challenge_dataset(tmp_path / "b", seed=3)        # same pixels, another folder
    assert _key(first) == _key(first) == _key(copy)
    image = tmp_path / "b" / "img" / "spot5.png"
    pixels = np.array(Image.open(image))
    pixels[0, 0] = 255 - pixels[0, 0]                              # one pixel differs
    Image.fromarray(pixels).save(image)
    assert _key(copy) != _key(first)


def test_cache_key_changes_with_the_spec_tta_and_precision_only(tiny_csv):
    base = _key(tiny_csv)
    assert _key(tiny_csv, " resnet18:weights=none,size=64 ") == base       # the same spec written again
    changed = {_key(tiny_csv, "resnet18:weights=none,size=48"), _key(tiny_csv, "resnet34:weights=none,size=64"),
               _key(tiny_csv, SPEC + ",mean=0.5/0.5/0.5,std=0.5/0.5/0.5"),
               _key(tiny_csv, tta=True), _key(tiny_csv, precision="bf16")}
    assert base not in changed and len(changed) == 5


def test_cache_key_follows_the_weights_file_content_not_its_name(tiny_csv, tmp_path):
    one, same, other = tmp_path / "one.pt", tmp_path / "same.pt", tmp_path / "other.pt"
    one.write_bytes(b"weights v1")
    same.write_bytes(b"weights v1")
    other.write_bytes(b"weights v2, longer")
    keys = [_key(tiny_csv, f"resnet18:weights={p},size=64") for p in (one, same, other)]
    # the spec records the path, so different paths give different specs; the content id is compared too
    assert keys[0] != keys[2] and keys[1] != keys[2]
    identities = [parse_backbone(f"resnet18:weights={p}").identity()["weights"] for p in (one, same, other)]
    assert identities[0] == identities[1] != identities[2]


def _cache_file(path, ids, features, name):
    attrs = {"key": name, "backbone": json.dumps({"name": name}), "backbone_identity": json.dumps({"name": name})}
    return write_feature_file(path, ids, features, dtype=np.float32, attrs=attrs)


def test_load_aligned_concatenates_caches_row_by_id(tmp_path):
    ids = [f"s{i}" for i in range(6)]
    a = np.arange(12, dtype=np.float32).reshape(6, 2)
    b = np.arange(18, dtype=np.float32).reshape(6, 3) * 10
    order = [3, 0, 5, 1, 4, 2]
    pa = _cache_file(tmp_path / "a.h5", ids, a, "a")
    pb = _cache_file(tmp_path / "b.h5", [ids[i] for i in order], b[order], "b")   # rows in another order
    wanted = ["s4", "s1", "s0"]
    X, blocks = load_aligned([pa, pb], wanted)
    rows = [4, 1, 0]
    np.testing.assert_array_equal(X, np.hstack([a[rows], b[rows]]))
    assert [(blk["start"], blk["stop"], blk["key"]) for blk in blocks] == [(0, 2, "a"), (2, 5, "b")]
    with pytest.raises(CacheError, match="1 requested ids are not in the cache.*'s9'"):
        load_aligned([pa], ["s0", "s9"])


def test_read_cache_names_a_missing_or_damaged_file(tmp_path):
    with pytest.raises(CacheError, match="not found; run `hexpr embed` first"):
        read_cache(tmp_path / "absent.h5")
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(b"not hdf5 at all")
    with pytest.raises(CacheError, match="damaged.h5 is not a readable hexpr embedding cache"):
        read_cache(damaged)
