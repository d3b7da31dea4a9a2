"""Intermediate stages as features (a backbone spec's ``stages=``): parsing, the features themselves,
the cache key, the CLI from fit-head to predict, and the refusals."""
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_challenge_dataset
from typer.testing import CliRunner

from hexpr.embedder.backbones import BackboneError, BackboneSpec, create_backbone, parse_backbone
from hexpr.pipeline import app

SMALL = "resnet18:weights=none,size=32"


def loaded(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_backbone(parse_backbone(text))


def test_stages_parse_sorted_and_round_trip():
    spec = parse_backbone(SMALL + ",stages=3/1")
    assert spec.stages == (1, 3)
    assert spec.model_kwargs == {}                       # not passed on to timm.create_model
    assert BackboneSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["stages"] == [1, 3]


def test_spec_without_stages_keeps_its_old_cache_key():
    plain = parse_backbone(SMALL)
    assert "stages" not in plain.to_json()
    assert parse_backbone(SMALL + ",stages=").to_json() == plain.to_json()
    assert parse_backbone(SMALL + ",stages=2").to_json() != plain.to_json()


@pytest.mark.parametrize("value", ["a/b", "-1", "2/2", "1.5"])
def test_bad_stage_lists_are_refused(value):
    with pytest.raises(BackboneError, match="stages"):
        parse_backbone(f"{SMALL},stages={value}")


def test_stage_features_follow_the_models_own_and_are_spatial_means():
    plain, staged = loaded(SMALL), loaded(SMALL + ",stages=1/3")
    assert staged.num_features == 512 + 64 + 256          # resnet18: layer1 has 64 channels, layer3 256
    outputs = {}
    inner = staged.model.model
    hooks = [getattr(inner, name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
             for name in ("layer1", "layer3")]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = staged.model(x)
        own = plain.model(x)
    for hook in hooks:
        hook.remove()
    assert features.shape == (3, staged.num_features)
    # the same seeded random weights: the first block is the plain model's output
    np.testing.assert_allclose(features[:, :512].numpy(), own.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features[:, 512:576].numpy(), outputs["layer1"].mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(features[:, 576:].numpy(), outputs["layer3"].mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-6)


def test_a_stage_the_model_lacks_is_named():
    with pytest.raises(BackboneError, match=r"stages 9 do not exist; this model has stages 0 to 4"):
        loaded(SMALL + ",stages=2/9")


def test_stages_with_vit_token_pooling_are_refused():
    with pytest.raises(BackboneError, match="cannot be combined with pool="):
        loaded("vit_tiny_patch16_224:weights=none,img_size=32,pool=cls,stages=1")


def test_fit_head_and_predict_with_stages(tmp_path):
    runner = CliRunner()
    train = write_challenge_dataset(tmp_path / "train", n=24, n_genes=3, groups=2)
    test = write_challenge_dataset(tmp_path / "test", n=6, n_genes=3, with_targets=False, seed=4)
    cache, model = tmp_path / "cache", tmp_path / "model"
    spec = SMALL + ",stages=2/4"
    r = runner.invoke(app, ["fit-head", str(train), "-b", spec, "--folds", "2", "--out", str(model),
                            "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    from hexpr.heads.fitting import load_model

    fitted = load_model(model)
    assert fitted.n_features == 512 + 128 + 512          # resnet18 + layer2 (128) + layer4 (512)
    assert fitted.feature_meta["backbones"][0]["stages"] == [2, 4]
    r = runner.invoke(app, ["predict", str(model), str(test), "--out", str(tmp_path / "pred.csv"),
                            "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0, r.output
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert len(pred) == 6 and np.isfinite(pred.drop(columns="ID").to_numpy()).all()


def test_cli_names_a_missing_stage(tmp_path):
    train = write_challenge_dataset(tmp_path / "train", n=8, n_genes=2)
    r = CliRunner().invoke(app, ["embed", str(train), "-b", SMALL + ",stages=7", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert r.exit_code == 2
    assert "Error:" in r.output and "stages 7 do not exist" in r.output and "Traceback" not in r.output
    assert not list((tmp_path / "cache").rglob("*.h5"))


def test_finetune_trains_through_the_stages_and_predict_rebuilds_them(tmp_path):
    runner = CliRunner()
    train = write_challenge_dataset(tmp_path / "train", n=16, n_genes=3, size=32)
    out = tmp_path / "ft"
    r = runner.invoke(app, ["finetune", str(train), "-b", SMALL + ",stages=1", "--out", str(out), "--epochs", "1",
                            "--batch-size", "8", "--folds", "4", "--workers", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    from hexpr.heads.finetune_model import load_finetuned

    model = load_finetuned(out)
    assert model.specs[0].stages == (1,)
    assert model.widths == [512 + 64]                     # resnet18 + layer1 (64 channels)
    r = runner.invoke(app, ["predict", str(out), str(train), "--out", str(tmp_path / "p.csv"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 16
