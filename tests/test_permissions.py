"""Every output file and folder gets the permissions the umask gives (not tempfile's 0600/0700)."""
import os
import stat

import pytest
from conftest import TINY_BACKBONE, write_challenge_dataset
from typer.testing import CliRunner

from hexpr.pipeline import app


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _wrong_modes(root, umask):
    """Paths under ``root`` (itself included) whose mode is not what open()/mkdir() give under ``umask``."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        if stat.S_IMODE(path.stat().st_mode) != want:
            wrong.append(f"{path.relative_to(root.parent)}: {oct(stat.S_IMODE(path.stat().st_mode))} != {oct(want)}")
    return wrong


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_demo_data_fit_predict_evaluate_outputs_honour_the_umask(tmp_path, umask):
    run("demo-data", tmp_path / "demo", "--n-train", 6, "--n-test", 2, "--n-genes", 3, "--size", 16)
    train = write_challenge_dataset(tmp_path / "train", n=12, n_genes=3)
    model, cache, preds = tmp_path / "model", tmp_path / "cache", tmp_path / "preds"
    run("fit-head", train, "-b", TINY_BACKBONE, "--folds", 2, "--out", model, "--cache-dir", cache, "--quiet")
    run("predict", model, train, "--out", preds / "p.csv", "--cache-dir", cache, "--quiet")
    run("predict", model, train, "--out", preds / "p.h5ad", "--cache-dir", cache, "--quiet")
    run("evaluate", preds / "p.csv", train)
    assert {p.name for p in model.iterdir()} >= {"config.json", "model.safetensors", "model.json", "cv_report.json", "oof_predictions.csv"}
    assert {p.suffix for p in preds.iterdir()} >= {".csv", ".h5ad", ".json"}
    assert list((cache / "embeddings").glob("*.h5"))
    for folder in (tmp_path / "demo", model, cache, preds):
        assert _wrong_modes(folder, umask) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_import_outputs_honour_the_umask(tmp_path, umask):
    from test_importers import make_visium

    from hexpr.embedder.importers import import_dataset

    source = make_visium(tmp_path / "visium")["root"]
    import_dataset(source, tmp_path / "out", target_um_per_px=1.0, progress=False)
    assert list((tmp_path / "out" / "patches").glob("*.h5")) and list((tmp_path / "out" / "st").glob("*.h5ad"))
    assert _wrong_modes(tmp_path / "out", umask) == []
