"""End-to-end fine-tuning on tiny data: training, resume, export/predict, head initialisation."""
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_challenge_dataset

from hexpr.embedder.augment import augmented_views, plain_views, sample_rng
from hexpr.embedder.backbones import Preprocess, parse_backbone
from hexpr.embedder.datasets import open_dataset
from hexpr.heads.model_files import read_folder
from hexpr.heads.finetune import CHECKPOINT_FILE, FINETUNED_FILE, FinetuneError, finetune, load_finetuned
from hexpr.heads.finetune_model import LRSchedule, layer_ids

# timm's smallest test network, random init: fast enough for several runs on 2 shared cores
SPEC = parse_backbone("test_resnet:weights=none,size=48")
QUICK = dict(batch_size=4, num_workers=0, progress=False, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    # the cores are shared: two spinning intra-op threads are many times slower than one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_challenge_dataset(tmp_path_factory.mktemp("ft") / "data", n=16, n_genes=4, size=48, groups=2)


# ----------------------------------------------------------------------------- pieces


def test_augmentations_are_seeded_and_keep_each_backbone_size():
    image = np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    pre = [Preprocess(48, 48, (0.5,) * 3, (0.5,) * 3, "bilinear", None),
           Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.9)]
    a = augmented_views(image, pre, sample_rng(0, 1, 5))
    b = augmented_views(image, pre, sample_rng(0, 1, 5))
    c = augmented_views(image, pre, sample_rng(0, 2, 5))
    assert [tuple(v.shape) for v in a] == [(3, 48, 48), (3, 32, 32)]
    assert all(v.dtype == torch.uint8 for v in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    plain = plain_views(image, pre)
    assert torch.equal(plain[0], pre[0].resize_uint8(image))
    # mild: the augmented view keeps the image's overall colour
    assert abs(a[0].float().mean() - plain[0].float().mean()) < 25


def test_layer_ids_and_schedule():
    names = ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.1.conv1.weight",
             "layer2.0.conv1.weight", "blocks.0.0.conv.weight", "norm.weight"]
    ids, top = layer_ids(names)
    assert ids[:2] == [0, 0] and ids[2] < ids[3] < ids[4] < ids[5] < ids[6] == top
    schedule = LRSchedule("cosine", total_steps=10, warmup_steps=2, unfreeze_step=4)
    factors = []
    for _ in range(10):
        factors.append((schedule.factor("head"), schedule.factor("backbone")))
        schedule.step_batch()
    assert factors[0][0] == pytest.approx(0.5) and factors[1][0] == pytest.approx(1.0)
    assert factors[3][1] == 0.0 and factors[4][1] == pytest.approx(0.5 * factors[4][0])  # re-warmup at unfreeze
    assert factors[-1][0] < 0.1
    plateau = LRSchedule("plateau", total_steps=10, warmup_steps=0, unfreeze_step=0, plateau_patience=1)
    for score in (0.5, 0.4, 0.45):       # two epochs without improvement: halve
        plateau.step_epoch(score)
    assert plateau.factor("head") == pytest.approx(0.5)
    restored = LRSchedule("plateau", 10, 0, 0)
    restored.load_state_dict(plateau.state_dict())
    assert restored.factor("backbone") == pytest.approx(0.5)
    with pytest.raises(FinetuneError, match="unknown schedule"):
        LRSchedule("linear", 10, 0, 0)


# ----------------------------------------------------------------------------- runs


def test_training_reduces_loss_and_exported_model_predicts(data, tmp_path):
    from hexpr import workflow

    rows = []
    report = finetune(data, [SPEC], tmp_path / "run", epochs=4, val_fold=None, freeze_epochs=1, warmup_epochs=1,
                      lr=1e-3, head_lr=1e-3, dropout=0.0, transform="minmax", on_epoch=rows.append, **QUICK)
    losses = [r["train_loss"] for r in report["history"]]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert losses[-1] < 0.7 * losses[0], losses
    assert {"images_per_s", "eta_s", "stage", "lr_head"} <= set(rows[0])
    assert rows[0]["stage"] == "head" and rows[1]["stage"] == "all"
    assert report["best_epoch"] == 4 and (tmp_path / "run" / FINETUNED_FILE).is_file()

    dataset = open_dataset(data)
    model = load_finetuned(tmp_path / "run")
    assert model.genes == list(dataset.targets.columns) and [s.to_json() for s in model.specs] == [SPEC.to_json()]
    pred = model.predict_dataset(dataset, batch_size=5, num_workers=0, progress=False, device="cpu")
    assert list(pred.index) == dataset.ids and pred.index.name == "ID"
    assert list(pred.columns) == list(dataset.targets.columns)
    # values in the targets' scale (minmax was undone): gene G3 lives around 2, not in [0, 1]
    truth = dataset.targets
    assert abs(pred["G3"].mean() - truth["G3"].mean()) < 0.5 * truth["G3"].std() + 0.3
    assert np.corrcoef(pred.to_numpy().ravel(), truth.to_numpy().ravel())[0, 1] > 0.5

    # `hexpr predict MODEL_DIR DATA` dispatches to the fine-tuned model
    out = workflow.predict(tmp_path / "run", data, out=tmp_path / "pred.csv", cache_dir=tmp_path / "cache",
                           progress=False, num_workers=0, device="cpu")
    written = pd.read_csv(out["out"], index_col="ID")
    np.testing.assert_allclose(written.to_numpy(), pred.to_numpy(), rtol=1e-4, atol=1e-5)


class _Interrupt(Exception):
    pass


def _tensors(obj, prefix=""):
    """Flatten nested dicts/lists to {path: tensor}."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj
    return out


def test_resume_after_interruption_equals_uninterrupted_run(data, tmp_path):
    options = dict(epochs=2, folds=2, val_fold=0, freeze_epochs=1, layer_decay=0.8, accum_steps=2, dropout=0.2,
                   patience=None, seed=3, **QUICK)

    def stop_after_first(row):
        if row["epoch"] == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        finetune(data, [SPEC], tmp_path / "a", on_epoch=stop_after_first, **options)
    with pytest.raises(FinetuneError, match="resume"):
        finetune(data, [SPEC], tmp_path / "a", **options)
    with pytest.raises(FinetuneError, match="differ"):
        finetune(data, [SPEC], tmp_path / "a", resume=True, **{**options, "lr": 1e-3})
    resumed = finetune(data, [SPEC], tmp_path / "a", resume=True, **options)
    # the uninterrupted run loads images in a worker process: same result (augmentations are seeded per image)
    straight = finetune(data, [SPEC], tmp_path / "b", **{**options, "num_workers": 1})
    assert resumed["resumed_from_epoch"] == 1 and straight["resumed_from_epoch"] is None

    a = read_folder(tmp_path / "a" / CHECKPOINT_FILE, "finetune-checkpoint")      # no pickle in a checkpoint either
    b = read_folder(tmp_path / "b" / CHECKPOINT_FILE, "finetune-checkpoint")
    assert a["epoch"] == b["epoch"] == 2
    assert a["best_epoch"] == b["best_epoch"] and a["best_score"] == b["best_score"]
    for part in ("model", "optimizer", "rng"):
        ta, tb = _tensors(a[part]), _tensors(b[part])
        assert ta.keys() == tb.keys() and ta
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{part}{key}"
    assert a["scheduler"] == b["scheduler"]
    drop = {"images_per_s", "train_seconds", "epoch_seconds", "eta_s"}
    assert ([{k: v for k, v in r.items() if k not in drop} for r in a["history"]]
            == [{k: v for k, v in r.items() if k not in drop} for r in b["history"]])


def test_head_init_starts_from_the_fitted_head(data, tmp_path):
    from hexpr.embedder.features import ensure_features
    from hexpr.heads.fitting import fit_head, load_model

    dataset = open_dataset(data)
    # fp32 like the fine-tuning forward on CPU (the embedder may pick bf16 on CPUs that have it)
    features = ensure_features(dataset, [SPEC], tmp_path / "cache", progress=False, num_workers=0, device="cpu",
                               precision="fp32")
    fit_head(features.X, dataset.targets.to_numpy(), list(dataset.targets.columns), head="mlp",
             params={"hidden": [16], "epochs": 5, "device": "cpu", "batch_size": 8, "val_fraction": 0.3}, transform="standardize",
             folds=2, groups=dataset.groups.to_numpy(), out_dir=tmp_path / "head", feature_meta=features.meta(),
             progress=False, n_jobs=1, ids=features.ids)
    expected = load_model(tmp_path / "head").predict(features.X)

    rows = []
    report = finetune(data, [SPEC], tmp_path / "ft", head_init=tmp_path / "head", epochs=0, folds=2, val_fold=0,
                      on_epoch=rows.append, **QUICK)
    assert report["best_epoch"] == 0 and rows[0]["epoch"] == 0 and np.isfinite(rows[0]["val_score"])
    model = load_finetuned(tmp_path / "ft")
    assert model.hidden == (16,) and model.transform.name == "standardize"
    initial = model.predict_dataset(dataset, num_workers=0, progress=False, device="cpu")
    np.testing.assert_allclose(initial.to_numpy(), expected, rtol=1e-4, atol=1e-4)

    with pytest.raises(FinetuneError, match="backbones"):
        finetune(data, [parse_backbone("test_resnet:weights=none,size=32")], tmp_path / "other",
                 head_init=tmp_path / "head", epochs=1, **QUICK)


def test_an_old_pickled_finetuned_model_needs_trust_then_converts(data, tmp_path):
    """Before the safetensors format, finetune wrote finetuned.pt, a torch pickle: it loads only with trust
    (through the restricted unpickler), and convert-model turns it into the format that loads without."""
    from hexpr.embedder.errors import ModelError
    from hexpr.heads.model_files import looks_like_pickle
    from hexpr.workflow.models import convert_model

    finetune(data, [SPEC], tmp_path / "run", epochs=1, folds=2, val_fold=0, **QUICK)
    model = load_finetuned(tmp_path / "run")
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"format_version": 1, "specs": [s.to_dict() for s in model.specs],
                "preprocess": [p.to_dict() for p in model.preprocesses], "widths": model.widths, "genes": model.genes,
                "hidden": list(model.hidden), "dropout": model.dropout, "transform": model.transform,
                "state_dict": model._state, "info": model.info}, old / "finetuned.pt")
    assert looks_like_pickle(old / "finetuned.pt")
    with pytest.raises(ModelError, match="runs any code.*--trust-pickle"):
        load_finetuned(old)
    dataset = open_dataset(data)
    expected = model.predict_dataset(dataset, **QUICK)
    pd.testing.assert_frame_equal(load_finetuned(old, trust_pickle=True).predict_dataset(dataset, **QUICK), expected)
    convert_model(old, tmp_path / "new")
    assert not list((tmp_path / "new").glob("*.pt"))
    pd.testing.assert_frame_equal(load_finetuned(tmp_path / "new").predict_dataset(dataset, **QUICK), expected)
