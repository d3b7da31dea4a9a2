"""hexpr command line: parse options, call one library function, print the result."""
from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.markup import escape  # noqa: F401 (for commands that print rich markup)
from rich.table import Table

from hexpr import workflow
from hexpr.cli_support import HexprTyper, Output, VersionOpt, emit, error_line, json_option, notice
from hexpr.cli_support import err as console
from hexpr.embedder.errors import HexprError, RandomInitWarning

app = HexprTyper(
    help="hexpr: predict spatial gene expression from H&E patches. Embed once, fit many heads.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
out = Output()   # results: stdout (tab-separated tables and unwrapped lines in a pipe)


@app.callback()
def _root(version: VersionOpt = False):
    """hexpr: predict spatial gene expression from H&E patches. Embed once, fit many heads."""


# ----------------------------------------------------------------------------- choices
# Fixed choices are typed here, so typer lists them in --help and refuses others before any work;
# tests/test_cli_options.py checks each list against the library's own. Heads and target transforms
# are checked by workflow (registry names) in an option callback.
Precision = Literal["auto", "fp32", "bf16"]
PredictionFormat = Literal["csv", "h5ad"]
MapMethod = Literal["pca", "tsne"]
ImportKind = Literal["auto", "legacy_st", "visium", "hest", "visium_hd", "xenium"]
Normalization = Literal["log1p_cp10k", "none"]
ImportOutput = Literal["hest", "challenge"]
FinetuneLoss = Literal["mse", "huber", "logcosh", "pearson", "mse+pearson", "weighted_mse"]
Schedule = Literal["cosine", "plateau", "constant"]


def _library_check(check):
    """An option callback: the workflow check ``check`` (a HexprError) as typer's usage error."""
    def callback(value):
        if value is None:
            return value
        try:
            return check(value)
        except HexprError as exc:
            raise typer.BadParameter(str(exc)) from None
    return callback


def _check_head(name):
    return workflow.check_head(name)


def _check_transform(spec):
    return workflow.check_transform(spec)


HEAD_HELP = ("Head: mean | ridge | hest | mlp | gbm | knn | bleep | ensemble | bagged | ridge_streamed | mlp_streamed | "
             "auto (ridge, bagged mlp or their blend, with or without neighbour context or context scales, picked by "
             "grouped CV).")
TRANSFORM_HELP = "none | log1p | standardize | robust | minmax, or a chain of them joined by '+' (e.g. log1p+standardize)."

# ----------------------------------------------------------------------------- shared options
# Input paths are checked by typer (exists=True) or a light workflow check before any heavy import:
# a mistyped path is reported in well under a second (benchmarks/cli_latency.py).
BackboneOpt = Annotated[Optional[list[str]], typer.Option(
    "--backbone", "-b",
    help="Backbone, repeatable: a timm model NAME, optionally followed by :KEY=VALUE pairs joined by commas, "
         "e.g. resnet18:weights=none,size=48. Keys: weights = PATH | pretrained | none; mean = a/b/c; std = a/b/c; "
         "size = N (input px); interpolation = bicubic | bilinear | nearest; crop_pct = 0.875; any other key is passed "
         "to timm.create_model. Default: efficientnet_b1 and vit_small_patch16_224.augreg_in1k.")]
BackboneConfigOpt = Annotated[Optional[Path], typer.Option("--backbone-config", help="JSON/YAML list of backbone specs.", exists=True)]
NoPretrainedOpt = Annotated[bool, typer.Option("--no-pretrained", help="Random-init weights (testing only; recorded in the cache).")]
CacheDirOpt = Annotated[Path, typer.Option("--cache-dir", help="Where embeddings are cached.")]
TtaOpt = Annotated[bool, typer.Option("--tta", help="Average features over the 8 dihedral flips/rotations.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward pass, >= 1 (default: 16 on CPU, 128 on CUDA).")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="DataLoader workers, >= 0; 0 decodes in the main process "
                                                                     "(default: CPUs - 1, at most 8; on CPU at most 4).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (auto: the GPU when there is one).")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="auto (bf16 on CUDA and bf16-capable CPUs) | fp32 | bf16.")]
ChunkOpt = Annotated[int, typer.Option("--chunk-size", help="Rows per resumable chunk written to disk, >= 1.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
# a mistyped model folder is reported before any heavy import; a Hugging Face id is resolved by the use case
ModelArg = Annotated[str, typer.Argument(help="Model folder written by fit-head or finetune, or a Hugging Face model id "
                                                "org/name[@revision].",
                                         callback=_library_check(lambda path: str(workflow.check_model_path(path))))]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Also load an OLD model saved as a pickle (model.joblib / "
                                              "finetuned.pt). Unpickling runs any code the file's author put in it: only for "
                                              "models you trust. Better: hexpr convert-model once.")]
IntervalOpt = Annotated[float, typer.Option("--interval", help="Coverage of the conformal prediction intervals (h5ad layers "
                                                             "lower/upper), strictly between 0 and 1.")]
ContextOpt = Annotated[Optional[str], typer.Option(
    "--context-um", help="Context scales: also embed squares of these sizes in µm (comma-separated, e.g. 336,672) around "
                         "each spot, cut from its source slide, and append their features (needs a dataset written by "
                         "hexpr import; each size larger than the patch).")]
RawOpt = Annotated[bool, typer.Option("--no-clip", "--raw", help="Raw predictions: do not clip them to the training targets' range.")]


_LIBRARY_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, SyntaxWarning)
_SHOWN: set[tuple[str, str]] = set()   # warnings printed by this command (Python's "once" forgets after catch_warnings)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """One unwrapped line on stderr, once per text: ``Note:`` for information (a ``...Note`` category), else ``Warning:``."""
    if (category.__name__, str(message)) in _SHOWN:
        return
    _SHOWN.add((category.__name__, str(message)))
    notice(str(message), "[dim]Note:[/dim]" if category.__name__.endswith("Note") else "[yellow]Warning:[/yellow]")


def _friendly_errors(func):
    """A user's mistake (any ``HexprError``) prints one clear line and exits 2; nothing else is swallowed."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _show_warning
        warnings.simplefilter("once")
        for noise in _LIBRARY_NOISE:   # other libraries' deprecations and syntax warnings say nothing to a user
            warnings.filterwarnings("ignore", category=noise)
        _SHOWN.clear()
        try:
            return func(*args, **kwargs)
        except HexprError as exc:
            error_line(str(exc))
            raise typer.Exit(2) from None
    return wrapper


def _notes_random_init(func):
    """For a command that ends with the random-init NOTE: the same fact is not also a warning (said once)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomInitWarning)
            return func(*args, **kwargs)
    return wrapper


def _specs(backbone, backbone_config, no_pretrained):
    return workflow.backbone_specs(backbone, backbone_config, no_pretrained)


def _print_mapping(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(str(key), f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


# ----------------------------------------------------------------------------- commands
@app.command("demo-data")
@_friendly_errors
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to create (must be empty or absent).")],
    n_train: Annotated[int, typer.Option(help="Training spots (>= 4).")] = 600,
    n_test: Annotated[int, typer.Option(help="Test spots (>= 1).")] = 200,
    n_genes: Annotated[int, typer.Option(help="Genes (>= 2).")] = 200,
    size: Annotated[int, typer.Option(help="Patch side in pixels (>= 16).")] = 224,
    seed: Annotated[int, typer.Option(help="Random seed (>= 0); the same seed writes the same data.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUT_DIR.")] = False,
):
    """Write a synthetic H&E-like dataset in the challenge layout (train.csv, test.csv, test_truth.csv, sample_submission.csv)."""
    paths = workflow.write_demo_dataset(out_dir, n_train=n_train, n_test=n_test, n_genes=n_genes, size=size, seed=seed, overwrite=overwrite)
    _print_mapping("demo dataset", {k: v for k, v in paths.items()})


@app.command()
@_friendly_errors
def embed(
    data: Annotated[Path, typer.Argument(help="Challenge CSV, HEST .h5 patch file, or folder with patches/.", exists=True)],
    backbone: BackboneOpt = None, backbone_config: BackboneConfigOpt = None, no_pretrained: NoPretrainedOpt = False,
    cache_dir: CacheDirOpt = Path("cache"), tta: TtaOpt = False, batch_size: BatchOpt = None,
    workers: WorkersOpt = None, device: DeviceOpt = "auto", precision: PrecisionOpt = "auto", chunk_size: ChunkOpt = 512,
    context_um: ContextOpt = None, quiet: QuietOpt = False,
):
    """Embed every patch with frozen backbones and cache the features (resumes after an interruption)."""
    features = workflow.embed(data, _specs(backbone, backbone_config, no_pretrained), cache_dir, tta=tta, context_um=context_um,
                              batch_size=batch_size, num_workers=workers, device=device, precision=precision, chunk_size=chunk_size,
                              progress=not quiet)
    table = Table(title=f"embeddings of {data}")
    for column in ("backbone", "weights", "field of view", "width", "cache file"):
        table.add_column(column)
    for block in features.blocks:
        view = f"{block['context_um']:g} µm context ({block['n_padded']} padded)" if "context_um" in block else "patch"
        table.add_row(block["spec"]["name"], str(block["identity"]["weights"]), view, str(block["stop"] - block["start"]),
                      block["path"])
    out.print(table)


@app.command()
@_friendly_errors
@json_option
def backbones(
    local_only: Annotated[bool, typer.Option("--local", help="Only presets whose weights were found on this machine.")] = False,
):
    """List the named backbone presets (pathology foundation models and the ImageNet defaults): width, input size,
    parameters, token pooling, licence, and where their weights were found locally (no network calls)."""
    rows = [r for r in workflow.backbone_presets() if r["weights_local"] or not local_only]

    def render(report):
        table = Table(title="backbone presets (use as -b NAME or -b NAME:weights=PATH)")
        for column in ("name", "dim", "input", "params", "pooling", "licence", "weights here"):
            table.add_column(column, overflow="fold")
        for r in report["presets"]:
            table.add_row(r["name"], str(r["dim"]), r["input"], str(r["params"]), r["pooling"], r["licence"],
                          r["weights_local"] or f"no ({r['hub_repo']})")
        out.print(table)
    emit({"presets": rows}, render)


@app.command("clean-cache")
@_friendly_errors
def clean_cache(cache_dir: CacheDirOpt = Path("cache")):
    """Delete unfinished embeddings that interrupted runs left in the cache (finished cache files are kept)."""
    removed = workflow.clean_cache(cache_dir)
    for info in removed:
        out.print(f"removed {info['path']} ({info['n_chunks']} chunks, {info['bytes'] / 1e6:.1f} MB)")
    out.print(f"{len(removed)} unfinished embedding folder(s) removed, {sum(i['bytes'] for i in removed) / 1e6:.1f} MB freed")


@app.command()
@_friendly_errors
@json_option
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="CSV (ID + genes) or .h5ad of predictions, e.g. from predict or oof_predictions.csv.", exists=True)],
    truth: Annotated[Path, typer.Argument(help="Truth: CSV (ID + genes), a training dataset, or an .h5ad.", exists=True)],
    n_top: Annotated[int, typer.Option(help="Genes in the HEG/HVG panels (>= 1).")] = 50,
    genes: Annotated[Optional[Path], typer.Option(help="File of gene names (one per line): also report mean Pearson over them.", exists=True)] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where to write scores JSON and per-gene CSV (default: beside predictions).")] = None,
    plots: Annotated[bool, typer.Option("--plots", help="Also write the plots of `hexpr plot` into the output folder.")] = False,
):
    """Challenge score (MeanCorr spots, MaxCorr genes, HEG, HVG) plus per-gene Pearson."""
    report = workflow.evaluate(predictions, truth, out_dir=out_dir, n_top=n_top, gene_list_path=genes)
    if plots:
        made = workflow.plot(predictions, truth, Path(report["scores_json"]).parent / f"{predictions.stem}_plots", n_top=n_top)
        report["plots"] = str(Path(made["pearson_distribution"]).parent)
    keys = ["score", "mean_corr_cells", "max_corr_genes", "heg_corr", "hvg_corr", "mean_corr_genes", "mean_corr_hvg",
            "mean_corr_gene_list", "n_spots", "n_genes", "n_constant_spots", "n_constant_genes", "scores_json", "per_gene_csv",
            "plots"]
    emit(report, lambda r: _print_mapping(f"{predictions} vs {truth}", {k: r[k] for k in keys if k in r}))


def _params(pairs: list[str] | None) -> dict:
    import json

    params = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq:
            raise typer.BadParameter(f"--param {pair!r} is not key=value")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def _print_cv(report: dict) -> None:
    terms = {"score": "score", "mean_corr_cells": "MeanCorr spots", "max_corr_genes": "MaxCorr genes", "heg_corr": "HEG",
             "hvg_corr": "HVG", "pearson_all_genes": "r all genes", "pearson_hvg": "r top HVG"}
    features = "" if report["features"] == "features" else f", features {report['features']}"
    table = Table(title=f"{report['n_folds']}-fold CV ({'grouped' if report['grouped'] else 'KFold'}), "
                        f"{report['n_spots']} spots x {report['n_genes']} genes{features}")
    table.add_column("", no_wrap=True)
    for label in terms.values():
        table.add_column(label, justify="right")
    for i, fold in enumerate(report.get("folds", [])):
        held_out = f" ({', '.join(fold['held_out'])})" if fold.get("held_out") else ""   # the section(s) it held out
        table.add_row(f"fold {i + 1}{held_out}", *(f"{fold.get(t, float('nan')):.4f}" for t in terms))
    table.add_row(f"[bold]{report['head']}", *(f"[bold]{report['cv'].get(t, float('nan')):.4f}" for t in terms))
    table.add_row("mean head", *(f"{report['mean_head'].get(t, float('nan')):.4f}" for t in terms))
    out.print(table)
    if report.get("sweep"):
        out.print(f"sweep: {report['sweep']['n_configs']} configs ({report['sweep']['search']}); best {report['sweep']['best']}; "
                  f"leaderboard {report['sweep']['leaderboard']}")
    if report.get("auto"):
        auto = report["auto"]
        blends = f" and {auto['n_blends']} blends" if auto.get("n_blends") else ""
        out.print(f"auto: {auto['n_candidates']} candidates{blends} by CV score: "
                  + "; ".join(f"{c['recipe']} {c['score']:.4f}" for c in auto["candidates"])
                  + f"\nauto chose {auto['chosen']} (leaderboard {auto['leaderboard']})", markup=False, highlight=False)
    replaced = f"; it replaced a model fitted on {report['replaced_backbones']}" if report.get("replaced_backbones") else ""
    out.print(f"model saved in {report['out_dir']} (out-of-fold predictions: {report['files']['oof_predictions']}){replaced}")


def _random_init_notice(names: list[str]) -> None:
    if names:
        console.print(f"[bold yellow]NOTE:[/bold yellow] backbones without pretrained weights (random init): {', '.join(names)}. "
                      "Scores show the pipeline works, not what pretrained features reach.", highlight=False, soft_wrap=True)


@app.command("fit-head")
@_friendly_errors
@json_option
@_notes_random_init
def fit_head(
    data: Annotated[Path, typer.Argument(help="Training data: challenge CSV with gene columns, or HEST .h5/folder with .h5ad.", exists=True)],
    head: Annotated[str, typer.Option("--head", help=HEAD_HELP, callback=_library_check(_check_head))] = "ridge",
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Head hyper-parameter key=value (JSON values), repeatable.")] = None,
    transform: Annotated[str, typer.Option(help="Target transform: " + TRANSFORM_HELP,
                                           callback=_library_check(_check_transform))] = "none",
    folds: Annotated[int, typer.Option(help="Cross-validation folds, >= 2 (GroupKFold when the data has groups).")] = 5,
    sweep: Annotated[Optional[Path], typer.Option(help="YAML/JSON grid: {param: [values]} (use 'features' to sweep backbones).", exists=True)] = None,
    trials: Annotated[Optional[int], typer.Option(help="Random search: this many configs (>= 1) from the head's default space.")] = None,
    sweep_backbones: Annotated[bool, typer.Option("--sweep-backbones", help="Rank each backbone and their concatenation by CV.")] = False,
    genes: Annotated[Optional[str], typer.Option(help="Gene panel from the training data: hvg:N, heg:N, or a file of names.")] = None,
    neighbours: Annotated[int, typer.Option(help="Append the mean embedding of the k nearest spots (needs coordinates); 0: none.")] = 0,
    centre_slides: Annotated[bool, typer.Option("--centre-slides", help="Subtract each slide's mean embedding from its spots "
                                                "(removes slide-wide stain and scanner shifts; predict centres each new "
                                                "slide by its own mean). auto tries it by itself.")] = False,
    bag: Annotated[Optional[int], typer.Option(help="Average the head over N seeds (seed, seed+1 and so on); 1: no bagging "
                                                    "(auto's mlp: 5).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (>= 0) of the folds and the head.")] = 0,
    jobs: Annotated[int, typer.Option(help="Parallel sweep configs, >= 1 (-1: all cores).")] = -1,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Model folder, replaced as a whole (default cache/models/<data>__<head>, "
                                                                      "plus __sweep or __backbone-sweep for sweeps).")] = None,
    backbone: BackboneOpt = None, backbone_config: BackboneConfigOpt = None, no_pretrained: NoPretrainedOpt = False,
    cache_dir: CacheDirOpt = Path("cache"), tta: TtaOpt = False, context_um: ContextOpt = None, batch_size: BatchOpt = None,
    workers: WorkersOpt = None, device: DeviceOpt = "auto", quiet: QuietOpt = False,
):
    """Fit a head on cached embeddings with cross-validation (and sweeps); refit on all data and save it."""
    report = workflow.fit_head(data, _specs(backbone, backbone_config, no_pretrained), head=head, params=_params(param),
                               transform=transform, folds=folds, sweep=sweep, trials=trials, sweep_backbones=sweep_backbones,
                               seed=seed, n_jobs=jobs, out_dir=out_dir, cache_dir=cache_dir, tta=tta, genes=genes,
                               neighbours=neighbours, bag=bag, context_um=context_um, centre_slides=centre_slides,
                               progress=not quiet, batch_size=batch_size, num_workers=workers, device=device)
    emit(report, _print_cv)
    _random_init_notice(report["random_init_backbones"])


@app.command()
@_friendly_errors
@json_option
def predict(
    model: ModelArg,
    data: Annotated[Path, typer.Argument(help="Patches to predict: challenge CSV (ID, path) or HEST .h5/folder.", exists=True)],
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Output .csv or .h5ad (default <model>/predictions/<data>.csv).")] = None,
    fmt: Annotated[Optional[PredictionFormat], typer.Option("--format", help="csv | h5ad (default from --out's suffix).")] = None,
    template: Annotated[Optional[Path], typer.Option(help="sample_submission.csv fixing ids/columns (default: the one beside DATA).", exists=True)] = None,
    interval: IntervalOpt = 0.9, raw: RawOpt = False,
    trust_pickle: TrustPickleOpt = False,
    cache_dir: CacheDirOpt = Path("cache"), batch_size: BatchOpt = None, workers: WorkersOpt = None,
    device: DeviceOpt = "auto", quiet: QuietOpt = False,
):
    """Predict expression for new patches with a fitted head (embeds them with the head's own backbones).
    Clipped to the training range; .h5ad output adds layers std (bagged heads), lower and upper (intervals)."""
    result = workflow.predict(model, data, out=out_path, fmt=fmt, cache_dir=cache_dir, template=template,
                              progress=not quiet, batch_size=batch_size, num_workers=workers, device=device,
                              interval=interval, clip=not raw, trust_pickle=trust_pickle)
    def render(r):
        layers = f" with layers {', '.join(r['layers'])}" if r.get("layers") else ""
        out.print(f"wrote {r['n_spots']} spots x {r['n_genes']} genes to {r['out']}{layers}")
    emit(result, render)


@app.command("predict-slide")
@_friendly_errors
@json_option
def predict_slide(
    model: ModelArg,
    slides: Annotated[list[Path], typer.Argument(help="Slide files (TIFF/SVS, NDPI/MRXS/SCN via OpenSlide, JPEG/PNG) or folders of them.", exists=True)],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder: one <slide>/ folder per slide.")] = Path("slide-predictions"),
    um_per_px: Annotated[Optional[float], typer.Option("--um-per-px", help="Slide µm per pixel, > 0 (needed when the slide does not record it, e.g. JPEG/PNG; refused when it differs from the slide's own by > 10% unless --force-um-per-px).")] = None,
    force_um_per_px: Annotated[bool, typer.Option("--force-um-per-px", help="Use --um-per-px even where it disagrees with the slide's recorded scale by more than 10%.")] = False,
    tile_um: Annotated[Optional[float], typer.Option("--tile-um", help="Tile side in µm, > 0 (default: the model's training patch, else 112).")] = None,
    tile_um_per_px: Annotated[Optional[float], typer.Option("--tile-um-per-px", help="Tile pixel size in µm for the model, > 0 (default: the model's, else 0.5).")] = None,
    stride_um: Annotated[Optional[float], typer.Option("--stride-um", help="Tile step in µm, > 0 (default: the tile side; smaller = overlap).")] = None,
    resolution_um: Annotated[Optional[float], typer.Option("--resolution-um", help="Map cell side in µm: a whole multiple of the model's (sub-)tile; each cell is the mean of its sub-tiles' predictions (default: the sub-tile).")] = None,
    min_tissue: Annotated[float, typer.Option("--min-tissue", help="Keep tiles with at least this share of tissue, 0 to 1.")] = 0.25,
    gene: Annotated[Optional[list[str]], typer.Option("--gene", help="Gene to draw a heatmap of, repeatable (default: the 3 most variable predicted).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing <out>/<slide> folders.")] = False,
    outputs: Annotated[Optional[str], typer.Option("--outputs", help="Comma-separated outputs per slide: h5ad, geojson, heatmaps, spatialdata (needs hexpr[spatialdata]), viewer (a browser page; OUT/index.html links several) (default: h5ad,geojson,heatmaps).")] = None,
    geojson_genes: Annotated[Optional[str], typer.Option("--geojson-genes", help="Genes in tiles.geojson: this many most variable predicted (+ every --gene), or 'all' (default: 50).")] = None,
    gene_sets: Annotated[Optional[Path], typer.Option("--gene-sets", help="Gene programs to score per tile: .gmt, or a CSV/TSV of set,gene rows.", exists=True)] = None,
    interval: IntervalOpt = 0.9, raw: RawOpt = False,
    trust_pickle: TrustPickleOpt = False,
    cache_dir: CacheDirOpt = Path("cache"), batch_size: BatchOpt = None, workers: WorkersOpt = None,
    device: DeviceOpt = "auto", precision: PrecisionOpt = "auto", quiet: QuietOpt = False,
):
    """Predict expression over whole H&E slides: tissue tiles -> .h5ad, QuPath GeoJSON, heatmaps, SpatialData."""
    result = workflow.predict_slide(model, slides, out_dir, um_per_px=um_per_px, force_um_per_px=force_um_per_px,
                                    tile_um=tile_um, tile_um_per_px=tile_um_per_px,
                                    stride_um=stride_um, min_tissue=min_tissue, genes=gene, overwrite=overwrite,
                                    outputs=outputs, geojson_genes=geojson_genes, gene_sets=gene_sets,
                                    cache_dir=cache_dir, progress=not quiet, batch_size=batch_size, num_workers=workers,
                                    device=device, precision=precision, interval=interval, clip=not raw,
                                    resolution_um=resolution_um, trust_pickle=trust_pickle)

    def render(report):
        tile = report["tile"]
        table = Table(title=f"predict-slide: tiles of {tile['tile_um']:g} µm at {tile['tile_um_per_px']:g} µm/px ({tile['source']})")
        for column in ("slide", "µm/px", "tiles (tissue/grid)", "seconds", "tiles/s", "output"):
            table.add_column(column)
        for path, r in report["slides"].items():
            table.add_row(str(path), f"{r['um_per_px']:.4g} ({r['um_per_px_source']})", f"{r['n_tiles']}/{r['n_grid_tiles']}",
                          str(r["seconds"]), str(r["tiles_per_second"]), str(r["out_dir"]))
        out.print(table)
        viewers = [str(Path(r["out_dir"]) / f) for r in report["slides"].values() for f in r["outputs"].get("viewer", [])]
        for page in viewers:
            out.print(f"viewer: {page}", soft_wrap=True, highlight=False)
        if report.get("index"):
            out.print(f"index of every slide: {report['index']}", soft_wrap=True, highlight=False)
    if result["slides"]:   # under torchrun sharing tiles, rank 0 writes and reports
        emit(result, render)
    if result["failed"]:
        n_all = len(result["failed"]) + len(result["slides"])
        error_line(f"{len(result['failed'])} of {n_all} slides failed (why: the warnings above), the others were "
                   f"written: {', '.join(result['failed'])}")
        raise typer.Exit(1)


@app.command("convert-model")
@_friendly_errors
def convert_model(
    old: Annotated[Path, typer.Argument(help="Old model folder holding model.joblib or finetuned.pt (a pickle).")],
    new: Annotated[Optional[Path], typer.Argument(help="New folder (default: convert OLD in place, removing the pickle).")] = None,
):
    """Convert an old pickled model to the safetensors format. This unpickles the old file once, which runs any
    code in it: convert only models you trust. The converted model must predict bit-identically, or nothing is written."""
    result = workflow.convert_model(old, new)
    out.print(f"converted {result['old']} to {result['out']} ({', '.join(result['files'])}); it loads without --trust-pickle")


@app.command("export-model")
@_friendly_errors
def export_model(
    model: ModelArg,
    out_dir: Annotated[Path, typer.Argument(help="New folder to upload, e.g. huggingface-cli upload ORG/NAME OUT_DIR.")],
    repo_id: Annotated[Optional[str], typer.Option("--repo-id", help="The hub id it will have (org/name): the card's usage lines name it (default ORG/NAME).")] = None,
):
    """Write a hub-ready copy of a model: README.md card, config.json, model.safetensors (no caches, no predictions)."""
    result = workflow.export_model(model, out_dir, repo_id=repo_id)
    out.print(f"wrote {', '.join(result['files'])} to {result['out']}; upload with: huggingface-cli upload "
              f"{repo_id or 'ORG/NAME'} {result['out']}")


@app.command()
@_friendly_errors
def view(
    folder: Annotated[Path, typer.Argument(help="A slide folder predict-slide wrote (OUT/<slide>), or its --out folder.")],
    slide: Annotated[Optional[Path], typer.Option("--slide", help="The slide file's new place, when it moved since predict-slide.")] = None,
    pyramid: Annotated[bool, typer.Option("--pyramid/--no-pyramid", help="Cut a tile pyramid from the slide (default), or draw the maps over the thumbnail stored in predictions.h5ad.")] = True,
    quiet: QuietOpt = False,
):
    """Write the browser viewer (OUT/<slide>/viewer/index.html) of maps predict-slide already wrote; it opens from disk."""
    result = workflow.view(folder, slide=slide, pyramid=pyramid, progress=not quiet)
    for page, r in result["viewers"].items():
        pyramid_text = (f"pyramid {r['pyramid_tiles']:,} tiles, {r['pyramid_bytes'] / 1e6:.1f} MB" if r["pyramid"]
                        else "no pyramid (thumbnail)")
        out.print(f"wrote {page}: {r['n_tiles']:,} tiles x {r['n_genes']:,} genes, {pyramid_text}, "
                  f"{r['gene_bytes_each'] / 1e3:.1f} kB per gene, {r['seconds']} s", soft_wrap=True, highlight=False)
    if result["index"]:
        out.print(f"index of every slide: {result['index']}", soft_wrap=True, highlight=False)


@app.command()
@_friendly_errors
@_notes_random_init
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the demo's data, cache, model and outputs.")] = Path("hexpr-demo"),
    n_train: Annotated[int, typer.Option(help="Generated training spots (>= 4).")] = 600,
    n_test: Annotated[int, typer.Option(help="Generated test spots (>= 1).")] = 200,
    n_genes: Annotated[int, typer.Option(help="Generated genes (>= 2).")] = 200,
    size: Annotated[int, typer.Option(help="Generated patch side in pixels (>= 16).")] = 224,
    head: Annotated[str, typer.Option("--head", help=HEAD_HELP, callback=_library_check(_check_head))] = "ridge",
    folds: Annotated[int, typer.Option(help="Cross-validation folds, >= 2.")] = 3,
    backbone: BackboneOpt = None, quiet: QuietOpt = False,
):
    """Run the whole pipeline offline on a generated dataset and print the score beside the training-mean baseline."""
    specs = workflow.backbone_specs(backbone, None, no_pretrained=True)
    result = workflow.demo(workdir, n_train=n_train, n_test=n_test, n_genes=n_genes, size=size, specs=specs,
                           head=head, folds=folds, progress=not quiet)
    test, base = result["test"], result["test_mean_baseline"]
    table = Table(title=f"hexpr demo: {head} on {', '.join(result['backbones'])} ({result['seconds']} s)")
    for column in ("", "score", "MeanCorr spots", "MaxCorr genes", "HEG", "HVG"):
        table.add_column(column, justify="right")
    for label, s in ((f"{head}, held-out test", test), ("training mean, held-out test", base)):
        table.add_row(label, *(f"{s[k]:.4f}" for k in ("score", "mean_corr_cells", "max_corr_genes", "heg_corr", "hvg_corr")))
    out.print(table)
    out.print(f"CV score {result['cv_score']:.4f} (mean head {result['cv_mean_head_score']:.4f}); predictions {result['predictions']}")
    _random_init_notice(result["random_init_backbones"])


@app.command()
@_friendly_errors
def plot(
    predictions: Annotated[Path, typer.Argument(help="Predictions: CSV (ID + genes) or .h5ad.", exists=True)],
    truth: Annotated[Path, typer.Argument(help="Truth: CSV, a dataset (HEST folder/.h5 gives coordinates and thumbnails) or .h5ad.", exists=True)],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the PNG files.")] = Path("plots"),
    gene: Annotated[Optional[list[str]], typer.Option("--gene", help="Genes to map (repeatable; default: best-predicted of the top HVG).")] = None,
    n_genes: Annotated[int, typer.Option(help="Genes to map when --gene is not given (>= 1).")] = 4,
):
    """Per-gene Pearson distribution, predicted-vs-measured scatter, and spatial maps over the slide thumbnail."""
    made = workflow.plot(predictions, truth, out_dir, genes=gene, n_genes=n_genes)
    for key in ("pearson_distribution", "scatter"):
        out.print(f"{key}: {made[key]}")
    for sample, path in (made.get("spatial_maps") or {}).items():
        out.print(f"spatial map {sample}: {path}")
    for note in made.get("notes", []):
        notice(note)


@app.command()
@_friendly_errors
@json_option
def inspect(
    data: Annotated[Path, typer.Argument(help="Training data with expression (challenge CSV, HEST folder/.h5, or .h5ad).", exists=True)],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for summary.json and the PNG views.")] = Path("inspect"),
    n_top: Annotated[int, typer.Option(help="Top genes for the heatmap / highlights (>= 1).")] = 50,
    method: Annotated[MapMethod, typer.Option(help="2-D map of spots: pca | tsne.")] = "pca",
):
    """Dataset summary (spots, genes, groups, ranges, constant genes, outlier spots) and exploratory plots."""
    result = workflow.inspect_dataset(data, out_dir, n_top=n_top, method=method)

    def render(result):
        summary = result["summary"]
        groups, values = summary.get("groups", {}), summary.get("values", {})
        outliers, constant = summary.get("outlier_spots", {}), summary.get("constant_genes", {})
        _print_mapping(f"inspect {data}", {
            "spots": summary["n_spots"], "genes": summary["n_genes"],
            "groups": ", ".join(f"{g} ({n})" for g, n in (groups.get("counts") or {}).items()) or "none",
            "values": f"{values.get('kind', '?')}: {values.get('kind_reason', '')}",
            "constant genes": f"{constant.get('n', 0)} (e.g. {', '.join((constant.get('names') or [])[:5])})",
            "outlier spots": f"{outliers.get('n', 0)} (e.g. {', '.join((outliers.get('ids') or [])[:5])})",
        })
        for name, path in result["files"].items():
            out.print(f"{name}: {path}")
    emit(result, render)
    for note in result.get("notes", []):
        notice(note)


@app.command("import")
@_friendly_errors
@json_option
def import_(
    source: Annotated[list[Path], typer.Argument(help="her2st-style legacy ST root, Space Ranger (Visium / Visium HD) or Xenium output folder(s), or HEST-1k root.", exists=True)],
    out_dir: Annotated[Path, typer.Option("--out", help="Dataset folder to write (patches/ + st/, or PNG + dataset.csv).")],
    kind: Annotated[ImportKind, typer.Option(help="Source layout: auto (detected) | legacy_st | visium | hest | visium_hd | xenium.")] = "auto",
    patch_um: Annotated[float, typer.Option(help="Patch side in micrometres, > 0.")] = 112.0,
    um_per_px: Annotated[float, typer.Option(help="Patch resolution in µm/px, > 0 (0.5 -> 112 µm = 224 px, HEST's convention).")] = 0.5,
    source_um_per_px: Annotated[Optional[float], typer.Option(help="Slide µm/px, > 0, when it cannot be derived (scalefactors or spot grid).")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Full-resolution slide image when not found in the folder.", exists=True)] = None,
    sample: Annotated[Optional[list[str]], typer.Option(help="Only these sample ids (legacy ST/HEST) or names (Visium), repeatable.")] = None,
    normalize: Annotated[Normalization, typer.Option(help="log1p_cp10k | none (raw counts are kept in layers['counts']).")] = "log1p_cp10k",
    filter_background: Annotated[bool, typer.Option(help="Drop mostly-white patches.")] = False,
    output: Annotated[ImportOutput, typer.Option(help="hest (patch .h5 + .h5ad) | challenge (PNG + CSV).")] = "hest",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder as a whole "
                                                                "(without it, an existing dataset is refused).")] = False,
    tile_um: Annotated[Optional[float], typer.Option(help="Visium HD / Xenium: tile side in µm, >= the bin size (default: --patch-um); a bin size keeps the bins.")] = None,
    min_tile_counts: Annotated[int, typer.Option(help="Visium HD / Xenium: drop tiles (or cells) with fewer counts, >= 0.")] = 10,
    alignment: Annotated[Optional[Path], typer.Option(help="Xenium: H&E registration, the 10x alignment matrix CSV (H&E px -> morphology px) or a Xenium Explorer keypoints CSV.")] = None,
    per_cell: Annotated[bool, typer.Option(help="Xenium: one observation per cell (patch centred on its centroid) instead of tiles.")] = False,
    pool_spots: Annotated[Optional[int], typer.Option(help="Pool K x K neighbouring spots of the grid into one observation (summed counts; the spots' patches are its sub-tiles).")] = None,
    subtile_um: Annotated[Optional[float], typer.Option(help="Cut each spot's footprint into sub-tiles of this side in µm (sets the patch size).")] = None,
    quiet: QuietOpt = False,
):
    """Cut spot-centred patches from slides at a fixed µm size and write a dataset hexpr trains on."""
    summary = workflow.import_dataset(source if len(source) > 1 else source[0], out_dir, kind=kind, patch_um=patch_um,
                             target_um_per_px=um_per_px, source_um_per_px=source_um_per_px, normalize=normalize,
                             filter_background=filter_background, output=output, sample_ids=sample, progress=not quiet,
                             image=image, overwrite=overwrite, tile_um=tile_um,
                             min_tile_counts=min_tile_counts, alignment=alignment, per_cell=per_cell,
                             pool_spots=pool_spots, subtile_um=subtile_um)

    def render(summary):
        table = Table(title=f"imported {summary['kind']} -> {summary['out_dir']} ({summary['seconds']} s)")
        for column in ("sample", "patches", "µm/px slide", "padded", "dropped (outside/background)"):
            table.add_column(column)
        for name, info in summary["samples"].items():
            table.add_row(name, str(info.get("n_patches")), f"{info.get('source_um_per_px', float('nan')):.4f}",
                          str(info.get("n_padded", 0)),
                          f"{info.get('n_outside_dropped', 0)}/{info.get('n_background_dropped', 0)}")
        out.print(table)
        if summary.get("pool_spots") or summary.get("subtile_um"):
            out.print(f"bags: {summary['n_observations']} observations over {summary['n_patches']} sub-tile patches")
        out.print(f"{summary['n_patches']} patches of {summary['patch_size_px']} px ({summary['patch_um']} µm), "
                  f"{summary['n_genes']} genes ({summary['n_genes_dropped']} not shared by all samples dropped)")
    emit(summary, render)


@app.command("hest-bench")
@_friendly_errors
def hest_bench(
    task: Annotated[Path, typer.Argument(help="HEST-Bench task folder (splits/, patches/, adata/, var_50genes.json).")],
    head: Annotated[Optional[list[str]], typer.Option("--head", help="Head(s), repeatable (default: hest, the published "
                                                                       "PCA-256 + ridge probe). " + HEAD_HELP)] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for <task>.json and <task>.csv.")] = Path("hest-bench"),
    seed: Annotated[int, typer.Option(help="Random seed (>= 0) of seeded heads.")] = 0,
    backbone: BackboneOpt = None, backbone_config: BackboneConfigOpt = None, no_pretrained: NoPretrainedOpt = False,
    cache_dir: CacheDirOpt = Path("cache"), tta: TtaOpt = False, batch_size: BatchOpt = None,
    workers: WorkersOpt = None, device: DeviceOpt = "auto", quiet: QuietOpt = False,
):
    """HEST-Bench's protocol on a task: per split, fit on train samples, mean Pearson over the task's 50 genes on test."""
    report = workflow.hest_bench(task, _specs(backbone, backbone_config, no_pretrained), heads=tuple(head or ("hest",)),
                                 out_dir=out_dir, cache_dir=cache_dir, tta=tta, seed=seed, progress=not quiet,
                                 batch_size=batch_size, num_workers=workers, device=device)
    splits = [s["name"] for s in report["splits"]]
    table = Table(title=f"HEST-Bench {report['task']}: mean Pearson over {len(report['genes'])} genes "
                        f"(target log1p of raw counts)")
    for column in ("head", *splits, "mean ± std"):
        table.add_column(column)
    for name, res in report["heads"].items():
        table.add_row(name, *(f"{s['pearson_mean']:.4f}" for s in res["splits"]), f"{res['mean']:.4f} ± {res['std']:.4f}")
    out.print(table)
    out.print(f"wrote {report['files']['json']} and {report['files']['csv']}")


@app.command()
@_friendly_errors
@_notes_random_init
def finetune(
    data: Annotated[Path, typer.Argument(help="Training data with targets (challenge CSV or HEST).", exists=True)],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for checkpoints and the exported model.")] = Path("cache/finetuned"),
    head_init: Annotated[Optional[Path], typer.Option(help="Start the head from a fitted mlp head (fit-head model folder).", exists=True)] = None,
    loss: Annotated[FinetuneLoss, typer.Option(help="Training loss: mse | huber | logcosh | pearson | mse+pearson | weighted_mse.")] = "mse",
    transform: Annotated[str, typer.Option(help="Target transform (minmax, the challenge's choice): " + TRANSFORM_HELP,
                                           callback=_library_check(_check_transform))] = "minmax",
    epochs: Annotated[int, typer.Option(help="Training epochs, >= 0 (0: export the starting model, e.g. --head-init, untrained).")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per training step, >= 1.")] = 32,
    lr: Annotated[float, typer.Option(help="Backbone learning rate, > 0.")] = 1e-4,
    head_lr: Annotated[float, typer.Option(help="Head learning rate, > 0.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay, >= 0.")] = 0.05,
    warmup_epochs: Annotated[int, typer.Option(help="Epochs of linear learning-rate warmup, >= 0.")] = 1,
    schedule: Annotated[Schedule, typer.Option(help="Learning-rate schedule after warmup: cosine | plateau | constant.")] = "cosine",
    freeze_epochs: Annotated[int, typer.Option(help="Epochs training the head only before unfreezing the backbones.")] = 1,
    layer_decay: Annotated[Optional[float], typer.Option(help="Layer-wise learning-rate decay (e.g. 0.75).")] = None,
    accum_steps: Annotated[int, typer.Option(help="Gradient accumulation steps, >= 1.")] = 1,
    folds: Annotated[int, typer.Option(help="Folds the data is split into (>= 2); --val-fold picks the validation one.")] = 5,
    val_fold: Annotated[int, typer.Option(help="Which fold (grouped when groups exist) validates, 0 to folds-1; -1: none, train on all.")] = 0,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs (>= 1) without a better validation score.")] = 3,
    augment: Annotated[bool, typer.Option(help="H&E augmentations.")] = True,
    seed: Annotated[int, typer.Option(help="Random seed (>= 0) of folds, batches and augmentations.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --out.")] = False,
    backbone: BackboneOpt = None, backbone_config: BackboneConfigOpt = None, no_pretrained: NoPretrainedOpt = False,
    workers: WorkersOpt = None, device: DeviceOpt = "auto", quiet: QuietOpt = False,
):
    """Train the fused backbones + MLP head end to end; the best epoch is exported for `hexpr predict`."""
    terms = ("score", "mean_corr_cells", "max_corr_genes", "heg_corr", "hvg_corr")

    def on_epoch(row: dict) -> None:
        scores = ("  ".join(f"{t} {row['val_' + t]:.4f}" for t in terms) if "val_score" in row
                  else "no validation fold")
        out.print(f"epoch {row.get('epoch'):>3}  loss {row.get('train_loss', float('nan')):.4f}  {scores}"
                  + f"  {row.get('images_per_s', float('nan')):.1f} img/s  ETA {row.get('eta_s', float('nan')):.0f} s", highlight=False)

    specs = _specs(backbone, backbone_config, no_pretrained)
    report = workflow.finetune(data, specs, out_dir, head_init=head_init, loss=loss, transform=transform, epochs=epochs,
                          batch_size=batch_size, lr=lr, head_lr=head_lr, weight_decay=weight_decay,
                          warmup_epochs=warmup_epochs, schedule=schedule, freeze_epochs=freeze_epochs,
                          layer_decay=layer_decay, accum_steps=accum_steps, folds=folds, val_fold=None if val_fold == -1 else val_fold,
                          patience=patience, augment=augment, seed=seed, device=device, num_workers=workers,
                          resume=resume, progress=not quiet, on_epoch=on_epoch)
    chosen = (f"best epoch {report.get('best_epoch')}: validation score {report['best_score']:.4f}" if "best_score" in report
              else f"no validation fold: exported the last epoch ({report.get('best_epoch')})")
    out.print(f"{chosen}; model exported to {out_dir} (use: hexpr predict {out_dir} DATA)")
    _random_init_notice([s.name for s in specs if s.is_random_init])


def main():  # console-script entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    sys.exit(main())
