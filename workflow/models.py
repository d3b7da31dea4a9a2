"""Model folders as things to share: convert old pickled models, export a hub-ready copy.

``convert_model(old, new)``: an old folder (``model.joblib`` or ``finetuned.pt``, pickles) -> the
safetensors format of ``heads.model_files``. It unpickles the old file once (the user asked for it
by running the command), checks that the converted model predicts bit-identically, then writes.
``export_model(model, out)``: the files a Hugging Face model repository needs (config.json,
model.safetensors, lightgbm/, README.md card, model.json / finetuned.json), nothing else.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from hexpr.embedder.errors import MissingInputError, ModelError, OutputExistsError, UsageError
from hexpr.embedder.files import atomic_dir
from hexpr.heads.finetune_model import LEGACY_FINETUNED_FILE
from hexpr.heads.fitting import MODEL_INFO_FILE, FittedModel
from hexpr.heads.model_files import ARRAYS_FILE, CONFIG_FILE, LEGACY_FILE, LIGHTGBM_DIR, read_config
from hexpr.workflow.model_card import CARD_FILE, retarget_card, write_card_for
from hexpr.workflow.prediction import load_predictor, resolve_model

LEGACY_FILES = (LEGACY_FILE, LEGACY_FINETUNED_FILE)
CHECK_ROWS = 64                       # random feature rows both models predict before a conversion is written
SHARED_FILES = (CONFIG_FILE, ARRAYS_FILE, CARD_FILE, MODEL_INFO_FILE, "finetuned.json")


def _same_predictions(old: FittedModel, new: FittedModel) -> bool:
    X = np.random.default_rng(0).normal(size=(CHECK_ROWS, old.n_features))
    return np.array_equal(old.predict(X), new.predict(X), equal_nan=True)


def convert_model(old, new=None) -> dict:
    """Convert the old pickled model in folder ``old`` into the safetensors format, in ``new`` (default:
    in place, the pickle removed afterwards). Runs the old pickle once: convert only models you trust.

    Example::

        >>> hexpr.convert_model("models/old_ridge", "models/ridge")["files"]
    """
    old = Path(old)
    old = old.parent if old.is_file() else old
    if not old.is_dir():
        raise MissingInputError(f"no model folder at {old}")
    if (old / CONFIG_FILE).is_file():
        raise UsageError(f"{old} is already in hexpr's safetensors format ({CONFIG_FILE}); nothing to convert")
    legacy = next((old / name for name in LEGACY_FILES if (old / name).is_file()), None)
    if legacy is None:
        raise MissingInputError(f"{old} holds no old model ({' or '.join(LEGACY_FILES)})")
    new = old if new is None else Path(new)
    if new != old and new.exists() and (not new.is_dir() or any(new.iterdir())):
        raise OutputExistsError(f"{new} exists and is not empty; give a new folder")
    model = load_predictor(old, trust_pickle=True)
    with atomic_dir(new) as work:
        for item in old.iterdir():
            if item.name not in LEGACY_FILES and item.name != "predictions":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, work / item.name)
        model.save(work)
        converted = load_predictor(work)
        if isinstance(model, FittedModel) and not _same_predictions(model, converted):
            raise ModelError(f"{old}: the converted model does not predict exactly as the old one; it was not written")
        if not (work / CARD_FILE).is_file():
            write_card_for(work, converted, new.name)
        if new == old and (old / "predictions").is_dir():
            shutil.copytree(old / "predictions", work / "predictions")
    return {"old": str(legacy), "out": str(new), "kind": read_config(new)["kind"],
            "files": sorted(p.name for p in new.iterdir() if p.name in SHARED_FILES or p.name == LIGHTGBM_DIR)}


def export_model(model, out_dir, repo_id: str | None = None) -> dict:
    """Copy what a Hugging Face model repository needs from ``model`` (a folder or a hub id) into
    ``out_dir``: the card (its usage lines naming ``repo_id``, default ORG/NAME), config.json,
    model.safetensors, lightgbm/ and the human-readable info.
    Nothing else (no predictions, caches or out-of-fold tables). Upload it with
    ``huggingface-cli upload ORG/NAME OUT_DIR``.

    Example::

        >>> hexpr.export_model("cache/models/ridge_resnet18", "to-upload/ridge")["files"]
    """
    source = resolve_model(model)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(f"{out_dir} exists and is not empty; give a new folder")
    if not (source / CONFIG_FILE).is_file():
        raise ModelError(f"{source} is not in hexpr's safetensors format; run `hexpr convert-model {source}` first")
    loaded = load_predictor(source)                  # checks every checksum before anything is copied
    with atomic_dir(out_dir) as work:
        for name in SHARED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, work / name)
        if (source / LIGHTGBM_DIR).is_dir():
            shutil.copytree(source / LIGHTGBM_DIR, work / LIGHTGBM_DIR)
        if not (work / CARD_FILE).is_file():
            write_card_for(work, loaded, out_dir.name)
        card = (work / CARD_FILE).read_text(encoding="utf-8")
        (work / CARD_FILE).write_text(retarget_card(card, repo_id or "ORG/NAME"), encoding="utf-8")
    return {"model": str(model), "out": str(out_dir), "files": sorted(p.name for p in out_dir.iterdir())}
