"""Foundation-model presets: every preset builds as its card says, loads card-built weights, fails fast offline."""
import json
import time
import warnings

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from hexpr.embedder.backbones import (BackboneError, BackboneSpec, build_architecture, create_backbone, parse_backbone,
                                resolve_specs)
from hexpr.embedder.presets import PRESETS, get_preset, markdown_table, preset_rows

EXPANDING = [p for p in PRESETS if not p.is_plain_timm_name]
SHALLOW = {"timm": "depth=2", "transformers": "num_hidden_layers=2", "conch": "depth=2"}


def _random(spec_text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_backbone(parse_backbone(spec_text))


@pytest.mark.parametrize("preset", EXPANDING, ids=lambda p: p.name)
def test_preset_builds_shallow_with_declared_width_and_card_transform(preset):
    if preset.backend == "transformers":
        pytest.importorskip("transformers")
    backbone = _random(f"{preset.name}:weights=none,{SHALLOW[preset.backend]}")
    with torch.no_grad():
        out = backbone.model(torch.rand(2, 3, preset.size, preset.size))
    assert out.shape == (2, preset.dim) and backbone.num_features == preset.dim
    pre = backbone.preprocess
    assert (pre.height, pre.width) == (preset.size, preset.size)
    assert pre.mean == preset.mean and pre.std == preset.std and pre.interpolation == preset.interpolation
    assert backbone.spec.label == preset.name


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.params], ids=lambda p: p.name)
def test_full_size_parameter_count_matches_the_published_count(preset):
    if preset.backend == "transformers":
        pytest.importorskip("transformers")
    spec = parse_backbone(f"{preset.name}:weights=none")
    with torch.device("meta"):
        if preset.params_with_head:  # published with the ImageNet classifier
            model = timm.create_model(preset.architecture, pretrained=False)
        else:
            model = build_architecture(spec)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - preset.params_count) <= preset.params_tolerance, (count, preset.params)


def _card_uni(depth):
    return timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                             dynamic_img_size=True, depth=depth)


def _card_virchow2(depth):
    return timm.create_model("vit_huge_patch14_224", img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                             mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, depth=depth,
                             mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)


def _virchow2_embedding(output):  # the card's recipe: CLS + mean of patch tokens after the 4 registers
    return torch.cat([output[:, 0], output[:, 5:].mean(1)], dim=-1)


@pytest.mark.parametrize("name,card,embedding", [
    ("uni", _card_uni, lambda out: out),
    ("virchow2", _card_virchow2, _virchow2_embedding),
])
def test_weights_saved_from_the_card_construction_load_exactly(tmp_path, name, card, embedding):
    torch.manual_seed(7)
    reference = card(2).eval()
    path = tmp_path / f"{name}.safetensors"
    save_file(reference.state_dict(), str(path))
    backbone = create_backbone(parse_backbone(f"{name}:weights={path},depth=2"))
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = embedding(reference(x))
        got = backbone.model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert backbone.weights_sha256 and backbone.weights_source.startswith("file:")


def test_pytorch_bin_checkpoint_with_state_dict_wrapper_loads(tmp_path):
    torch.manual_seed(1)
    reference = _card_uni(1).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, tmp_path / "pytorch_model.bin")
    backbone = create_backbone(parse_backbone(f"uni:weights={tmp_path},depth=1"))  # a folder as --local-dir leaves it
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_weights_of_another_architecture_are_refused_with_the_tensor_names(tmp_path):
    save_file(_card_uni(1).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(BackboneError, match=r"do not match.*missing"):
        create_backbone(parse_backbone(f"uni:weights={tmp_path / 'w.safetensors'},depth=2"))


def _snapshot(hf_home, repo, files):
    snap = hf_home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    for name, write in files.items():
        write(snap / name)
    return snap


def test_transformers_snapshot_in_the_hub_cache_is_found_offline(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, patch_size=16,
                                       image_size=224, layer_norm_eps=1e-6)
    torch.manual_seed(3)
    reference = transformers.Dinov2Model(config).eval()
    _snapshot(tmp_path, "owkin/phikon-v2", {
        "model.safetensors": lambda p: save_file(reference.state_dict(), str(p)),
        "config.json": lambda p: p.write_text(config.to_json_string()),
    })
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    rows = {r["name"]: r for r in preset_rows()}
    assert rows["phikon-v2"]["weights_local"].endswith("model.safetensors") and not rows["uni"]["weights_local"]
    backbone = create_backbone(parse_backbone("phikon-v2"))  # num_hidden_layers=2 comes from the snapshot's config
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(backbone.model(x), expected, rtol=1e-5, atol=1e-5)


def test_conch_checkpoint_uses_the_image_tower_and_ignores_the_text_tower(tmp_path):
    torch.manual_seed(5)
    encoder = build_architecture(parse_backbone("conch:weights=none,depth=1")).eval()
    state = {"visual." + k: v for k, v in encoder.state_dict().items()}
    state.update({"text.token_embedding.weight": torch.zeros(4, 8), "logit_scale": torch.ones(()),
                  "visual.proj_contrast": torch.zeros(512, 512), "visual.attn_pool_caption.query": torch.zeros(2, 768)})
    torch.save(state, tmp_path / "pytorch_model.bin")
    backbone = create_backbone(parse_backbone(f"conch:weights={tmp_path / 'pytorch_model.bin'},depth=1"))
    x = torch.rand(1, 3, 448, 448)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(x), encoder(x))


def test_offline_without_weights_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(BackboneError) as info:
        create_backbone(parse_backbone("uni2-h"))
    assert time.perf_counter() - started < 2.0
    message = str(info.value)
    for needed in ("MahmoodLab/UNI2-h", "request access", str(tmp_path / "hub"), "weights=", "huggingface-cli download"):
        assert needed in message


def test_overrides_and_pooling_options():
    spec = parse_backbone("virchow2:weights=none,pool=cls,size=256")
    assert spec.pool == "cls" and spec.size == 256 and spec.model_kwargs["mlp_layer"] == "SwiGLUPacked"
    assert parse_backbone("uni").identity()["weights"] == "hub:MahmoodLab/UNI"
    with pytest.raises(BackboneError, match="pool"):
        parse_backbone("uni:pool=max")
    # raw timm spec: class-valued kwargs by name, and pooling of the token output
    backbone = _random("vit_small_patch14_reg4_dinov2:weights=none,depth=1,img_size=56,global_pool=,pool=mean,"
                       "mlp_layer=SwiGLUPacked,act_layer=SiLU")
    tokens = backbone.model.model.forward_features(torch.rand(1, 3, 56, 56))
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(torch.rand(1, 3, 56, 56)).shape, torch.Size([1, 384]))
    assert tokens.shape[1] == 5 + 16 and backbone.num_features == 384
    with pytest.raises(BackboneError, match=r"global_pool=''.*pool=cls"):
        _random("vit_small_patch16_224:weights=none,depth=1,global_pool=")
    with pytest.raises(BackboneError, match="no class of that name"):
        _random("vit_small_patch16_224:weights=none,depth=1,mlp_layer=NoSuchLayer")


def test_plain_specs_keep_their_fields_and_cache_keys():
    spec = resolve_specs()[0]
    assert spec.name == "efficientnet_b1" and spec.preset is None
    assert set(spec.to_dict()) == {"name", "weights", "model_kwargs", "mean", "std", "size", "interpolation", "crop_pct"}
    assert BackboneSpec.from_dict(json.loads(parse_backbone("uni:weights=none").to_json())) == parse_backbone("uni:weights=none")


def test_readme_table_is_generated_from_the_presets():
    table = markdown_table()
    assert all(f"`{p.name}`" in table for p in PRESETS)
    page = (__import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "guides" / "foundation-models.md").read_text()
    assert table in page, "the preset table in docs/guides/foundation-models.md is stale: regenerate it with markdown_table()"


def test_presets_table_is_consistent():
    assert len({p.name for p in PRESETS}) == len(PRESETS)
    for p in PRESETS:
        assert p.backend in ("timm", "transformers", "conch") and len(p.mean) == len(p.std) == 3
        assert p.pool in (None, "cls", "mean", "cls+mean") and p.source.startswith("https://")
        assert get_preset(p.name.upper()) is p
    assert np.all([p.hub_repo for p in EXPANDING])


@pytest.mark.slow  # ~40 s on the shared 2-core CPU
def test_hexpr_embed_with_a_preset_and_a_local_file_gives_the_card_models_features(tmp_path):
    import h5py
    import pandas as pd
    from PIL import Image
    from typer.testing import CliRunner

    from hexpr.embedder.demo_data import write_demo_dataset
    from hexpr.pipeline import app

    paths = write_demo_dataset(tmp_path / "demo", n_train=4, n_test=2, n_genes=3, size=224)
    torch.manual_seed(11)
    reference = _card_virchow2(2).eval()
    weights = tmp_path / "virchow2.safetensors"
    save_file(reference.state_dict(), str(weights))
    result = CliRunner().invoke(app, ["embed", str(paths["train_csv"]), "-b", f"virchow2:weights={weights},depth=2",
                                      "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32", "--workers", "0",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    (cache_file,) = (tmp_path / "cache" / "embeddings").glob("*virchow2*.h5")
    with h5py.File(cache_file) as f:
        ids = [i.decode() if isinstance(i, bytes) else i for i in f["ids"][:]]
        features = f["features"][:]
    table = pd.read_csv(paths["train_csv"]).set_index("ID")
    images = np.stack([np.asarray(Image.open(paths["root"] / table.loc[i, "path"]).convert("RGB")) for i in ids])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # card: ToTensor + Normalize(ImageNet)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = _virchow2_embedding(reference(x)).numpy()
    assert features.shape == (4, 2560)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_presets_train_end_to_end_with_layerwise_ids():
    from hexpr.heads.finetune_model import build_backbones, layer_ids

    (backbone,) = build_backbones([parse_backbone("virchow2:weights=none,depth=1")], torch.device("cpu"), random_init=True)
    model = backbone.model.train()
    loss = model(torch.rand(2, 3, 224, 224)).square().mean()
    loss.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert named and all(p.grad is not None for n, p in named if ".blocks." in n)
    ids, top = layer_ids([n for n, _ in named])
    assert top >= 2  # stem, block, final norm: distinct depth ids under the pooling wrapper


def test_missing_transformers_extra_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(BackboneError, match=r"pip install 'hexpr\[transformers\]'"):
        _random("phikon:weights=none,num_hidden_layers=1")


def test_backbones_command_lists_every_preset_and_finds_local_weights(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hexpr.embedder.presets import PRESETS
    from hexpr.pipeline import app

    snap = _snapshot(tmp_path, "MahmoodLab/UNI", {"pytorch_model.bin": lambda p: p.write_bytes(b"not read by the listing")})
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    runner = CliRunner()
    listed = runner.invoke(app, ["backbones"])          # (CliRunner's stdout is a pipe: tab-separated rows)
    assert listed.exit_code == 0, listed.output
    rows = [line.split("\t") for line in listed.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == [preset.name for preset in PRESETS]
    local = runner.invoke(app, ["backbones", "--local"])
    assert local.exit_code == 0, local.output
    rows = [line.split("\t") for line in local.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["uni"] and rows[0][-1] == str(snap / "pytorch_model.bin")
