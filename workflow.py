"""End-to-end stages that compose the embedder and the heads; what the CLI calls, usable from Python.

Each function takes paths and options, does one stage, writes its outputs atomically (temporary
name, then rename) and returns a plain dict report.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from embedder.backbones import BackboneSpec
from embedder.cache import DEFAULT_CACHE_DIR
from embedder.datasets import ID_COLUMN, DatasetError, numeric_columns, open_dataset
from embedder.files import CSV_FLOAT_FORMAT, atomic_dir, atomic_path
from embedder.features import FeatureSet, ensure_features
from heads.evaluation import evaluate_tables
from heads.metrics import N_TOP_DEFAULT


def write_json(path: str | Path, data: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))
    return Path(path)


def write_table(path: str | Path, frame: pd.DataFrame, index_label: str | None = ID_COLUMN) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index_label is not None, index_label=index_label, float_format=CSV_FLOAT_FORMAT)
    return Path(path)


# ----------------------------------------------------------------------------- embed


def embed(data: str | Path, specs: list[BackboneSpec], cache_dir=DEFAULT_CACHE_DIR, **options) -> FeatureSet:
    """Open a dataset and make sure every backbone's features are cached; returns the aligned features."""
    return ensure_features(open_dataset(data), specs, cache_dir, **options)


# ----------------------------------------------------------------------------- evaluate


def read_expression_table(path: str | Path) -> pd.DataFrame:
    """A truth or prediction table: a CSV with ID + genes, a dataset (CSV with paths, HEST .h5/folder) or an .h5ad."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    if path.suffix.lower() == ".h5ad":
        import anndata

        adata = anndata.read_h5ad(path)
        matrix = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
        return pd.DataFrame(matrix, index=adata.obs_names.astype(str), columns=adata.var_names.astype(str))
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, newline="") as f:
            header = [c.strip() for c in next(csv.reader(f), [])]
        if ID_COLUMN not in header:
            raise DatasetError(f"{path}: needs an {ID_COLUMN!r} column (found {list(header)[:5]})")
        if "path" not in header:
            frame = pd.read_csv(path, dtype={ID_COLUMN: str}, low_memory=False)
            genes = [c for c in frame.columns if c != ID_COLUMN]
            return numeric_columns(frame, genes, path, "expression").set_axis(pd.Index(frame[ID_COLUMN], name=ID_COLUMN))
    dataset = open_dataset(path)
    if dataset.targets is None:
        raise DatasetError(f"{path} holds no expression values to compare with")
    return dataset.targets


def evaluate(pred_path: str | Path, truth_path: str | Path, out_dir: str | Path | None = None,
             n_top: int = N_TOP_DEFAULT, gene_list_path: str | Path | None = None) -> dict:
    """Score predictions against truth; writes ``<pred>.scores.json`` and ``<pred>.per_gene.csv``."""
    pred_path = Path(pred_path)
    pred = read_expression_table(pred_path)
    truth = read_expression_table(truth_path)
    genes = None
    if gene_list_path is not None:
        genes = [g.strip() for g in Path(gene_list_path).read_text().replace(",", "\n").splitlines() if g.strip()]
    report, per_gene = evaluate_tables(pred, truth, n_top=n_top, gene_list=genes,
                                       pred_name=str(pred_path), truth_name=str(truth_path))
    out_dir = Path(out_dir) if out_dir is not None else pred_path.parent
    stem = pred_path.stem
    report["predictions"], report["truth"] = str(pred_path), str(truth_path)
    report["scores_json"] = str(write_json(out_dir / f"{stem}.scores.json", report))
    report["per_gene_csv"] = str(write_table(out_dir / f"{stem}.per_gene.csv", per_gene, index_label=None))
    return report


# ----------------------------------------------------------------------------- fit-head

DEFAULT_MODELS_DIR = Path(DEFAULT_CACHE_DIR) / "models"


def _training_dataset(data):
    dataset = open_dataset(data)
    if dataset.targets is None:
        raise DatasetError(f"{data}: no gene columns / expression found; fit-head needs training data with targets")
    return dataset


def feature_choices(features: FeatureSet, add_context=lambda f: f) -> tuple[dict, dict]:
    """Named feature sets for a backbone sweep: each backbone alone and all of them concatenated."""
    from embedder.backbones import BackboneSpec

    labels = [BackboneSpec.from_dict(b["spec"]).label for b in features.blocks]
    named = {label: features.select([label]) for label in labels}
    if len(labels) > 1:
        named["+".join(labels)] = features
    named = {k: add_context(v) for k, v in named.items()}
    return {k: v.X for k, v in named.items()}, {k: v.meta() for k, v in named.items()}


def select_gene_panel(targets: pd.DataFrame, panel: str | Path | None) -> list[str]:
    """Genes to model: all, the top-N HVG/HEG of the training targets (``hvg:N`` / ``heg:N``), or a file of names."""
    from heads.metrics import top_genes

    if panel is None:
        return list(targets.columns)
    text = str(panel)
    kind, _, count = text.partition(":")
    if kind in ("hvg", "heg") and count.isdigit():
        index = top_genes(targets.to_numpy(), int(count), "variance" if kind == "hvg" else "sum")
        return [targets.columns[i] for i in sorted(index)]
    path = Path(panel)
    if not path.is_file():
        raise DatasetError(f"gene panel {panel!r}: give hvg:N, heg:N or a file of gene names (one per line)")
    genes = [g.strip() for g in path.read_text().replace(",", "\n").splitlines() if g.strip()]
    unknown = [g for g in genes if g not in set(targets.columns)]
    if unknown:
        raise DatasetError(f"{path}: {len(unknown)} genes are not in the training data, e.g. {unknown[:5]}")
    return genes


def cv_groups(groups: pd.Series | None, folds: int) -> tuple[np.ndarray | None, int]:
    """Grouped folds when there are enough groups; leave-one-group-out with fewer; KFold (warned) with one."""
    if groups is None:
        return None, folds
    n_groups = groups.nunique()
    if n_groups == 1:
        warnings.warn(f"all spots are in one group ({groups.iloc[0]}): folds split neighbouring spots of one slide, "
                      "so CV scores are optimistic; add slides to get grouped CV", stacklevel=2)
        return None, folds
    if n_groups < folds:
        warnings.warn(f"{n_groups} groups for {folds} folds: using {n_groups} folds (leave one group out)", stacklevel=2)
        return groups.to_numpy(), n_groups
    return groups.to_numpy(), folds


def default_model_dir(data_name: str, head: str, sweep: bool, sweep_backbones: bool) -> Path:
    """``cache/models/<data>__<head>``; a sweep (``__sweep``) or backbone sweep (``__backbone-sweep``)
    gets its own folder, so it never replaces the plain model of the same head."""
    suffix = "__backbone-sweep" if sweep_backbones else "__sweep" if sweep else ""
    return DEFAULT_MODELS_DIR / f"{data_name}__{head}{suffix}"


def _describe_specs(specs: list[BackboneSpec]) -> str:
    """``name:key=value,...`` per spec, as written on the command line (weights files by name)."""
    def one(s: BackboneSpec) -> str:
        options = {"weights": Path(s.weights).name if os.sep in s.weights else s.weights, **s.model_kwargs,
                   **{k: getattr(s, k) for k in ("size", "interpolation", "crop_pct") if getattr(s, k) is not None}}
        return s.name + ":" + ",".join(f"{k}={v}" for k, v in options.items())
    return "; ".join(one(s) for s in specs)


def warn_if_backbones_change(out_dir: Path, specs: list[BackboneSpec], sweep_backbones: bool = False) -> str | None:
    """When ``out_dir`` holds a model fitted on other backbone specs, warn (naming old and new)
    that it is about to be replaced; returns the old backbones' description, else None.
    A non-empty folder that holds no model is refused (FileExistsError) before any work."""
    from heads.fitting import read_model_info

    info = read_model_info(out_dir)
    if not info:
        return None
    try:
        old = [BackboneSpec.from_dict(d) for d in (info.get("feature_meta") or {}).get("backbones") or []]
    except (TypeError, ValueError):
        old = []
    old_set, new_set = {s.to_json() for s in old}, {s.to_json() for s in specs}
    if old_set == new_set or (sweep_backbones and old_set and old_set <= new_set):
        return None
    warnings.warn(f"{out_dir} holds a model fitted on {_describe_specs(old) or 'unknown backbones'}; it will be replaced "
                  f"by one fitted on {_describe_specs(specs)} (give --out another folder to keep it)", stacklevel=2)
    return _describe_specs(old) or "unknown backbones"


def _with_context(features: FeatureSet, dataset, neighbours: int) -> FeatureSet:
    from embedder.features import add_neighbour_context

    if not neighbours:
        return features
    return add_neighbour_context(features, dataset.coords, None if dataset.groups is None else dataset.groups.to_numpy(), neighbours)


def _auto_feature_sets(features: FeatureSet, dataset, neighbours: int = 0) -> tuple[dict, dict]:
    """The feature sets ``head="auto"`` chooses between: the embeddings alone ("plain") and, when the
    dataset has coordinates, with the mean embedding of the k nearest spots appended ("k6"; k =
    ``neighbours`` or 6). Returns (name -> X, name -> feature meta with its ``neighbours``)."""
    from heads.sweep import AUTO_NEIGHBOURS

    k = int(neighbours) or AUTO_NEIGHBOURS
    named = {"plain": (features, 0)}
    if dataset.coords is not None:
        named[f"k{k}"] = (_with_context(features, dataset, k), k)
    else:
        warnings.warn("the data has no spot coordinates: head 'auto' tries no neighbour context", stacklevel=3)
    X = {name: f.X for name, (f, _) in named.items()}
    meta = {name: {**f.meta(), "neighbours": kk} for name, (f, kk) in named.items()}
    return X, meta


def fit_head(data, specs: list[BackboneSpec], *, head: str = "ridge", params: dict | None = None,
             transform: str = "none", folds: int = 5, sweep=None, trials: int | None = None,
             sweep_backbones: bool = False, seed: int = 0, n_jobs: int = -1, out_dir=None,
             cache_dir=DEFAULT_CACHE_DIR, tta: bool = False, genes: str | Path | None = None, neighbours: int = 0,
             bag: int | None = None, progress: bool = True, **embed_options) -> dict:
    """Embed if needed, cross-validate (optionally sweep heads and backbones), refit and save the head.

    ``genes``: the gene panel (``hvg:N``, ``heg:N`` or a file), chosen from this training data only and
    saved with the model. ``neighbours``: append the mean embedding of the k nearest spots.
    ``bag``: average the head over this many seeds. ``head="auto"``: score ridge and an mlp bagged
    over ``bag`` (default 5) seeds, each without and with neighbour context (k = ``neighbours``, or 6),
    by grouped CV on this training data; refit the best (see ``_auto_feature_sets``).
    """
    from heads.fitting import check_config
    from heads.fitting import fit_head as fit_head_on_features

    # a bad head name, parameter, transform or sweep value fails before any embedding
    space = check_config(head, params, transform, sweep, trials, bag)
    sweep = sweep if space is None else space
    if head == "auto" and sweep_backbones:
        from heads.base import HeadError

        raise HeadError("head 'auto' and --sweep-backbones do not combine; pick the backbones, then run auto")
    dataset = _training_dataset(data)
    panel = select_gene_panel(dataset.targets, genes)
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir(dataset.name, head, space is not None, sweep_backbones)
    replaced = warn_if_backbones_change(out_dir, specs, sweep_backbones)
    features = ensure_features(dataset, specs, cache_dir, tta=tta, progress=progress, **embed_options)
    if head == "auto":  # each of its feature sets carries its own k
        X, meta = _auto_feature_sets(features, dataset, neighbours)
    elif sweep_backbones:
        X, meta = feature_choices(features, lambda f: _with_context(f, dataset, neighbours))
        meta = {name: {**m, "neighbours": int(neighbours)} for name, m in meta.items()}
        if sweep is None and trials is None:
            sweep = {}  # a grid over backbones alone
    else:
        features = _with_context(features, dataset, neighbours)
        X, meta = features.X, {**features.meta(), "neighbours": int(neighbours)}
    patch = dataset.patch_scale()  # the tile size predict-slide uses
    for m in (meta.values() if isinstance(X, dict) else [meta]):
        m["patch"] = patch
    groups, folds = cv_groups(dataset.groups, folds)
    report = fit_head_on_features(
        X, dataset.targets[panel].to_numpy(), panel, head=head, params=params,
        transform=transform, folds=folds, groups=groups,
        seed=seed, out_dir=out_dir, feature_meta=meta, sweep=sweep, trials=trials, n_jobs=n_jobs,
        progress=progress, ids=features.ids, bag=bag,
    )
    report["out_dir"] = str(out_dir)
    report["replaced_backbones"] = replaced
    report["random_init_backbones"] = [s.name for s in specs if s.is_random_init]
    return report


# ----------------------------------------------------------------------------- predict


def _h5ad_safe(value):
    """Drop None (h5ad cannot store it) and turn lists of mixed types into strings."""
    if isinstance(value, dict):
        return {k: _h5ad_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        if all(isinstance(v, dict) for v in value):
            return {str(i): _h5ad_safe(v) for i, v in enumerate(value)}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) or all(isinstance(v, str) for v in value):
            return value
        return [json.dumps(v) for v in value]
    return value


def write_anndata(path, predictions: pd.DataFrame, coords, groups, provenance: dict,
                  obs: pd.DataFrame | None = None, uns: dict | None = None) -> Path:
    """Predictions as AnnData: X = predicted expression, obs = spots, obsm['spatial'] when known.
    ``obs``: extra per-row columns (same row order); ``uns``: extra entries (e.g. scanpy's 'spatial')."""
    import anndata

    obs = pd.DataFrame(index=predictions.index.astype(str)) if obs is None else obs.set_axis(predictions.index.astype(str))
    if groups is not None:
        obs["group"] = pd.Categorical(np.asarray(groups).astype(str))
    adata = anndata.AnnData(X=predictions.to_numpy(np.float32), obs=obs, var=pd.DataFrame(index=predictions.columns.astype(str)))
    if coords is not None:
        adata.obsm["spatial"] = np.asarray(coords, dtype=np.float64)
    adata.uns["hexpr"] = _h5ad_safe(json.loads(json.dumps(provenance, default=str)))
    adata.uns.update(uns or {})
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def load_predictor(model_path):
    """The model at ``model_path``: a head fitted by fit-head (``FittedModel``) or, where the folder
    holds ``finetuned.pt``, an end-to-end fine-tuned network (``FinetunedModel``)."""
    model_dir = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
    if (model_dir / "finetuned.pt").is_file():
        from embedder.finetune import load_finetuned

        return load_finetuned(model_dir)
    from heads.fitting import load_model

    return load_model(model_path)


def predictor_meta(model) -> dict:
    """What the model's inputs come from: a fitted head's feature description; for a fine-tuned
    network its backbones and the patch size it was trained on (when recorded)."""
    if hasattr(model, "feature_meta"):
        return model.feature_meta
    return {"backbones": [s.to_dict() for s in model.specs], "patch": model.info.get("patch")}


def predict_with(model, dataset, *, cache_dir=DEFAULT_CACHE_DIR, progress: bool = True, label: str = "the model",
                 **embed_options) -> tuple[pd.DataFrame, dict, list[str]]:
    """(predictions, config, embedding cache files) of ``model`` (see ``load_predictor``) for every
    patch of ``dataset``: a fitted head embeds through the cache (with its TTA and neighbour
    context), a fine-tuned network embeds on the fly."""
    from embedder.features import check_features_match, specs_from_meta

    if not hasattr(model, "feature_meta"):
        frame = model.predict_dataset(dataset, progress=progress, batch_size=embed_options.get("batch_size") or 64,
                                      device=embed_options.get("device", "auto"),
                                      num_workers=embed_options.get("num_workers"))
        return frame, {"finetuned": str(model.path.parent)}, []
    meta = model.feature_meta
    features = ensure_features(dataset, specs_from_meta(meta), cache_dir, tta=bool(meta.get("tta")),
                               progress=progress, **embed_options)
    features = _with_context(features, dataset, int(meta.get("neighbours", 0)))
    check_features_match(features, meta, label)
    return model.predict_frame(features.X, features.ids), model.config, [b["path"] for b in features.blocks]


def predict(model_path, data, *, out=None, fmt: str | None = None, cache_dir=DEFAULT_CACHE_DIR,
            template=None, progress: bool = True, **embed_options) -> dict:
    """Embed ``data`` with exactly the model's backbones, predict, write CSV (or .h5ad)."""
    from embedder.datasets import check_genes_match

    model_dir = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
    dataset = open_dataset(data, template=template)
    model = load_predictor(model_path)
    frame, config, cache_files = predict_with(model, dataset, cache_dir=cache_dir, progress=progress,
                                              label=str(model_path), **embed_options)
    meta = predictor_meta(model)
    if dataset.template_genes is not None:
        check_genes_match(list(frame.columns), dataset.template_genes, f"model {model_path}", "the submission template")
        frame = frame[dataset.template_genes]
    if out is None:
        out = model_dir / "predictions" / f"{dataset.name}.{fmt or 'csv'}"
    out = Path(out)
    fmt = fmt or ("h5ad" if out.suffix.lower() == ".h5ad" else "csv")
    if fmt == "h5ad":
        provenance = {"model": str(model_path), "config": config, "feature_meta": meta,
                      "dataset": str(dataset.source), "dataset_fingerprint": dataset.fingerprint(),
                      "cache_files": cache_files}
        write_anndata(out, frame, dataset.coords, None if dataset.groups is None else dataset.groups.to_numpy(), provenance)
    elif fmt == "csv":
        write_table(out, frame)
    else:
        raise ValueError(f"unknown output format {fmt!r}: use csv or h5ad")
    return {"out": str(out), "n_spots": frame.shape[0], "n_genes": frame.shape[1], "format": fmt}


# ----------------------------------------------------------------------------- predict-slide

DEFAULT_TILE_UM = 112.0          # HEST's patch: 224 px at 0.5 µm/px
DEFAULT_TILE_UM_PER_PX = 0.5
DEFAULT_MIN_TISSUE = 0.25
DEFAULT_HEATMAP_GENES = 3
SLIDE_OUTPUTS = ("predictions.h5ad", "tiles.geojson")


def tile_scale(meta: dict, tile_um: float | None = None, tile_um_per_px: float | None = None) -> dict:
    """Tile size in µm and the pixel size it is resampled to: options, else what the model recorded
    at fit time (``feature_meta['patch']``), else 112 µm at 0.5 µm/px (with a warning)."""
    recorded = meta.get("patch") or {}
    if not recorded and (tile_um is None or tile_um_per_px is None):
        warnings.warn(f"the model does not record its training patch size; tiles of {tile_um or DEFAULT_TILE_UM:g} µm at "
                      f"{tile_um_per_px or DEFAULT_TILE_UM_PER_PX:g} µm/px are used (set --tile-um / --tile-um-per-px "
                      "to the patch size the model was trained on)", stacklevel=2)
    um = float(tile_um or recorded.get("patch_um") or DEFAULT_TILE_UM)
    mpp = float(tile_um_per_px or recorded.get("um_per_px") or DEFAULT_TILE_UM_PER_PX)
    if um <= 0 or mpp <= 0:
        raise DatasetError(f"tile size {um} µm at {mpp} µm/px: both must be positive")
    px = int(round(um / mpp))
    if px < 8:
        raise DatasetError(f"tiles of {um} µm at {mpp} µm/px are only {px} px; increase --tile-um or lower --tile-um-per-px")
    return {"tile_um": um, "tile_um_per_px": mpp, "tile_px": px,
            "source": "options" if tile_um or tile_um_per_px else ("model" if recorded else "default")}


def rank_share(items: list, rank: int | None = None, world: int | None = None) -> list:
    """This process's share under torchrun: items[rank::world] (everything when not distributed)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    return list(items)[rank::max(1, world)]


def predict_tiles(model, slide, centres, ids, scale: dict, *, cache_dir=DEFAULT_CACHE_DIR, progress: bool = True,
                  **embed_options) -> tuple[pd.DataFrame, dict, list[str]]:
    """Predict at square tiles of ``scale['tile_um']`` centred at ``centres`` (level-0 px) of an open
    slide (its ``um_per_px`` set; closed on return) with ``model`` (see ``load_predictor``); a fitted
    head embeds through the cache (resumable). Returns (predictions, config, cache files)."""
    from embedder.tiling import tile_dataset

    dataset = tile_dataset(slide.path, slide.um_per_px, centres, ids, scale["tile_um"], scale["tile_px"], slide=slide)
    try:
        return predict_with(model, dataset, cache_dir=cache_dir, progress=progress, distributed=False, **embed_options)
    finally:
        dataset.close()


def _heatmap_genes(frame: pd.DataFrame, genes: list[str] | None, n: int) -> list[str]:
    if genes:
        unknown = [g for g in genes if g not in frame.columns]
        if unknown:
            raise DatasetError(f"--gene {unknown[0]!r} is not predicted by this model ({frame.shape[1]} genes, e.g. "
                               f"{list(frame.columns[:5])})")
        return list(dict.fromkeys(genes))
    variance = frame.var(axis=0).fillna(0).sort_values(ascending=False, kind="stable")
    return list(variance.index[:n])


def slide_out_dir(out_dir, slide_path) -> Path:
    from embedder.importers.common import safe_name

    return Path(out_dir) / safe_name(Path(slide_path).stem)


def predict_slide(model_path, slides, out_dir, *, um_per_px: float | None = None, tile_um: float | None = None,
                  tile_um_per_px: float | None = None, stride_um: float | None = None,
                  min_tissue: float = DEFAULT_MIN_TISSUE, genes: list[str] | None = None,
                  n_heatmap_genes: int = DEFAULT_HEATMAP_GENES, cache_dir=DEFAULT_CACHE_DIR, overwrite: bool = False,
                  progress: bool = True, **embed_options) -> dict:
    """Whole slides in, expression maps out: tissue tiles embedded and predicted with a fitted head
    or a fine-tuned model (see ``load_predictor``).

    ``slides``: slide files and/or folders of them; under torchrun rank r takes every world-th slide.
    A slide that cannot be read or tiled is skipped with a warning and listed in ``report['failed']``
    (the others are still written); when it is the only slide, or every slide fails, its error is raised.
    Writes ``out_dir/<slide>/`` atomically: predictions.h5ad (obsm['spatial'] = tile centres in
    level-0 px), tiles.geojson (QuPath), heatmap_<gene>.png. An existing slide folder needs ``overwrite``.
    """
    from embedder.slides import SlideError, find_slides

    if not 0 <= min_tissue <= 1:
        raise DatasetError(f"--min-tissue must be between 0 and 1, got {min_tissue}")
    if stride_um is not None and stride_um <= 0:
        raise DatasetError(f"--stride-um must be positive, got {stride_um}")
    fitted = load_predictor(model_path)
    scale = tile_scale(predictor_meta(fitted), tile_um, tile_um_per_px)
    if genes:  # an unknown --gene fails before any work
        _heatmap_genes(pd.DataFrame(columns=fitted.genes), genes, 0)
    paths = find_slides([Path(s) for s in slides])
    stems = [slide_out_dir(out_dir, p).name for p in paths]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise DatasetError(f"several slides would write to {Path(out_dir) / clash[0]}: give slides distinct file names")
    mine = rank_share(paths)
    if not overwrite:
        existing = [slide_out_dir(out_dir, p) for p in mine if slide_out_dir(out_dir, p).exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} already exists ({len(existing)} slide folder(s) in all); "
                                  "pass --overwrite to replace, or choose another --out")
    report = {"out_dir": str(out_dir), "tile": scale, "slides": {}, "failed": {}}
    for path in mine:
        try:
            report["slides"][str(path)] = _predict_one_slide(
                fitted, model_path, path, slide_out_dir(out_dir, path), scale, um_per_px=um_per_px, stride_um=stride_um,
                min_tissue=min_tissue, genes=genes, n_heatmap_genes=n_heatmap_genes, cache_dir=cache_dir,
                progress=progress, **embed_options)
        except (SlideError, DatasetError) as exc:  # this slide's own problem: the others still get their maps
            if len(mine) == 1:
                raise
            warnings.warn(f"skipped {path}: {exc}", stacklevel=2)
            report["failed"][str(path)] = str(exc)
    if report["failed"] and not report["slides"]:
        raise SlideError(f"none of the {len(mine)} slides could be predicted; first: {next(iter(report['failed'].values()))}")
    return report


def _predict_one_slide(fitted, model_path, path: Path, final_dir: Path, scale: dict, *, um_per_px, stride_um, min_tissue,
                       genes, n_heatmap_genes, cache_dir, progress, **embed_options) -> dict:
    from embedder.slides import SlideError, open_slide, slide_thumbnail
    from embedder.tiling import tile_grid, tissue_fraction, tissue_mask
    from heads.geojson import write_tile_geojson
    from heads.plots import plot_tile_map, safe_filename

    started = time.perf_counter()
    slide = open_slide(path, um_per_px)
    try:
        thumbnail, thumb_scale = slide_thumbnail(slide)
        mask = tissue_mask(thumbnail)
        tile_px = scale["tile_um"] / slide.um_per_px
        stride_px = (stride_um if stride_um else scale["tile_um"]) / slide.um_per_px
        grid = tile_grid(slide.width, slide.height, tile_px, stride_px)
        fraction = tissue_fraction(mask, thumb_scale, grid)
        keep = fraction >= min_tissue
        if not keep.any():
            raise SlideError(f"{path}: no tile has {min_tissue:.0%} tissue ({len(grid)} tiles of {scale['tile_um']:g} µm, "
                             f"tissue found on {mask.mean():.1%} of the thumbnail); lower --min-tissue or check the slide")
        tiles = grid.subset(keep)
        tissue_s = time.perf_counter() - started
        frame, config, cache_files = predict_tiles(fitted, slide, tiles.centres, tiles.ids(), scale, cache_dir=cache_dir,
                                           progress=progress, **embed_options)
        chosen = _heatmap_genes(frame, genes, n_heatmap_genes)
        obs = pd.DataFrame({"row": tiles.rows, "col": tiles.cols, "tissue_fraction": fraction[keep].astype(np.float32)})
        provenance = {"model": str(model_path), "config": config, "feature_meta": predictor_meta(fitted),
                      "slide": str(path), "slide_size_px": [int(slide.width), int(slide.height)],
                      "um_per_px": slide.um_per_px, "um_per_px_source": slide.um_per_px_source,
                      "tile_um": scale["tile_um"], "tile_px_level0": tile_px, "tile_um_per_px": scale["tile_um_per_px"],
                      "tile_patch_px": scale["tile_px"], "tile_size_source": scale["source"],
                      "stride_um": stride_px * slide.um_per_px, "stride_px_level0": stride_px, "min_tissue": min_tissue,
                      "n_grid_tiles": len(grid), "grid_shape": [grid.n_rows, grid.n_cols],
                      "coordinates": "obsm['spatial'] = tile centres (x, y) in level-0 slide pixels",
                      "cache_files": cache_files}
        spatial = {"spatial": {path.stem: {
            "images": {"hires": thumbnail},
            "scalefactors": {"tissue_hires_scalef": thumb_scale, "spot_diameter_fullres": tile_px}}}}
        with atomic_dir(final_dir) as tmp:
            write_anndata(tmp / "predictions.h5ad", frame, tiles.centres, None, provenance, obs=obs, uns=spatial)
            write_tile_geojson(tmp / "tiles.geojson", frame, tiles.centres, tile_px)
            heatmaps = {g: str(final_dir / plot_tile_map(
                frame[g].to_numpy(), tiles.centres, stride_px, thumbnail, thumb_scale,
                tmp / f"heatmap_{safe_filename(g)}.png", title=f"{path.stem}: predicted {g}").name) for g in chosen}
    finally:
        slide.close()
    seconds = time.perf_counter() - started
    return {"out_dir": str(final_dir), "n_grid_tiles": len(grid), "n_tiles": int(keep.sum()),
            "um_per_px": slide.um_per_px, "um_per_px_source": slide.um_per_px_source, "heatmaps": heatmaps,
            "tissue_seconds": round(tissue_s, 2), "seconds": round(seconds, 1),
            "tiles_per_second": round(int(keep.sum()) / max(seconds, 1e-9), 2)}


# ----------------------------------------------------------------------------- demo


def demo(workdir="hexpr-demo", *, n_train: int = 600, n_test: int = 200, n_genes: int = 200, size: int = 224,
         specs: list[BackboneSpec] | None = None, head: str = "ridge", folds: int = 3, seed: int = 0,
         progress: bool = True, **embed_options) -> dict:
    """The whole pipeline offline on a generated dataset: demo-data, embed, fit-head, predict, evaluate."""

    from embedder.backbones import resolve_specs
    from embedder.demo_data import write_demo_dataset

    started = time.perf_counter()
    workdir = Path(workdir)
    data_dir = workdir / "data"
    if not (data_dir / "train.csv").is_file():
        write_demo_dataset(data_dir, n_train=n_train, n_test=n_test, n_genes=n_genes, size=size, seed=seed)
    specs = specs or resolve_specs(no_pretrained=True)
    cache_dir = workdir / "cache"
    steps = {}
    fit = fit_head(data_dir / "train.csv", specs, head=head, folds=folds, seed=seed, out_dir=workdir / "model",
                   cache_dir=cache_dir, progress=progress, **embed_options)
    steps["fit"] = fit
    pred = predict(workdir / "model", data_dir / "test.csv", out=workdir / "predictions.csv", cache_dir=cache_dir,
                   progress=progress, **embed_options)
    scores = evaluate(pred["out"], data_dir / "test_truth.csv", out_dir=workdir)
    # the floor: the training-mean profile on the same test spots
    train = read_expression_table(data_dir / "train.csv")
    truth = read_expression_table(data_dir / "test_truth.csv")
    mean_pred = pd.DataFrame(np.tile(train.mean().to_numpy(), (len(truth), 1)), index=truth.index, columns=train.columns)
    baseline, _ = evaluate_tables(mean_pred, truth)
    return {
        "workdir": str(workdir), "head": head, "backbones": [s.name for s in specs],
        "random_init_backbones": [s.name for s in specs if s.is_random_init],
        "cv_score": fit["cv"]["score"], "cv_mean_head_score": fit["mean_head"]["score"],
        "test": scores, "test_mean_baseline": baseline,
        "predictions": pred["out"], "model_dir": fit["out_dir"], "seconds": round(time.perf_counter() - started, 1),
    }
