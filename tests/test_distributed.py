"""Distributed embed: torchrun with 2 CPU processes (gloo) gives the single-process cache exactly."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TINY_BACKBONE, write_challenge_dataset

from hexpr.embedder.cache import read_cache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embed_cmd(csv, cache):
    return ["embed", str(csv), "-b", TINY_BACKBONE, "--chunk-size", "4", "--batch-size", "3", "--workers", "0",
            "--quiet", "--cache-dir", str(cache)]


@pytest.mark.slow
def test_two_gloo_ranks_equal_single_process(tmp_path):
    csv = write_challenge_dataset(tmp_path / "d", n=22)  # 6 chunks, the last one short
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "hexpr", *_embed_cmd(csv, tmp_path / "single")],
                   env=env, check=True, capture_output=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(_free_port()), "-m", "hexpr", *_embed_cmd(csv, tmp_path / "multi")]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (single,), (multi,) = [list((tmp_path / c / "embeddings").glob("*.h5")) for c in ("single", "multi")]
    assert single.name == multi.name  # same key, same file layout
    ids_s, feats_s, attrs_s = read_cache(single)
    ids_m, feats_m, attrs_m = read_cache(multi)
    assert ids_s == ids_m
    np.testing.assert_array_equal(feats_s, feats_m)
    assert attrs_m["world_size"] == 2 and attrs_s["world_size"] == 1
    assert not (tmp_path / "multi" / "embeddings" / ".partial").exists() or not any((tmp_path / "multi" / "embeddings" / ".partial").iterdir())


def test_rerun_after_a_rank_died_recomputes_only_missing_chunks(tmp_path):
    from hexpr.embedder.backbones import parse_backbone
    from hexpr.embedder.datasets import open_dataset
    from hexpr.embedder.extract import embed_dataset

    csv = write_challenge_dataset(tmp_path / "d", n=16)
    ds = open_dataset(csv)
    spec = parse_backbone(TINY_BACKBONE)
    # simulate rank 1 of 2 dying: only rank 0's chunks (0 and 2) are on disk
    entry = embed_dataset(ds, [spec], tmp_path / "c", chunk_size=4, batch_size=3, max_chunks=0, progress=False, num_workers=0)[0]
    full = embed_dataset(ds, [spec], tmp_path / "ref", chunk_size=4, batch_size=3, progress=False, num_workers=0)[0]
    _, reference, _ = read_cache(full.path)
    for c in (0, 2):
        entry.write_chunk(c, reference[c * 4:(c + 1) * 4])
    computed = []
    original = entry.write_chunk.__func__

    def spy(self, index, features):
        computed.append(index)
        return original(self, index, features)

    from hexpr.embedder import cache as cache_module
    cache_module.CacheEntry.write_chunk = spy
    try:
        embed_dataset(ds, [spec], tmp_path / "c", chunk_size=4, batch_size=3, progress=False, num_workers=0)
    finally:
        cache_module.CacheEntry.write_chunk = original
    assert sorted(computed) == [1, 3]
    _, resumed, _ = read_cache(entry.path)
    np.testing.assert_array_equal(resumed, reference)
