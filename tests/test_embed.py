"""embed: backbone loading (local weights, shared MobileNetV2), cache keying, resume, TTA, alignment."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
from conftest import MOBILENET_WEIGHTS, REPO, TINY_BACKBONE, needs_shared, write_challenge_dataset
from PIL import Image

from hexpr.embedder.backbones import BackboneError, create_backbone, parse_backbone, resolve_specs
from hexpr.embedder.cache import read_attrs, read_cache
from hexpr.embedder.datasets import DatasetError, open_dataset
from hexpr.embedder.extract import embed_dataset
from hexpr.embedder.features import ensure_features

TINY = parse_backbone(TINY_BACKBONE)


def _embed(csv, cache, spec=TINY, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    return ensure_features(open_dataset(csv), [spec], cache, **kw)


def test_features_shape_attrs_and_random_init_recorded(tiny_csv, tmp_path):
    with pytest.warns(UserWarning, match="randomly initialised"):
        fs = _embed(tiny_csv, tmp_path / "cache")
    assert fs.X.shape == (12, 512) and fs.X.dtype == np.float32
    attrs = read_attrs(fs.blocks[0]["path"])
    assert attrs["model_name"] == "resnet18"
    assert attrs["pretrained"] == False  # noqa: E712 - numpy bool from HDF5
    assert "random-init" in attrs["weights_source"]
    for key in ("preprocess", "library_versions", "created", "dataset_fingerprint", "tta"):
        assert attrs[key]


def test_same_inputs_reuse_cache_and_changes_give_new_key(tiny_csv, tmp_path):
    cache = tmp_path / "cache"
    first = _embed(tiny_csv, cache).blocks[0]["path"]
    mtime = os.path.getmtime(first)
    assert _embed(tiny_csv, cache).blocks[0]["path"] == first
    assert os.path.getmtime(first) == mtime  # not recomputed
    other_spec = parse_backbone("resnet18:weights=none,size=48")
    assert _embed(tiny_csv, cache, other_spec).blocks[0]["path"] != first
    assert _embed(tiny_csv, cache, tta=True).blocks[0]["path"] != first
    precisions = {_embed(tiny_csv, cache, precision=p).blocks[0]["path"] for p in ("fp32", "bf16")}
    assert len(precisions) == 2
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tiny_csv.parent / "img" / "spot3.png")
    assert _embed(tiny_csv, cache).blocks[0]["path"] != first


def test_rows_are_aligned_by_id(tiny_csv, tmp_path):
    import pandas as pd

    fs = _embed(tiny_csv, tmp_path / "cache")
    frame = pd.read_csv(tiny_csv).iloc[::-1]
    frame.to_csv(tiny_csv, index=False)  # same images, reversed rows -> same cache, reordered rows
    fs2 = _embed(tiny_csv, tmp_path / "cache")
    assert fs2.blocks[0]["path"] == fs.blocks[0]["path"]
    np.testing.assert_array_equal(fs2.X, fs.X[::-1])


def test_interrupted_run_resumes_to_identical_features(tmp_path):
    csv = write_challenge_dataset(tmp_path / "d", n=20)
    ds = open_dataset(csv)
    partial = embed_dataset(ds, [TINY], tmp_path / "c1", chunk_size=4, batch_size=3, max_chunks=2, progress=False, num_workers=0)
    assert not partial[0].exists() and len(list(partial[0].partial_dir.glob("chunk_*.npy"))) == 2
    resumed = _embed(csv, tmp_path / "c1", chunk_size=4, batch_size=3)
    fresh = _embed(csv, tmp_path / "c2", chunk_size=4, batch_size=3)
    np.testing.assert_array_equal(resumed.X, fresh.X)
    assert not partial[0].partial_dir.exists()


@pytest.mark.slow
def test_kill_9_then_rerun_gives_identical_cache(tmp_path):
    csv = write_challenge_dataset(tmp_path / "d", n=160, size=64)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hexpr", "embed", str(csv), "-b", TINY_BACKBONE, "--chunk-size", "8",
           "--batch-size", "4", "--workers", "0", "--quiet", "--cache-dir"]
    proc = subprocess.Popen(cmd + [str(tmp_path / "c1")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial_root = tmp_path / "c1" / "embeddings" / ".partial"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial_root.glob("*/chunk_*.npy"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "c1" / "embeddings").glob("*.h5")), "killed run must leave no finished cache file"
    n_done = len(list(partial_root.glob("*/chunk_*.npy")))
    assert 2 <= n_done < 20
    subprocess.run(cmd + [str(tmp_path / "c1")], env=env, check=True, capture_output=True)
    subprocess.run(cmd + [str(tmp_path / "c2")], env=env, check=True, capture_output=True)
    (a,), (b,) = [list((tmp_path / c / "embeddings").glob("*.h5")) for c in ("c1", "c2")]
    ids_a, feats_a, _ = read_cache(a)
    ids_b, feats_b, _ = read_cache(b)
    assert ids_a == ids_b
    np.testing.assert_array_equal(feats_a, feats_b)


def test_local_weights_file_gives_in_memory_model_features(tiny_csv, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(123)  # weights differ from the random-init seed
    model = timm.create_model("resnet18", num_classes=0).eval()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    ds = open_dataset(tiny_csv)
    batch = torch.stack([torch.from_numpy(ds.read_image(i)).permute(2, 0, 1) for i in range(len(ds))])
    for weights in ("w.safetensors", "w.pth"):
        spec = parse_backbone(f"resnet18:weights={tmp_path / weights},size=64")
        loaded = create_backbone(spec)
        x = loaded.preprocess.normalize(torch.stack([loaded.preprocess.resize_uint8(ds.read_image(i)) for i in range(len(ds))]))
        with torch.no_grad():
            expected = model(x).numpy()
        fs = _embed(tiny_csv, tmp_path / "cache", spec, precision="fp32")
        np.testing.assert_allclose(fs.X, expected, rtol=1e-4, atol=1e-5)
    assert batch.shape[0] == 12


def test_mismatched_weights_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet34", num_classes=0).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(BackboneError, match="do not (fit|match)"):
        create_backbone(parse_backbone(f"resnet18:weights={tmp_path / 'w.safetensors'}"))
    with pytest.raises(BackboneError, match="not found"):
        create_backbone(parse_backbone("resnet18:weights=/no/such/file.safetensors"))


def test_offline_pretrained_fails_fast_with_fixes():
    start = time.time()
    with pytest.raises(BackboneError, match=r"(?s)resnet18.*weights=/path/to/weights.safetensors.*--no-pretrained"):
        create_backbone(parse_backbone("resnet18"))
    assert time.time() - start < 20


def test_unknown_model_name():
    with pytest.raises(BackboneError, match="not a timm model"):
        create_backbone(parse_backbone("no_such_model_xyz:weights=none"))


@pytest.mark.slow
@needs_shared
def test_shared_mobilenetv2_loads_offline_with_documented_options(tiny_csv, tmp_path):
    spec = parse_backbone(f"mobilenetv2_100:weights={MOBILENET_WEIGHTS},pad_type=same,mean=0.5/0.5/0.5,std=0.5/0.5/0.5")
    fs = _embed(tiny_csv, tmp_path / "cache", spec)
    assert fs.X.shape == (12, 1280)
    attrs = read_attrs(fs.blocks[0]["path"])
    assert attrs["weights_sha256"] and attrs["pretrained"]
    # the pretrained classifier (dropped for features) still classifies through timm as the README shows
    model = timm.create_model("mobilenetv2_100", pad_type="same")
    timm.models.load_checkpoint(model, str(MOBILENET_WEIGHTS), strict=True)
    backbone = create_backbone(spec).model
    for name, tensor in backbone.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name])


def test_tta_features_are_rotation_invariant(tmp_path):
    csv = write_challenge_dataset(tmp_path / "a", n=4, size=32)
    ds = open_dataset(csv)
    for i in range(4):
        path = tmp_path / "a" / "img" / f"spot{i}.png"
        rotated = np.rot90(ds.read_image(i)).copy()
        (tmp_path / "b" / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rotated).save(tmp_path / "b" / "img" / path.name)
    (tmp_path / "b" / "data.csv").write_text(csv.read_text())
    spec = parse_backbone("resnet18:weights=none,size=32")
    a = _embed(csv, tmp_path / "cache", spec, tta=True, precision="fp32").X
    b = _embed(tmp_path / "b" / "data.csv", tmp_path / "cache", spec, tta=True, precision="fp32").X
    plain_a = _embed(csv, tmp_path / "cache", spec, precision="fp32").X
    plain_b = _embed(tmp_path / "b" / "data.csv", tmp_path / "cache", spec, precision="fp32").X
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.abs(plain_a - plain_b).max() > 1e-3  # without TTA rotation changes features


def test_unreadable_image_reported_with_file_and_no_cache(tiny_csv, tmp_path):
    (tiny_csv.parent / "img" / "spot5.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"spot5\.png"):
        _embed(tiny_csv, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "embeddings").glob("*.h5"))


def test_bf16_precision_is_recorded_and_close_to_fp32(tiny_csv, tmp_path):
    fp32 = _embed(tiny_csv, tmp_path / "a", precision="fp32")
    bf16 = _embed(tiny_csv, tmp_path / "b", precision="bf16")
    assert read_attrs(fp32.blocks[0]["path"])["precision"] == "fp32"
    assert read_attrs(bf16.blocks[0]["path"])["precision"] == "bf16-autocast"
    cosine = (fp32.X * bf16.X).sum(1) / np.linalg.norm(fp32.X, axis=1) / np.linalg.norm(bf16.X, axis=1)
    assert cosine.min() > 0.99 and not np.array_equal(fp32.X, bf16.X)


def test_default_backbones_and_no_pretrained():
    specs = resolve_specs(None, None, no_pretrained=True)
    assert [s.name for s in specs] == ["efficientnet_b1", "vit_small_patch16_224.augreg_in1k"]
    assert all(s.weights == "none" for s in specs)
    spec = parse_backbone("hf-hub:MahmoodLab/UNI:weights=none,init_values=1e-5,dynamic_img_size=true")
    assert spec.name == "hf-hub:MahmoodLab/UNI" and spec.model_kwargs == {"init_values": 1e-5, "dynamic_img_size": True}


def _two_embeds_at_once(tmp_path, n=96):
    """Start two `embed` processes on the same data and cache at the same moment; their results."""
    csv = write_challenge_dataset(tmp_path / "d", n=n, size=64)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hexpr", "embed", str(csv), "-b", TINY_BACKBONE, "--chunk-size", "8",
           "--batch-size", "4", "--workers", "0", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    return [(p.wait(timeout=300), p.stdout.read()) for p in procs]


@pytest.mark.slow
def test_two_embeds_of_the_same_data_at_once_both_succeed(tmp_path):
    results = _two_embeds_at_once(tmp_path)
    assert [code for code, _ in results] == [0, 0], results
    (cache_file,) = (tmp_path / "cache" / "embeddings").glob("*.h5")
    ids, features, _ = read_cache(cache_file)
    assert len(ids) == 96 and np.isfinite(features).all()
    # both report the features; nothing unfinished or temporary is left
    assert all("embeddings of" in out and "Traceback" not in out for _, out in results)
    assert not list((tmp_path / "cache").rglob("*.tmp")) and not list((tmp_path / "cache").rglob("chunk_*"))
    fresh = _embed(tmp_path / "d" / "data.csv", tmp_path / "fresh", chunk_size=8, batch_size=4)
    np.testing.assert_array_equal(features, fresh.X)


def test_unfinished_embeddings_are_reported_and_clean_cache_removes_them(tmp_path):
    from typer.testing import CliRunner

    from hexpr.pipeline import app

    csv = write_challenge_dataset(tmp_path / "d", n=20)
    cache = tmp_path / "cache"
    other = parse_backbone("resnet18:weights=none,size=48")
    (stopped,) = embed_dataset(open_dataset(csv), [other], cache, chunk_size=4, batch_size=4, max_chunks=1,
                               progress=False, num_workers=0)
    assert stopped.partial_dir.is_dir() and not stopped.exists()
    with pytest.warns(UserWarning, match=r"1 unfinished embedding folder\(s\).*hexpr clean-cache"):
        _embed(csv, cache)  # another backbone: the left-over folder is reported, and kept
    assert stopped.partial_dir.is_dir()
    r = CliRunner().invoke(app, ["clean-cache", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and "1 unfinished embedding folder(s) removed" in r.output
    assert not (cache / "embeddings" / ".partial").exists() or not any((cache / "embeddings" / ".partial").iterdir())
    assert len(list((cache / "embeddings").glob("*.h5"))) == 1  # the finished cache file stays


def test_a_failed_embed_says_where_its_finished_chunks_are(tiny_csv, tmp_path):
    (tiny_csv.parent / "img" / "spot9.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"kept in .*\.partial.*rerun the same command to resume"):
        with pytest.raises(DatasetError, match=r"spot9\.png"):
            _embed(tiny_csv, tmp_path / "cache", chunk_size=4, batch_size=4)


def test_an_embed_that_fails_before_any_chunk_leaves_no_partial_folder(tiny_csv, tmp_path):
    import warnings

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a weights file")  # found, but fails when the model is built
    missing = parse_backbone(f"resnet18:weights={broken},size=48")
    cache = tmp_path / "cache"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BackboneError):
            _embed(tiny_csv, cache, spec=missing)
    assert not any("kept in" in str(w.message) for w in caught)
    partial = cache / "embeddings" / ".partial"
    assert not [p for p in partial.glob("*") if p.is_dir()]  # nothing to resume: no folder to report later
