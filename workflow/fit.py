"""fit-head: embed if needed, cross-validate (sweeps, backbone sweeps, auto), refit and save a head."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.backbones import BackboneSpec
from hexpr.embedder.cache import DEFAULT_CACHE_DIR
from hexpr.embedder.datasets import DatasetError, open_dataset
from hexpr.embedder.errors import UsageError
from hexpr.embedder.extract import check_embed_options
from hexpr.embedder.context import check_context, fitting_sizes, format_um, parse_context_um
from hexpr.embedder.features import FeatureSet, ensure_features, with_context_scales, with_dataset_context, with_slide_centring
from hexpr.heads.base import HeadError
from hexpr.heads.bags import Bags, check_bag_support
from hexpr.heads.fitting import AUTO, OOF_FILE, check_config, load_model, read_model_info
from hexpr.heads.fitting import fit_head as fit_head_on_features
from hexpr.heads.metrics import top_genes
from hexpr.heads.sweep import AUTO_CONTEXT_MULTIPLES, AUTO_NEIGHBOURS
from hexpr.heads.targets import make_transform
from hexpr.workflow.model_card import card_facts, top_gene_scores, units_of, write_card
from hexpr.workflow.options import WHOLE_NON_NEGATIVE, Int, check_head, check_option, head_names  # noqa: F401

DEFAULT_MODELS_DIR = Path(DEFAULT_CACHE_DIR) / "models"


def _training_dataset(data):
    dataset = open_dataset(data)
    if dataset.targets is None:
        raise DatasetError(f"{data}: no gene columns / expression found; fit-head needs training data with targets")
    return dataset


def feature_choices(features: FeatureSet, add_context=lambda f: f) -> tuple[dict, dict]:
    """Named feature sets for a backbone sweep: each backbone alone and all of them concatenated."""
    labels = [BackboneSpec.from_dict(b["spec"]).label for b in features.blocks]
    named = {label: features.select([label]) for label in labels}
    if len(labels) > 1:
        named["+".join(labels)] = features
    named = {k: add_context(v) for k, v in named.items()}
    return {k: v.X for k, v in named.items()}, {k: v.meta() for k, v in named.items()}


def select_gene_panel(targets: pd.DataFrame, panel: str | Path | None) -> list[str]:
    """Genes to model: all, the top-N HVG/HEG of the training targets (``hvg:N`` / ``heg:N``), or a file of names."""
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


def _cv_scheme(folds, groups) -> str:
    n = folds if isinstance(folds, int) else len(folds)
    return (f"{n}-fold, grouped by slide (no slide in both training and held-out folds)" if groups is not None
            else f"{n}-fold over spots (not grouped by slide: optimistic for new slides)")


def _write_fit_card(out_dir: Path, truth: pd.DataFrame) -> None:
    """README.md model card of a freshly fitted model folder, with its per-gene out-of-fold r."""
    model = load_model(out_dir)
    oof = pd.read_csv(out_dir / OOF_FILE, index_col=0).reindex(columns=model.genes)
    truth = truth.set_axis(oof.index, axis=0) if len(truth) == len(oof) else truth
    top = top_gene_scores(oof.to_numpy(dtype=np.float64), truth[model.genes].to_numpy(dtype=np.float64), model.genes)
    write_card(out_dir, card_facts(model, name=out_dir.name, top_genes=top))


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


def auto_context_scales(dataset, context_um=()) -> tuple[float, ...]:
    """The context scales ``head="auto"`` tries (as prefixes: the first alone, then all): the given
    ones, else 3x and 6x the patch size where the dataset has source images they fit in (a warning
    says why not, and auto then tries none)."""
    if context_um:
        return tuple(context_um)
    sizes, why = fitting_sizes(dataset, AUTO_CONTEXT_MULTIPLES)
    if why:
        warnings.warn(f"head 'auto' tries {'context scales of ' + format_um(sizes) + ' µm only' if sizes else 'no context scales'}: "
                      f"{why}", stacklevel=3)
    return sizes


def _auto_feature_sets(features: FeatureSet, dataset, neighbours: int = 0, context=None,
                       centre: bool = False) -> tuple[dict, dict]:
    """The feature sets ``head="auto"`` chooses between: the embeddings alone ("plain") and, when the
    dataset has coordinates, with the mean embedding of the k nearest spots appended ("k6"; k =
    ``neighbours`` or 6). ``context``: (scales, scales -> features with those context scales); adds
    one set per prefix of the scales ("c336", "c336+672"), and each with the neighbours too
    ("c336+k6", "c336+672+k6"). ``centre``: every set centred per slide (``--centre-slides``).
    Returns (name -> X, name -> feature meta with its ``neighbours``)."""
    k = int(neighbours) or AUTO_NEIGHBOURS
    named = {"plain": (features, 0)}
    if dataset.coords is not None:
        named[f"k{k}"] = (with_dataset_context(features, dataset, k), k)
    else:
        warnings.warn("the data has no spot coordinates: head 'auto' tries no neighbour context", stacklevel=3)
    scales, with_scales = context or ((), None)
    for n in sorted({1, len(scales)}) if scales else ():
        name = "c" + "+".join(f"{s:g}" for s in scales[:n])
        named[name] = (with_scales(scales[:n]), 0)
        if dataset.coords is not None:   # both contexts: the wider squares and the measured neighbours
            named[f"{name}+k{k}"] = (with_dataset_context(named[name][0], dataset, k), k)
    named = {name: (with_slide_centring(f, dataset, centre), kk) for name, (f, kk) in named.items()}
    X = {name: f.X for name, (f, _) in named.items()}
    meta = {name: {**f.meta(), "neighbours": kk} for name, (f, kk) in named.items()}
    return X, meta


def check_transform(spec: str) -> str:
    """``spec`` if it is a target transform or a '+' chain of them (each part checked), else a HeadError.

    Example::

        >>> hexpr.check_transform("log1p+standardize")
        # -> 'log1p+standardize'
    """
    make_transform(spec)
    return spec


def check_fit_options(*, folds: int = 5, seed: int = 0, n_jobs: int = -1, neighbours: int = 0, **embed_options) -> None:
    """Refuse a bad fit-head option before any work (one UsageError naming the option)."""
    check_option("--folds", folds, Int(2))
    check_option("--seed", seed, WHOLE_NON_NEGATIVE)
    check_option("--neighbours", neighbours, WHOLE_NON_NEGATIVE)
    check_option("--jobs", n_jobs, Int())
    if n_jobs == 0:
        raise UsageError("--jobs must be a number of parallel configs >= 1, or -1 for all cores (-2: all but one), got 0")
    check_embed_options(**embed_options)


def fit_head(data, specs: list[BackboneSpec], *, head: str = "ridge", params: dict | None = None,
             transform: str = "none", folds: int = 5, sweep=None, trials: int | None = None,
             sweep_backbones: bool = False, seed: int = 0, n_jobs: int = -1, out_dir=None,
             cache_dir=DEFAULT_CACHE_DIR, tta: bool = False, genes: str | Path | None = None, neighbours: int = 0,
             bag: int | None = None, context_um=(), centre_slides: bool = False, progress: bool = True,
             **embed_options) -> dict:
    """Embed if needed, cross-validate (optionally sweep heads and backbones), refit and save the head.

    ``genes``: the gene panel (``hvg:N``, ``heg:N`` or a file), chosen from this training data only and
    saved with the model. ``neighbours``: append the mean embedding of the k nearest spots.
    A bagged dataset (``hexpr import --pool-spots/--subtile-um``) fits the head on its bags (heads.bags):
    the mean of each observation's sub-tile predictions against its target; the model records the
    sub-tile size and predicts single sub-tiles.
    ``bag``: average the head over this many seeds. ``head="auto"``: score ridge and an mlp bagged
    over ``bag`` (default 5) seeds, each without and with neighbour context (k = ``neighbours``, or 6),
    by grouped CV on this training data, and the equal-weight blend of the two on each feature set
    (scored from their out-of-fold predictions); refit the best (see ``_auto_feature_sets``); with
    source images it also tries context scales (``context_um``, else 3x and 3x + 6x the patch size);
    with two slides or more, ridge fitted within slides too (and its blend with the mlp).
    ``context_um`` (e.g. ``"336,672"``): append the features of squares of those sizes (µm) around each
    spot, cut from the source slides (``embedder.context``); the model records them and predict cuts
    the same squares.
    ``centre_slides``: subtract each slide's mean embedding from its spots (``embedder.features.
    centre_per_slide``), here and, as the model records it, at predict time (each slide by its own mean);
    ridge is then fitted within slides.
    Example::

        >>> report = hexpr.fit_head("demo/train.csv", hexpr.backbone_specs(["resnet18:weights=none,size=64"]),
        ... head="ridge", folds=3)
        >>> report["cv"]["score"], report["out_dir"]
    """
    # a bad head name, parameter, transform, sweep or option value fails before any embedding
    space = check_config(head, params, transform, sweep, trials, bag)
    check_fit_options(folds=folds, seed=seed, n_jobs=n_jobs, neighbours=neighbours, **embed_options)
    sweep = sweep if space is None else space
    if head == "auto" and sweep_backbones:
        raise HeadError("head 'auto' and --sweep-backbones do not combine; pick the backbones, then run auto")
    if centre_slides and head == "ridge" and "within_groups" not in (params or {}):
        params = {**(params or {}), "within_groups": True}   # coefficients and penalty from within slides
    scales = parse_context_um(context_um)
    if scales and sweep_backbones:
        raise UsageError("--context-um and --sweep-backbones do not combine; rank the backbones first, then fit "
                         "the chosen one with --context-um")
    dataset = _training_dataset(data)
    check_context(dataset, scales)   # no source image, or a size that does not fit: before any embedding
    if dataset.is_bagged and head != "auto":  # a head without bag support: an error before any embedding
        check_bag_support(head, params)
    panel = select_gene_panel(dataset.targets, genes)
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir(dataset.name, head, space is not None, sweep_backbones)
    replaced = warn_if_backbones_change(out_dir, specs, sweep_backbones)
    features = ensure_features(dataset, specs, cache_dir, tta=tta, progress=progress, **embed_options)
    def add_scales(chosen):
        return with_context_scales(features, dataset, specs, chosen, cache_dir, tta=tta, progress=progress, **embed_options)

    if head == "auto":  # each of its feature sets carries its own k and context scales
        X, meta = _auto_feature_sets(features, dataset, neighbours, (auto_context_scales(dataset, scales), add_scales),
                                     centre=centre_slides)
    elif sweep_backbones:
        X, meta = feature_choices(features, lambda f: with_slide_centring(with_dataset_context(f, dataset, neighbours),
                                                                          dataset, centre_slides))
        meta = {name: {**m, "neighbours": int(neighbours)} for name, m in meta.items()}
        if sweep is None and trials is None:
            sweep = {}  # a grid over backbones alone
    else:
        features = with_dataset_context(add_scales(scales) if scales else features, dataset, neighbours)
        features = with_slide_centring(features, dataset, centre_slides)
        X, meta = features.X, {**features.meta(), "neighbours": int(neighbours)}
    patch = dataset.patch_scale()  # the tile size predict-slide uses
    for m in (meta.values() if isinstance(X, dict) else [meta]):
        m.setdefault("slide_centred", bool(centre_slides))
        m["patch"] = patch
        m["target_unit"] = dataset.target_unit   # heatmaps and colour bars name it
    groups, folds = cv_groups(dataset.observation_groups(), folds)
    bags = Bags.from_index(dataset.bag_index, len(dataset.targets)) if dataset.is_bagged else None
    units = units_of(dataset)
    card_extra = {"units": units["units"], "cv_scheme": _cv_scheme(folds, groups),
                  "training": [{"name": dataset.name, "source": str(dataset.source), "n_spots": len(dataset.targets),
                                "n_slides": 0 if dataset.groups is None else int(dataset.groups.nunique()),
                                "platforms": units["platforms"]}]}
    report = fit_head_on_features(
        X, dataset.targets[panel].to_numpy(), panel, head=head, params=params,
        transform=transform, folds=folds, groups=groups,
        seed=seed, out_dir=out_dir, feature_meta=meta, sweep=sweep, trials=trials, n_jobs=n_jobs,
        progress=progress, ids=list(dataset.targets.index) if bags is not None else features.ids, bag=bag,
        bags=bags, subtile_um=dataset.subtile_um, extra=card_extra,
    )
    _write_fit_card(out_dir, dataset.targets[panel])
    report["out_dir"] = str(out_dir)
    report["replaced_backbones"] = replaced
    report["random_init_backbones"] = [s.name for s in specs if s.is_random_init]
    return report
