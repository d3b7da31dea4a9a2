"""The library entry point the CLI calls: cross-validate (optionally sweep), save, refit, persist.

``fit_head`` builds the model folder ``out_dir`` beside it and swaps it in as a whole at the end
(an error or Ctrl-C leaves an existing folder as it was); it holds:
  * ``oof_predictions.csv`` -- out-of-fold predictions (index = spot ids, columns = genes);
  * ``cv_report.json``      -- the report ``fit_head`` returns;
  * ``leaderboard.csv``     -- one row per sweep config, or per candidate of ``head="auto"``;
  * ``config.json`` + ``model.safetensors`` (+ ``lightgbm/``) -- a ``FittedModel`` refitted on all
    spots, in ``heads.model_files``' format (no pickle), with ``model.json`` beside it describing it
    for humans.
``load_model(path)`` reads a ``FittedModel`` back (an old pickled ``model.joblib`` only with
``trust_pickle=True``); its ``predict(X)`` refuses features of the wrong width. The library prints nothing except progress bars (stderr).
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.errors import MissingInputError, ModelError, OutputExistsError, brief
from hexpr.embedder.files import CSV_FLOAT_FORMAT, atomic_dir, json_ready, write_csv, write_json
from hexpr.heads.bagging import check_baggable
from hexpr.heads.bags import as_bags, check_bag_support, fit_on_bags
from hexpr.heads.base import HeadError, as_matrix, default_search_space, head_param_names, make_head
from hexpr.heads.cv import cross_validate, make_folds
from hexpr.heads.metrics import N_TOP_DEFAULT
from hexpr.heads.model_files import CONFIG_FILE, LEGACY_FILE, load_legacy_pickle, read_folder, refuse_pickles, write_folder
from hexpr.heads.sweep import (
    AUTO_BAG,
    as_feature_sets,
    auto_candidates,
    blend_rows,
    check_space,
    load_kept_cv,
    load_search_file,
    model_factory,
    ranked,
    run_sweep,
    score_configs,
    split_params,
    with_bag,
)
from hexpr.heads.targets import make_transform
from hexpr.heads.uncertainty import CONFORMAL_KEY, RANGE_KEY, calibrate, target_range

MODEL_FILE = CONFIG_FILE           # the file that makes a folder a model (with model.safetensors)
MODEL_KIND = "fitted-head"
MODEL_INFO_FILE = "model.json"
OOF_FILE = "oof_predictions.csv"
REPORT_FILE = "cv_report.json"
LEADERBOARD_FILE = "leaderboard.csv"
FORMAT_VERSION = 1
from hexpr.heads.registry import AUTO  # noqa: E402
SUBTILE_KEY = "subtile_um"     # FittedModel.extra: the side in µm of the sub-tiles a bag model was fitted on
BAG_SIDE_KEY = "subtiles_per_side"   # FittedModel.extra: sub-tiles along one side of the largest observation
BAGS_KEY = "bags"


@dataclass
class FittedModel:
    """A head fitted on all training spots plus what is needed to use it safely later."""

    model: object                 # a fitted head (TargetTransformed: predictions in target scale)
    genes: list[str]              # output column order
    feature_meta: dict            # caller's description of the expected features (cache keys, specs)
    n_features: int               # expected feature width
    config: dict                  # {"head", "features", "transform", "params"}
    cv: dict | None = None        # cross-validated summary of this config
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def transform(self) -> str:
        return str(self.config.get("transform", "none"))

    def checked_features(self, X) -> np.ndarray:
        """``X`` as a finite (N, n_features) matrix, or a HeadError saying which features the model needs."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            got = X.shape[1] if X.ndim == 2 else f"an array of shape {X.shape}"
            raise HeadError(
                f"this model expects {self.n_features} features per spot but got {got}; embed the "
                f"images with the same backbone(s) it was trained on ({describe_features(self.feature_meta)})")
        return as_matrix(X, "X (features)")

    def predict(self, X) -> np.ndarray:
        """(N, G) raw predictions in the training targets' scale, columns in ``self.genes`` order
        (``heads.uncertainty.predict_uncertain``: clipped, with spread and intervals)."""
        return self.model.predict(self.checked_features(X))

    def predict_frame(self, X, ids) -> pd.DataFrame:
        return pd.DataFrame(self.predict(X), index=pd.Index(list(ids), name="ID"), columns=self.genes)

    def save(self, folder) -> Path:
        """Write the model into ``folder`` (config.json + model.safetensors, no pickle)."""
        return write_folder(folder, {f.name: getattr(self, f.name) for f in fields(self)}, MODEL_KIND)


def describe_features(meta) -> str:
    """Short human description of ``feature_meta`` for error messages."""
    if not meta:
        return "no feature description was saved"
    blocks = meta.get("blocks") if isinstance(meta, Mapping) else None
    if blocks:
        return "feature blocks: " + ", ".join(str(b.get("key", b)) for b in blocks)
    return json.dumps(meta, default=str)[:300]


def load_model(path, trust_pickle: bool = False) -> FittedModel:
    """Read a ``FittedModel`` from a model folder (or its config.json). A folder holding only an old
    pickled ``model.joblib`` loads only with ``trust_pickle`` (unpickling runs any code in the file)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir() or (not path.is_dir() and not path.exists()):
        raise MissingInputError(f"no fitted model at {path}; fit one with `hexpr fit-head DATA`")
    if (folder / CONFIG_FILE).is_file() and path.name != LEGACY_FILE:
        content = read_folder(folder, MODEL_KIND)
        try:
            return FittedModel(**content)
        except TypeError as exc:
            raise ModelError(f"{folder / CONFIG_FILE}: not a fitted-head model ({brief(exc)})") from None
    if (folder / LEGACY_FILE).is_file():
        return _load_legacy(folder / LEGACY_FILE, trust_pickle)
    raise MissingInputError(f"no fitted model at {folder} (no {CONFIG_FILE}); fit one with `hexpr fit-head DATA`")


def _load_legacy(path: Path, trust_pickle: bool) -> FittedModel:
    if not trust_pickle:
        raise ModelError(f"{path} is an old hexpr model saved as a pickle, and loading a pickle runs any code its author "
                         "put in it. If you trust where it came from, pass --trust-pickle, or convert it once with "
                         f"`hexpr convert-model {path.parent}` (then it loads without the flag)")
    refuse_pickles(path.parent, allow=(LEGACY_FILE,))
    obj = load_legacy_pickle(path)
    if not isinstance(obj, FittedModel):
        raise ModelError(f"{path}: not a readable hexpr model (it holds a {type(obj).__name__}); refit with hexpr fit-head")
    return obj


# --------------------------------------------------------------------------------------------
# helpers of fit_head
# --------------------------------------------------------------------------------------------
def resolve_space(sweep, head: str) -> dict:
    """A search space from a file path, a mapping, or "default" (the head's own space)."""
    if isinstance(sweep, Mapping):
        return dict(sweep)
    if sweep is None or str(sweep) == "default":
        return default_search_space(head)
    return load_search_file(sweep)


def check_config(head: str, params: Mapping | None = None, transform="none", sweep=None,
                 trials: int | None = None, bag: int | None = None, bags: bool = False) -> dict | None:
    """Check a fit_head configuration before any work (HeadError naming what is wrong): the head,
    its params, the target transform, the bag size and, when sweeping, every value of the search
    space. ``head="auto"`` checks each param against the candidate heads that have it.
    ``bags``: the data has bags (observations over several sub-tiles): the head must learn from them.
    Returns the resolved search space (None without a sweep)."""
    make_transform(transform)
    if bags and head != AUTO:
        check_bag_support(head, params)
    if head == AUTO:
        if sweep is not None or trials is not None:
            raise HeadError("head 'auto' runs its own small search (ridge and a bagged mlp, with and without "
                            "neighbour context); drop --sweep/--trials, or sweep one head")
        split_params(params)
        check_baggable("mlp", None, AUTO_BAG if bag is None else bag)
        return None
    make_head(head, **dict(params or {}))
    if bag is not None:
        check_baggable(head, params, bag)
    if trials is not None and (isinstance(trials, bool) or int(trials) < 1):
        raise HeadError(f"--trials must be a number of configs >= 1, got {trials}")
    if sweep is None and trials is None:
        return None
    space = resolve_space(sweep, head)
    check_space(head, space, params)
    return space


def read_model_info(out_dir) -> dict | None:
    """``model.json`` of the model folder ``out_dir`` ({} when unreadable), or None when there is
    no folder or it is empty. A non-empty folder that holds no model is refused (FileExistsError):
    fit_head replaces its folder as a whole, so it must never be pointed at other data."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a folder; give --out a new or model folder")
    if not any(out_dir.iterdir()):
        return None
    if not any((out_dir / name).is_file() for name in (MODEL_FILE, MODEL_INFO_FILE, LEGACY_FILE)):
        raise OutputExistsError(f"{out_dir} is not empty and holds no fitted model; a model folder is replaced as a "
                              "whole, so give --out a new or empty folder (or a model folder)")
    try:
        return json.loads((out_dir / MODEL_INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _select_feature_meta(feature_meta, name: str, names: list[str]) -> dict:
    """When features come as named sets, ``feature_meta`` may be keyed by the same names (one
    mapping per set; auto on data without coordinates has a single named set)."""
    if (isinstance(feature_meta, Mapping) and set(feature_meta) == set(names)
            and (len(names) > 1 or isinstance(feature_meta[name], Mapping))):
        return dict(feature_meta[name])
    return dict(feature_meta or {})


def _check_inputs(feature_sets: dict, Y, gene_names, ids, bags=None) -> tuple[np.ndarray, list[str], list[str]]:
    Y = as_matrix(Y, "Y (targets)")
    genes = [str(g) for g in gene_names]
    if len(genes) != Y.shape[1]:
        raise HeadError(f"{len(genes)} gene names for {Y.shape[1]} target columns")
    if len(set(genes)) != len(genes):
        raise HeadError("gene names must be unique")
    ids = [str(i) for i in (range(Y.shape[0]) if ids is None else ids)]
    if len(ids) != Y.shape[0]:
        raise HeadError(f"{len(ids)} spot ids for {Y.shape[0]} target rows")
    rows = Y.shape[0] if bags is None else bags.n_patches
    for name, X in feature_sets.items():
        if np.shape(X)[0] != rows:
            what = f"{Y.shape[0]} spots" if bags is None else f"{bags.n_patches} sub-tiles"
            raise HeadError(f"feature set {name!r} has {np.shape(X)[0]} rows but there are {what}")
    return Y, genes, ids


def _single_config(head: str, params, transform, feature_sets: dict, features: str | None, seed: int) -> dict:
    names = list(feature_sets)
    if features is None:
        if len(names) > 1:
            raise HeadError(f"several feature sets given ({', '.join(names)}): pick one with "
                             "features=... or sweep over them")
        features = names[0]
    if features not in feature_sets:
        raise HeadError(f"unknown feature set {features!r}; have {', '.join(names)}")
    params = dict(params or {})
    if "seed" in head_param_names(head):
        params.setdefault("seed", seed)
    return {"head": head, "features": features, "transform": transform, "params": params}


def uncertainty_extra(Y: np.ndarray, cv) -> dict:
    """What ``heads.uncertainty.predict_uncertain`` needs, kept in ``FittedModel.extra``: the training
    targets' per-gene range and the conformal quantiles of the out-of-fold residuals (normalised by
    the out-of-fold member spread when the head is bagged)."""
    value_range = target_range(Y)
    try:
        return {RANGE_KEY: value_range,
                CONFORMAL_KEY: calibrate(Y, cv.oof, getattr(cv, "spread", None), value_range=value_range)}
    except ValueError:  # too few held-out spots to calibrate: the model predicts without intervals
        return {RANGE_KEY: value_range}


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------
def fit_head(X, Y, gene_names, *, head: str = "ridge", params: dict | None = None,
             transform: str = "none", folds=5, groups=None, seed: int = 0, out_dir,
             feature_meta: dict, sweep=None, trials: int | None = None, n_jobs: int = -1,
             progress: bool = True, ids=None, features: str | None = None,
             n_top: int = N_TOP_DEFAULT, bag: int | None = None, candidates: list[dict] | None = None,
             bags=None, subtile_um: float | None = None, extra: dict | None = None) -> dict:
    """Cross-validate ``head`` (after an optional sweep), save the artefacts, refit on all spots.

    X: (N, D) features, or a mapping name -> (N, D_name) to choose between backbones (a sweep
       picks the best; otherwise name one with ``features``).
    Y: (N, G) targets (array or DataFrame) in the scale predictions should come out in.
    folds: number of folds, or a list of (train_idx, test_idx). groups: per-spot slide/patient ids
       (grouped folds never split a group).
    sweep: None, a YAML/JSON file, a mapping param -> values, or "default" (the head's space);
       with ``trials`` random search, else a full grid. ``trials`` alone: random search over the
       head's default space. ``params`` are fixed in every config.
    bag: fit the chosen head ``bag`` times with seeds seed, seed+1, ... and average (N > 1; after a
       sweep, the best config is bagged).
    head="auto" (or ``candidates``: a list of configs, see ``heads.sweep.auto_candidates``): every
       candidate is cross-validated on the same folds, the best is refit; leaderboard.csv ranks them.
       Without ``candidates``, auto tries ridge and an mlp bagged over ``bag`` (default 5) seeds on
       every named feature set of ``X``, and ridge within slides when ``groups`` has two labels or more.
    bags: ``heads.bags.Bags`` (or a per-row observation index) when each observation of ``Y`` is
       measured over several rows of ``X`` (sub-tiles): heads learn so that the mean of their
       sub-tile predictions matches ``Y`` (see heads.bags); ``ids``, ``groups`` and folds are then
       per observation. ``subtile_um``: the sub-tiles' side in µm, recorded in the model.
    extra: JSON-able facts kept in ``FittedModel.extra`` (units, training data, CV scheme: the model card's).
    Returns the JSON-serialisable report also written to cv_report.json.
    """
    out_dir = Path(out_dir)
    read_model_info(out_dir)  # a folder that is not a model folder is never replaced
    with atomic_dir(out_dir) as work:
        return _fit_into(work, X, Y, gene_names, head=head, params=params, transform=transform, folds=folds,
                         groups=groups, seed=seed, out_dir=out_dir, feature_meta=feature_meta, sweep=sweep,
                         trials=trials, n_jobs=n_jobs, progress=progress, ids=ids, features=features, n_top=n_top,
                         bag=bag, candidates=candidates, bags=bags, subtile_um=subtile_um, extra=extra)


def _fit_into(work: Path, X, Y, gene_names, *, head, params, transform, folds, groups, seed, out_dir: Path,
              feature_meta, sweep, trials, n_jobs, progress, ids, features, n_top, bag=None, candidates=None,
              bags=None, subtile_um=None, extra=None) -> dict:
    """``fit_head``'s work: files are written into ``work``; the report names their final place in ``out_dir``."""
    started = time.perf_counter()
    feature_sets = as_feature_sets(X)
    bags = as_bags(bags, np.shape(Y)[0])
    Y, genes, ids = _check_inputs(feature_sets, Y, gene_names, ids, bags)
    groups = None if groups is None else np.asarray(groups)
    fold_list = make_folds(Y.shape[0], folds, groups, seed) if isinstance(folds, (int, np.integer)) else list(folds)

    sweep_info, auto_info, cv = None, None, None
    if bags is not None:
        for candidate in candidates or ([] if head == AUTO else [{"head": head, "params": params}]):
            check_bag_support(candidate["head"], candidate.get("params"))
    if head == AUTO or candidates is not None:
        if candidates is None:   # with two slides or more, ridge within slides too
            candidates = auto_candidates(list(feature_sets), params=params, transform=transform, seed=seed, bag=bag,
                                         within_slides=groups is not None and len(np.unique(groups)) >= 2)
        kept = work / ".candidates"
        kept.mkdir()
        result = score_configs(candidates, feature_sets, Y, fold_list, n_top=n_top, groups=groups, n_jobs=n_jobs,
                               progress=progress, description=f"auto: scoring {len(candidates)} candidates", keep_dir=kept,
                               bags=bags)
        blends = [] if bags is not None else blend_rows(result.rows, kept, Y, fold_list, n_top=n_top, groups=groups)
        if blends:   # ridge + mlp on one feature set, scored from their out-of-fold predictions
            result = ranked(result.rows + blends)
        config = result.best
        cv = load_kept_cv(kept, int(result.leaderboard["trial"].iloc[0]))  # the winner's CV, not run again
        shutil.rmtree(kept)
        write_csv(work / LEADERBOARD_FILE, result.leaderboard, index=False)
        columns = ["rank", "recipe", "score", "pearson_hvg", "pearson_all_genes", "seconds", "error"]
        auto_info = {"n_candidates": len(candidates), "n_blends": len(blends), "chosen": config.get("recipe", config["head"]), "config": config,
                     "leaderboard": str(out_dir / LEADERBOARD_FILE),
                     "candidates": result.leaderboard[[c for c in columns if c in result.leaderboard]].to_dict(orient="records")}
    elif sweep is not None or trials is not None:
        result = run_sweep(head, feature_sets, Y, fold_list, space=resolve_space(sweep, head),
                           n_trials=trials, transform=transform, fixed_params=params, n_top=n_top,
                           groups=groups, seed=seed, n_jobs=n_jobs, progress=progress, bags=bags)
        config = result.best
        write_csv(work / LEADERBOARD_FILE, result.leaderboard, index=False)
        sweep_info = {"n_configs": len(result.leaderboard), "search": "grid" if trials is None else "random",
                      "best": config, "leaderboard": str(out_dir / LEADERBOARD_FILE),
                      "top": result.leaderboard.head(5).drop(columns=["config"]).to_dict(orient="records")}
    else:
        config = _single_config(head, params, transform, feature_sets, features, seed)
    if auto_info is None and bag is not None and int(bag) > 1:
        config = with_bag(config, bag)

    X_chosen = as_matrix(feature_sets[config["features"]], "X (features)")
    factory = model_factory(config["head"], config["params"], config["transform"])
    if cv is None:
        cv = cross_validate(factory, X_chosen, Y, fold_list, n_top=n_top, groups=groups, progress=progress,
                            description=f"cross-validating {config['head']}", bags=bags)
    write_csv(work / OOF_FILE, pd.DataFrame(cv.oof, index=pd.Index(ids, name="ID"), columns=genes),
              float_format=CSV_FLOAT_FORMAT)

    refit_start = time.perf_counter()
    model = fit_on_bags(factory(), X_chosen, Y, bags, groups=groups)
    refit_seconds = time.perf_counter() - refit_start
    meta = _select_feature_meta(feature_meta, config["features"], list(feature_sets))
    model_extra = {**(extra or {}), **uncertainty_extra(Y, cv)}
    if subtile_um is not None:
        model_extra[SUBTILE_KEY] = float(subtile_um)
    if bags is not None:
        model_extra[BAG_SIDE_KEY] = max(1, int(round(float(np.sqrt(bags.sizes.max())))))
        model_extra[BAGS_KEY] = {"n_observations": bags.n_obs, "n_subtiles": bags.n_patches,
                           "calibrated_on": "observations (region-level out-of-fold residuals)"}
    fitted = FittedModel(model=model, genes=genes, feature_meta=meta, n_features=X_chosen.shape[1],
                         config=config, cv=cv.report["model"], extra=model_extra)
    fitted.save(work)

    report = {
        "head": config["head"], "params": config["params"], "transform": config["transform"],
        "features": config["features"], "n_spots": int(Y.shape[0]), "n_features": int(X_chosen.shape[1]),
        "n_subtiles": None if bags is None else bags.n_patches, "subtile_um": subtile_um,
        "n_genes": len(genes), "n_folds": len(fold_list), "grouped": groups is not None, "seed": seed,
        "cv": cv.report["model"], "mean_head": cv.report["mean_head"],
        "ratio_to_mean": cv.report["ratio_to_mean"], "folds": cv.report["folds"],
        "sweep": sweep_info, "auto": auto_info, "refit_seconds": round(refit_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "files": {"oof_predictions": str(out_dir / OOF_FILE), "report": str(out_dir / REPORT_FILE),
                  "model": str(out_dir / MODEL_FILE), "model_info": str(out_dir / MODEL_INFO_FILE)},
    }
    report = json_ready(report)
    write_json(work / MODEL_INFO_FILE, {"format_version": FORMAT_VERSION, "config": config,
                                        "n_features": X_chosen.shape[1], "feature_meta": meta, "genes": genes,
                                        "cv": cv.report["model"], "subtile_um": subtile_um,
                                        "subtiles_per_side": model_extra.get(BAG_SIDE_KEY),
                                        "bags": model_extra.get(BAGS_KEY)})
    write_json(work / REPORT_FILE, report)
    return report
