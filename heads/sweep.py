"""Hyper-parameter sweeps: grid or random search, every configuration scored by cross-validation.

A *config* is ``{"head": name, "features": name, "transform": name, "params": {...}}`` (plus a
``trial`` number inside a sweep).
``features`` picks one of several named feature matrices (which backbone, or a concatenation),
so the backbone is a sweep dimension like any other; ``transform`` is the target transform.

Search spaces map a parameter (or "features" / "transform") to
  * a list of choices -- a grid enumerates them all, random search picks one per trial;
  * ``{"log": [low, high]}``, ``{"uniform": [low, high]}``, ``{"int": [low, high]}`` -- random
    search only.
Files: YAML (.yaml/.yml) or JSON with that mapping at the top level.
Configs run in parallel over CPU cores (joblib); each worker is held to one BLAS/torch thread.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed, effective_n_jobs
from threadpoolctl import threadpool_limits

from hexpr.embedder.files import read_config
from hexpr.heads.bagging import bagged_config
from hexpr.heads.base import HeadError, default_search_space, head_param_names, make_head, progress_task
from hexpr.heads.cv import METRICS, CVResult, cross_validate, score_oof
from hexpr.heads.metrics import N_TOP_DEFAULT
from hexpr.heads.targets import TargetTransformed, make_transform

RESERVED = ("features", "transform")
DISTRIBUTIONS = ("log", "uniform", "int")
DEFAULT_FEATURES_NAME = "features"


# --------------------------------------------------------------------------------------------
# spaces and configs
# --------------------------------------------------------------------------------------------
def load_search_file(path) -> dict:
    """A search space from a YAML or JSON file (param -> list of values or distribution)."""
    space = read_config(path)
    if not isinstance(space, dict) or not space:
        raise HeadError(f"{path}: a sweep file must hold a non-empty mapping of parameter -> values")
    return space


def _is_distribution(value) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _choices(name: str, value) -> list:
    """The grid values of one parameter; scalars are a single fixed choice."""
    if _is_distribution(value):
        raise HeadError(f"parameter {name!r} is a distribution {dict(value)}; a grid needs lists "
                         "of values -- ask for random search (n_trials) instead")
    if isinstance(value, (list, tuple)):
        if not value:
            raise HeadError(f"parameter {name!r} has an empty list of values")
        return list(value)
    return [value]


def expand_grid(space: Mapping) -> list[dict]:
    """Every combination of the listed values (param -> value dicts), in file order."""
    names = list(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*(_choices(n, space[n]) for n in names))]


def _draw(name: str, value, rng: np.random.Generator):
    if _is_distribution(value):
        kind, (low, high) = next(iter(value.items()))
        if kind == "log":
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
        if kind == "uniform":
            return float(rng.uniform(low, high))
        return int(rng.integers(int(low), int(high) + 1))
    choices = _choices(name, value)
    return choices[int(rng.integers(len(choices)))]


def sample_configs(space: Mapping, n_trials: int, seed: int = 0) -> list[dict]:
    """``n_trials`` random draws from ``space``, without repeats when the space is a finite grid."""
    rng = np.random.default_rng(seed)
    finite = not any(_is_distribution(v) for v in space.values())
    if finite:
        grid = expand_grid(space)
        if len(grid) <= n_trials:
            return grid
        return [grid[i] for i in sorted(rng.choice(len(grid), size=n_trials, replace=False))]
    return [{name: _draw(name, value, rng) for name, value in space.items()} for _ in range(int(n_trials))]


def make_configs(head: str, space: Mapping, *, n_trials: int | None, feature_names: list[str],
                 transform="none", fixed_params: Mapping | None = None, seed: int = 0) -> list[dict]:
    """Configs of ``head``: a full grid over ``space`` (n_trials None) or ``n_trials`` random draws.

    Feature names not constrained by ``space`` are all tried; ``transform`` is the default target
    transform unless ``space`` sweeps it; ``fixed_params`` apply to every config.
    """
    space = dict(space)
    space.setdefault("features", list(feature_names))
    space.setdefault("transform", [transform])
    unknown_features = set(_choices("features", space["features"])) - set(feature_names)
    if unknown_features:
        raise HeadError(f"sweep names feature set(s) {sorted(unknown_features)} but only "
                         f"{sorted(feature_names)} were given")
    valid = set(head_param_names(head))
    unknown = sorted((set(space) | set(fixed_params or {})) - valid - set(RESERVED))
    if unknown:
        raise HeadError(f"head {head!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    draws = expand_grid(space) if n_trials is None else sample_configs(space, n_trials, seed)
    configs = []
    for draw in draws:
        params = {**(fixed_params or {}), **{k: v for k, v in draw.items() if k not in RESERVED}}
        if "seed" in valid:
            params.setdefault("seed", seed)
        configs.append({"trial": len(configs), "head": head, "features": draw["features"],
                        "transform": draw["transform"], "params": params})
    return configs


def check_space(head: str, space: Mapping, fixed_params: Mapping | None = None) -> None:
    """Refuse (HeadError) a space the head cannot run, before any work: unknown parameters, bad
    distributions, and any listed choice or distribution end that the head's constraints refuse."""

    unknown = sorted(set(space) - set(head_param_names(head)) - set(RESERVED))
    if unknown:
        raise HeadError(f"sweep: head {head!r} has no parameter(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(head_param_names(head))}")
    for name, value in space.items():
        if name == "features":
            continue
        if isinstance(value, Mapping) and not _is_distribution(value):
            raise HeadError(f"sweep: {name}={dict(value)} is neither a list of values nor one of "
                            f"{', '.join(f'{{{d}: [low, high]}}' for d in DISTRIBUTIONS)}")
        if _is_distribution(value):
            kind, ends = next(iter(value.items()))
            ok = isinstance(ends, (list, tuple)) and len(ends) == 2 and all(isinstance(e, (int, float)) for e in ends)
            if not ok or ends[0] > ends[1] or (kind == "log" and ends[0] <= 0):
                raise HeadError(f"sweep: {name}={dict(value)} needs [low, high] with low <= high"
                                f"{' and low > 0' if kind == 'log' else ''}")
            values = list(ends)
        else:
            values = _choices(name, value)
        for v in values:
            if name == "transform":
                make_transform(v)
            else:
                make_head(head, **{**dict(fixed_params or {}), name: v})


def model_factory(head: str, params: Mapping | None = None, transform="none"):
    """A zero-argument callable building the full model of a config: ``head`` behind ``transform``."""
    params = dict(params or {})
    make_head(head, **params)  # fail now, in the caller, on a bad parameter

    def build():
        return TargetTransformed(make_head(head, **params), transform)
    return build


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def _single_thread():
    """Hold this worker to one thread (BLAS, OpenMP, torch) so parallel configs do not oversubscribe."""
    os.environ["OMP_NUM_THREADS"] = "1"          # for libraries (torch) imported later in this worker
    threadpool_limits(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def evaluate_config(config: dict, X, Y, folds, n_top: int, groups, single_thread: bool, keep_dir=None,
                    bags=None) -> dict:
    """CV summary of one config (never raises: a failing config is reported with its error).
    ``keep_dir``: also save its out-of-fold predictions and CV report there (``load_kept_cv``)."""
    if single_thread:
        _single_thread()
    start = time.perf_counter()
    try:
        factory = model_factory(config["head"], config["params"], config["transform"])
        cv = cross_validate(factory, X, Y, folds, n_top=n_top, groups=groups, bags=bags)
        report = cv.report
        if keep_dir is not None:
            np.save(Path(keep_dir) / f"oof_{config['trial']}.npy", cv.oof)
            if cv.spread is not None:
                np.save(Path(keep_dir) / f"spread_{config['trial']}.npy", cv.spread)
            (Path(keep_dir) / f"cv_{config['trial']}.json").write_text(json.dumps(report, default=float))
        row = {**report["model"], "ratio_to_mean": report["ratio_to_mean"],
               "mean_head_score": report["mean_head"]["score"], "error": None}
    except Exception as exc:  # noqa: BLE001 - recorded in the leaderboard
        row = {m: float("nan") for m in METRICS} | {"error": f"{type(exc).__name__}: {exc}"}
    row["seconds"] = round(time.perf_counter() - start, 3)
    return {"config": config, **row}


def _cell(value):
    """Leaderboard cell: scalars as they are, lists/tuples/dicts as compact JSON."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return value


def leaderboard_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows sorted by CV score (best first, failures last), one column per swept parameter."""
    records = []
    for row in rows:
        config = row["config"]
        record = {k: v for k, v in row.items() if k != "config"}
        record.update({"trial": config["trial"], **({"recipe": config["recipe"]} if "recipe" in config else {}),
                       "head": config["head"], "features": config["features"], "transform": config["transform"]})
        record.update({(f"param_{k}" if k in record else k): _cell(v) for k, v in config["params"].items()})
        record["config"] = json.dumps(config, default=str, sort_keys=True)
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    frame = frame.sort_values(["score", "seconds"], ascending=[False, True], na_position="last",
                              kind="stable").reset_index(drop=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame


@dataclass
class SweepResult:
    leaderboard: pd.DataFrame   # one row per config, best first
    best: dict                  # the best config: {"head", "features", "transform", "params"}
    rows: list[dict]            # raw results (config + CV summary), in completion order


def as_feature_sets(features) -> dict[str, np.ndarray]:
    """A name -> matrix mapping from a mapping or a single matrix (named "features")."""
    if isinstance(features, Mapping):
        if not features:
            raise HeadError("no feature sets given")
        return {str(k): v for k, v in features.items()}
    return {DEFAULT_FEATURES_NAME: features}


def run_sweep(head: str, features, Y, folds, *, space: Mapping | None = None,
              n_trials: int | None = None, transform="none", fixed_params: Mapping | None = None,
              n_top: int = N_TOP_DEFAULT, groups=None, seed: int = 0, n_jobs: int = -1,
              progress: bool = True, bags=None) -> SweepResult:
    """Score every config of ``head`` by cross-validation on ``folds``; return the leaderboard.

    ``features``: one (N, D) matrix or a mapping name -> matrix (each config picks one by name).
    ``space``: param -> values/distribution (see module doc); a full grid when ``n_trials`` is
    None, else ``n_trials`` random draws. Default: the head's own random-search space with
    ``n_trials`` (20 when not given).
    """
    feature_sets = as_feature_sets(features)
    if space is None:
        space = default_search_space(head)
        n_trials = 20 if n_trials is None else n_trials
    configs = make_configs(head, space, n_trials=n_trials, feature_names=list(feature_sets),
                           transform=transform, fixed_params=fixed_params, seed=seed)
    return score_configs(configs, feature_sets, Y, folds, n_top=n_top, groups=groups, n_jobs=n_jobs,
                         progress=progress, description=f"sweep {head} ({len(configs)} configs)", bags=bags)


def load_kept_cv(keep_dir, trial: int):
    """The ``CVResult`` that ``score_configs(..., keep_dir=)`` saved for config ``trial``."""

    keep_dir = Path(keep_dir)
    spread = keep_dir / f"spread_{trial}.npy"
    return CVResult(oof=np.load(keep_dir / f"oof_{trial}.npy"), report=json.loads((keep_dir / f"cv_{trial}.json").read_text()),
                    spread=np.load(spread) if spread.is_file() else None)


def score_configs(configs: list[dict], features, Y, folds, *, n_top: int = N_TOP_DEFAULT, groups=None,
                  n_jobs: int = -1, progress: bool = True, description: str | None = None,
                  keep_dir=None, bags=None) -> SweepResult:
    """Cross-validate each given config (any heads, any of the named feature sets) on the same
    ``folds``, in parallel; the leaderboard ranks them by CV score. Configs get ``trial`` numbers
    in the given order. ``keep_dir`` (an existing folder): keep each config's out-of-fold
    predictions and CV report there, so the winner need not be cross-validated again."""
    feature_sets = as_feature_sets(features)
    configs = [{**{k: v for k, v in c.items() if k != "trial"}, "trial": i} for i, c in enumerate(configs)]
    if not configs:
        raise HeadError("no configs to score")
    missing = sorted({c["features"] for c in configs} - set(feature_sets))
    if missing:
        raise HeadError(f"configs name feature set(s) {missing} but only {sorted(feature_sets)} were given")
    n_workers = min(len(configs), effective_n_jobs(n_jobs))
    Y = np.asarray(Y, dtype=np.float64)
    tasks = (delayed(evaluate_config)(c, feature_sets[c["features"]], Y, folds, n_top, groups, n_workers > 1, keep_dir,
                                      bags)
             for c in configs)
    rows = []
    description = description or f"scoring {len(configs)} configs"
    with progress_task(description, len(configs), progress) as advance:
        for row in Parallel(n_jobs=n_workers, return_as="generator_unordered")(tasks):
            rows.append(row)
            advance()
    board = leaderboard_frame(rows)
    if board["score"].isna().all():
        raise RuntimeError(f"every config failed; first error: {board['error'].iloc[0]}")
    best = configs[int(board["trial"].iloc[0])]
    return SweepResult(leaderboard=board, best={k: v for k, v in best.items() if k != "trial"}, rows=rows)


# --------------------------------------------------------------------------------------------
# bagging and the "auto" recipe
# --------------------------------------------------------------------------------------------
AUTO_HEADS = ("ridge", "mlp")
WITHIN_SLIDES_RIDGE = "ridge within slides"   # auto's name for ridge(within_groups=True)
AUTO_BAG = 5


def _auto_kind(config: dict) -> str | None:
    """"ridge" or "mlp" (alone or bagged) for auto's candidates, else None."""
    head, params = config["head"], config.get("params") or {}
    if head == "bagged":
        head = params.get("head")
    return head if head in AUTO_HEADS else None


def _pairs(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(feature set, [ridge row, mlp row]) for each ridge candidate (plain or within slides) that has a
    successful mlp candidate on the same feature set, in candidate order."""
    by_set: dict[str, dict[str, list[dict]]] = {}
    for row in sorted(rows, key=lambda r: r["config"]["trial"]):
        kind = _auto_kind(row["config"])
        if kind is not None and row.get("error") is None and np.isfinite(row.get("score", np.nan)):
            by_set.setdefault(row["config"]["features"], {}).setdefault(kind, []).append(row)
    return [(features, [ridge, kinds["mlp"][0]]) for features, kinds in by_set.items()
            for ridge in kinds.get("ridge", []) if kinds.get("mlp")]


def blend_rows(rows: list[dict], keep_dir, Y, folds, *, n_top: int = N_TOP_DEFAULT, groups=None) -> list[dict]:
    """Leaderboard rows for auto's blends: on each feature set, each ridge candidate (plain, and
    within slides when tried) with the mlp candidate, where both succeeded: the equal-weight mean
    of the two, scored from their kept out-of-fold predictions (no model is fitted again). A blend's config is an ``ensemble`` head with fixed weights, so the
    refit predicts exactly what was scored. Its OOF predictions and CV report are kept like the
    others' (``load_kept_cv``)."""
    keep_dir = Path(keep_dir)
    trial = max(r["config"]["trial"] for r in rows) + 1
    blends = []
    for features, pair in _pairs(rows):
        members = [row["config"] for row in pair]
        if len({m["transform"] for m in members}) != 1:
            continue
        oof = np.mean([np.load(keep_dir / f"oof_{m['trial']}.npy") for m in members], axis=0)
        seconds = [sum(f["fit_seconds"] for f in fold) for fold in
                   zip(*(json.loads((keep_dir / f"cv_{m['trial']}.json").read_text())["folds"] for m in members))]
        cv = score_oof(oof, Y, folds, n_top=n_top, groups=groups, fit_seconds=seconds)
        config = {"recipe": " + ".join(m.get("recipe", m["head"]).replace(f" on {features}", "") for m in members)
                  + f" on {features}", "head": "ensemble", "features": features, "transform": members[0]["transform"],
                  "params": {"members": [{"head": m["head"], "params": m["params"]} for m in members],
                             "weights": [1.0] * len(members)}, "trial": trial}
        np.save(keep_dir / f"oof_{trial}.npy", cv.oof)
        (keep_dir / f"cv_{trial}.json").write_text(json.dumps(cv.report, default=float))
        blends.append({"config": config, **cv.report["model"], "ratio_to_mean": cv.report["ratio_to_mean"],
                       "mean_head_score": cv.report["mean_head"]["score"], "error": None,
                       "seconds": round(sum(row["seconds"] for row in pair), 3)})
        trial += 1
    return blends


def ranked(rows: list[dict]) -> SweepResult:
    """The leaderboard of ``rows`` (each holding its config) and its best config."""
    board = leaderboard_frame(rows)
    best = next(r["config"] for r in rows if r["config"]["trial"] == int(board["trial"].iloc[0]))
    return SweepResult(leaderboard=board, best={k: v for k, v in best.items() if k != "trial"}, rows=rows)
AUTO_NEIGHBOURS = 6
AUTO_CONTEXT_MULTIPLES = (3, 6)   # context scales auto tries: none, 3x, then 3x + 6x the patch size


def with_bag(config: dict, bag: int | None) -> dict:
    """``config`` with its head bagged over ``bag`` seeds (unchanged for None or 1)."""

    head, params = bagged_config(config["head"], config["params"], bag)
    return {**config, "head": head, "params": params}


def split_params(params: Mapping | None, heads=AUTO_HEADS) -> dict[str, dict]:
    """``params`` shared out to the heads that have them (HeadError for a parameter none has,
    or a value a head refuses): ``{"ridge": {...}, "mlp": {...}}``."""
    params = dict(params or {})
    names = {h: set(head_param_names(h)) for h in heads}
    unknown = sorted(k for k in params if not any(k in n for n in names.values()))
    if unknown:
        raise HeadError(f"head 'auto' tries {', '.join(heads)}, and none has parameter(s) {', '.join(unknown)}; "
                        + "; ".join(f"{h}: {', '.join(sorted(n))}" for h, n in names.items()))
    shared = {h: {k: v for k, v in params.items() if k in names[h]} for h in heads}
    for h, p in shared.items():
        make_head(h, **p)
    return shared


def auto_candidates(feature_names, *, params: Mapping | None = None, transform="none", seed: int = 0,
                    bag: int | None = None, within_slides: bool = False) -> list[dict]:
    """The configs ``fit-head --head auto`` scores: ridge and an mlp bagged over ``bag`` seeds
    (default 5), each on every named feature set (e.g. plain embeddings and embeddings with
    neighbour context). ``params`` go to the heads that have them. ``within_slides`` (the data has
    two slides or more): also ridge fitted within slides (``within_groups``) on every set."""
    bag = AUTO_BAG if bag is None else int(bag)
    shared = split_params(params)
    configs = []
    for features in feature_names:
        configs.append({"recipe": f"ridge on {features}", "head": "ridge", "features": features,
                        "transform": transform, "params": dict(shared["ridge"])})
        if within_slides:
            configs.append({"recipe": f"{WITHIN_SLIDES_RIDGE} on {features}", "head": "ridge", "features": features,
                            "transform": transform, "params": {"within_groups": True, **shared["ridge"]}})
        mlp = {"head": "mlp", "features": features, "transform": transform,
               "params": {"seed": seed, **shared["mlp"]}}
        configs.append({"recipe": f"mlp{f' bag{bag}' if bag > 1 else ''} on {features}", **with_bag(mlp, bag)})
    return configs
