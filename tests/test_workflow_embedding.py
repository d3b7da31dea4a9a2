"""workflow/embedding.py: embed a dataset into the cache once, and clean what interrupted runs left."""
import os

import numpy as np
from conftest import TINY_BACKBONE

from hexpr.embedder.backbones import parse_backbone
from hexpr.embedder.cache import CacheEntry
from hexpr.embedder.datasets import open_dataset
from hexpr.workflow.embedding import backbone_specs, clean_cache, embed


def test_embed_caches_once_and_rows_follow_the_dataset(tiny_csv, tmp_path):
    spec = parse_backbone(TINY_BACKBONE)
    first = embed(tiny_csv, [spec], tmp_path / "cache", progress=False, num_workers=0)
    assert first.ids == open_dataset(tiny_csv).ids and first.X.shape[0] == 12
    path = first.blocks[0]["path"]
    mtime = os.path.getmtime(path)
    again = embed(tiny_csv, [spec], tmp_path / "cache", progress=False, num_workers=0)
    assert again.blocks[0]["path"] == path and os.path.getmtime(path) == mtime
    assert (again.X == first.X).all()


def test_clean_cache_removes_unfinished_folders_and_keeps_finished_files(tiny_csv, tmp_path):
    spec = parse_backbone(TINY_BACKBONE)
    done = embed(tiny_csv, [spec], tmp_path / "cache", progress=False, num_workers=0).blocks[0]["path"]
    partial = CacheEntry(tmp_path / "cache", "other", spec, "0" * 32)      # an interrupted run: one chunk of three
    partial.start(n_rows=12, chunk_size=4, batch_size=4)
    partial.write_chunk(0, np.zeros((4, 8), np.float32))
    assert partial.partial_dir.is_dir()
    removed = clean_cache(tmp_path / "cache")
    assert len(removed) == 1 and not partial.partial_dir.exists()
    assert os.path.isfile(done)
    assert clean_cache(tmp_path / "cache") == []


def test_backbone_specs_no_pretrained_switches_only_specs_that_do_not_name_their_weights(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    texts = ["resnet18:size=64", f"resnet34:weights={weights}"]
    assert [s.is_random_init for s in backbone_specs(texts, None, no_pretrained=True)] == [True, False]
    assert [s.weights for s in backbone_specs(texts, None)] == ["pretrained", str(weights)]
