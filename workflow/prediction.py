"""predict: expression for new patches from a fitted head or a fine-tuned network, as CSV or .h5ad."""
from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from hexpr.embedder.backbones import hub_reachable
from hexpr.embedder.cache import DEFAULT_CACHE_DIR
from hexpr.embedder.context import format_um
from hexpr.embedder.datasets import OBSERVATION_COLUMN, check_genes_match, open_dataset
from hexpr.embedder.errors import MissingInputError
from hexpr.embedder.extract import check_embed_options
from hexpr.embedder.importers.names import safe_name
from hexpr.embedder.weights import WeightsError, locate_hub_model, parse_hub_id
from hexpr.embedder.features import (check_features_match, ensure_features, specs_from_meta, with_dataset_context,
                                     with_slide_centring)
from hexpr.heads.finetune import load_finetuned
from hexpr.heads.finetune_model import FINETUNED_KIND, LEGACY_FINETUNED_FILE
from hexpr.heads.fitting import load_model
from hexpr.heads.model_files import CONFIG_FILE, read_config
from hexpr.workflow.model_card import UNKNOWN_UNITS
from hexpr.heads.uncertainty import DEFAULT_INTERVAL, check_interval, check_model_interval, predict_uncertain
from hexpr.workflow.options import check_choice, check_model_path, check_output_file
from hexpr.workflow.outputs.anndata import write_anndata
from hexpr.workflow.outputs.tables import write_table

PREDICTION_FORMATS = ("csv", "h5ad")


def load_predictor(model_path, trust_pickle: bool = False):
    """The model at ``model_path``: a head fitted by fit-head (``FittedModel``) or an end-to-end
    fine-tuned network (``FinetunedModel``), as the folder's config.json says. Old pickled models
    (``model.joblib``, ``finetuned.pt``) load only with ``trust_pickle``.

    Example::

        >>> model = hexpr.load_predictor("cache/models/ridge_resnet18")
        >>> len(model.genes)
    """
    model_path = resolve_model(model_path)
    model_dir = model_path if model_path.is_dir() else model_path.parent
    if model_kind(model_dir) == FINETUNED_KIND:
        return load_finetuned(model_dir, trust_pickle=trust_pickle)
    return load_model(model_path, trust_pickle=trust_pickle)


def resolve_model(ref) -> Path:
    """A model given as a local folder (or file in it) or a Hugging Face repo id ``org/name[@revision]``:
    its local path. A hub id is looked up in the local hub cache first (offline: only there; see
    ``embedder.weights.locate_hub_model``), then downloaded.

    Example::

        >>> hexpr.resolve_model("my-org/ridge-her2st@main")
    """
    path = Path(ref)
    if path.exists():
        return path
    hub = parse_hub_id(str(ref))
    if hub is None:
        raise MissingInputError(f"no model at {ref}: give a model folder written by fit-head, or a Hugging Face "
                                "model id (org/name or org/name@revision)")
    try:
        return locate_hub_model(*hub, online=hub_reachable())
    except WeightsError as exc:   # the id may also be a mistyped local folder: say both
        raise type(exc)(f"there is no folder {ref} here, so it was taken as a Hugging Face id: {exc}") from None


def model_facts(model_ref, model) -> dict:
    """What every output says about the model: its id (the hub id, or the folder) and the units of
    its predictions."""
    units = (getattr(model, "extra", None) or {}).get("units") or (getattr(model, "info", None) or {}).get("units")
    return {"model_id": str(model_ref), "units": units or UNKNOWN_UNITS}


def model_kind(model_dir: Path) -> str | None:
    """What a model folder holds: its config's kind, "finetuned" for an old ``finetuned.pt``, else None."""
    if (model_dir / CONFIG_FILE).is_file():
        return read_config(model_dir)["kind"]
    return FINETUNED_KIND if (model_dir / LEGACY_FINETUNED_FILE).is_file() else None


def predictor_meta(model) -> dict:
    """What the model's inputs come from: a fitted head's feature description; for a fine-tuned
    network its backbones and the patch size it was trained on (when recorded).

    Example::

        >>> hexpr.predictor_meta(hexpr.load_predictor("cache/models/ridge_resnet18"))["backbones"]
    """
    if hasattr(model, "feature_meta"):
        return model.feature_meta
    return {"backbones": [s.to_dict() for s in model.specs], "patch": model.info.get("patch")}


def predict_with(model, dataset, *, cache_dir=DEFAULT_CACHE_DIR, progress: bool = True, label: str = "the model",
                 clip: bool = True, **embed_options) -> tuple[pd.DataFrame, dict, list[str]]:
    """(predictions, config, embedding cache files) of ``model`` (see ``load_predictor``) for every
    patch of ``dataset``: a fitted head embeds through the cache (with its TTA, context scales, neighbour
    context and slide centring: each slide of ``dataset`` by its own mean), a fine-tuned network embeds on the fly. A fitted head's predictions are clipped to
    its training range unless ``clip`` is False.

    Example::

        >>> model = hexpr.load_predictor("cache/models/ridge_resnet18")
        >>> predictions, config, caches = hexpr.predict_with(model, dataset)
    """
    frame, _, config, cache_files = predict_with_uncertainty(model, dataset, interval=None, clip=clip, cache_dir=cache_dir,
                                                             progress=progress, label=label, **embed_options)
    return frame, config, cache_files


def predict_with_uncertainty(model, dataset, *, interval: float | None = DEFAULT_INTERVAL, clip: bool = True,
                             cache_dir=DEFAULT_CACHE_DIR, progress: bool = True, label: str = "the model",
                             **embed_options) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict, list[str]]:
    """``predict_with`` plus the uncertainty of a fitted head (``heads.uncertainty.predict_uncertain``):
    (predictions, layers, config, cache files); ``layers`` maps ``std`` (bagged heads' member spread),
    ``lower``/``upper`` (conformal interval at coverage ``interval``; None: none) to frames shaped
    like the predictions. ``config['uncertainty']`` says what was done. A fine-tuned network has no layers."""
    if not hasattr(model, "feature_meta"):
        batch_size = embed_options.get("batch_size")
        frame = model.predict_dataset(dataset, progress=progress, batch_size=64 if batch_size is None else batch_size,
                                      device=embed_options.get("device", "auto"),
                                      num_workers=embed_options.get("num_workers"))
        return frame, {}, {"finetuned": str(model.path.parent)}, []
    meta = model.feature_meta
    scales = meta.get("context_um") or []
    features = ensure_features(dataset, specs_from_meta(meta), cache_dir, tta=bool(meta.get("tta")),
                               context_um=scales, context_why=f"{label}, fitted with context scales of "
                               f"{format_um(scales)} µm,", progress=progress, **embed_options)
    features = with_dataset_context(features, dataset, int(meta.get("neighbours", 0)))
    check_features_match(features, meta, label)
    features = with_slide_centring(features, dataset, bool(meta.get("slide_centred")))
    result = predict_uncertain(model, features.X, interval=interval, clip=clip)
    index = pd.Index(list(features.ids), name="ID")
    as_frame = functools.partial(pd.DataFrame, index=index, columns=model.genes)
    layers = {name: as_frame(values) for name, values in result.layers().items()}
    config = {**model.config, "uncertainty": result.summary()}
    return as_frame(result.mean), layers, config, [b["path"] for b in features.blocks]


def predict(model_path, data, *, out=None, fmt: str | None = None, cache_dir=DEFAULT_CACHE_DIR,
            template=None, progress: bool = True, interval: float | None = DEFAULT_INTERVAL, clip: bool = True,
            trust_pickle: bool = False, **embed_options) -> dict:
    """Embed ``data`` with exactly the model's backbones, predict, write CSV (or .h5ad).
    Predictions are clipped to the training range unless ``clip`` is False. The uncertainty
    (``std``, and ``lower``/``upper`` at coverage ``interval``) goes into .h5ad layers only; a CSV
    holds the predictions alone. ``model_path``: a folder or a Hugging Face id (``resolve_model``);
    ``trust_pickle``: also load an old pickled model (runs the code in it).

    Example::

        >>> report = hexpr.predict("cache/models/ridge_resnet18", "demo/test.csv", out="pred.csv")
        >>> report["out"]
    """
    if fmt is not None:
        check_choice("--format", fmt, PREDICTION_FORMATS)
    check_output_file("--out", out)
    check_embed_options(**embed_options)
    interval = check_interval(interval)
    local = resolve_model(model_path)
    model_dir = local if local.is_dir() else local.parent
    dataset = open_dataset(data, template=template)
    model = load_predictor(local, trust_pickle=trust_pickle)
    check_model_interval(model, interval)
    frame, layers, config, cache_files = predict_with_uncertainty(model, dataset, interval=interval, clip=clip,
                                                                  cache_dir=cache_dir, progress=progress,
                                                                  label=str(model_path), **embed_options)
    meta = predictor_meta(model)
    if dataset.template_genes is not None:
        check_genes_match(list(frame.columns), dataset.template_genes, f"model {model_path}", "the submission template")
        frame = frame[dataset.template_genes]
        layers = {name: layer[dataset.template_genes] for name, layer in layers.items()}
    if out is None:   # beside a local model; a hub id (the model lives in the hub cache): ./predictions/<id>/
        folder = model_dir / "predictions" if Path(model_path).exists() else Path("predictions") / safe_name(str(model_path))
        out = folder / f"{dataset.name}.{fmt or 'csv'}"
    out = Path(out)
    fmt = fmt or ("h5ad" if out.suffix.lower() == ".h5ad" else "csv")
    observations = dataset.patch_observations()   # a bagged dataset: each row names its observation
    if observations is not None:
        observations = pd.Series(observations, index=pd.Index(dataset.ids).astype(str)).reindex(frame.index.astype(str))
    if fmt == "h5ad":
        provenance = {"model": str(model_path), **model_facts(model_path, model), "config": config, "feature_meta": meta,
                      "dataset": str(dataset.source), "dataset_fingerprint": dataset.fingerprint(),
                      "cache_files": cache_files}
        obs = None if observations is None else pd.DataFrame({OBSERVATION_COLUMN: pd.Categorical(observations.to_numpy())})
        write_anndata(out, frame, dataset.coords, None if dataset.groups is None else dataset.groups.to_numpy(), provenance,
                      obs=obs, layers=layers)
    else:
        write_table(out, frame if observations is None else frame.assign(**{OBSERVATION_COLUMN: observations.to_numpy()})
                    [[OBSERVATION_COLUMN, *frame.columns]])
    return {"out": str(out), "n_spots": frame.shape[0], "n_genes": frame.shape[1], "format": fmt,
            "n_observations": None if observations is None else int(observations.nunique()),
            "layers": sorted(layers) if fmt == "h5ad" else [], "uncertainty": config.get("uncertainty")}
