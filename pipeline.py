"""hexpr command line: parse options, call one library function, print the result."""
from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="hexpr: predict spatial gene expression from H&E patches. Embed once, fit many heads.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

# ----------------------------------------------------------------------------- shared options
BackboneOpt = Annotated[Optional[list[str]], typer.Option(
    "--backbone", "-b",
    help="timm model, repeatable: NAME[:weights=PATH|pretrained|none,mean=a/b/c,std=a/b/c,size=N,"
         "interpolation=bicubic,crop_pct=0.875,<timm kwarg>=value]. Default: efficientnet_b1 and "
         "vit_small_patch16_224.augreg_in1k.")]
BackboneConfigOpt = Annotated[Optional[Path], typer.Option("--backbone-config", help="JSON/YAML list of backbone specs.")]
NoPretrainedOpt = Annotated[bool, typer.Option("--no-pretrained", help="Random-init weights (testing only; recorded in the cache).")]
CacheDirOpt = Annotated[Path, typer.Option("--cache-dir", help="Where embeddings are cached.")]
TtaOpt = Annotated[bool, typer.Option("--tta", help="Average features over the 8 dihedral flips/rotations.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="DataLoader workers (default: CPUs - 1, at most 8).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
ChunkOpt = Annotated[int, typer.Option("--chunk-size", help="Rows per resumable chunk written to disk.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _show_warning(message, category, filename, lineno, file=None, line=None):
    console.print(f"[yellow]Warning:[/yellow] {message}", highlight=False)


def _friendly_errors(func):
    """Known input/config problems print one clear line and exit 2; nothing else is swallowed."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from embedder.backbones import BackboneError
        from embedder.cache import CacheError
        from embedder.datasets import DatasetError
        from heads.evaluation import EvaluationError

        warnings.showwarning = _show_warning
        try:
            return func(*args, **kwargs)
        except (DatasetError, BackboneError, CacheError, EvaluationError, FileExistsError, FileNotFoundError) as exc:
            console.print(f"[bold red]Error:[/bold red] {exc}", highlight=False)
            raise typer.Exit(2) from None
    return wrapper


def _specs(backbone, backbone_config, no_pretrained):
    from embedder.backbones import resolve_specs

    return resolve_specs(backbone, backbone_config, no_pretrained)


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
    n_train: int = 600, n_test: int = 200, n_genes: int = 200, size: int = 224, seed: int = 0,
    overwrite: bool = False,
):
    """Write a synthetic H&E-like dataset in the challenge layout (train.csv, test.csv, test_truth.csv, sample_submission.csv)."""
    from embedder.demo_data import write_demo_dataset

    paths = write_demo_dataset(out_dir, n_train=n_train, n_test=n_test, n_genes=n_genes, size=size, seed=seed, overwrite=overwrite)
    _print_mapping("demo dataset", {k: v for k, v in paths.items()})


@app.command()
@_friendly_errors
def embed(
    data: Annotated[Path, typer.Argument(help="Challenge CSV, HEST .h5 patch file, or folder with patches/.")],
    backbone: BackboneOpt = None, backbone_config: BackboneConfigOpt = None, no_pretrained: NoPretrainedOpt = False,
    cache_dir: CacheDirOpt = Path("cache"), tta: TtaOpt = False, batch_size: BatchOpt = 64,
    workers: WorkersOpt = None, device: DeviceOpt = "auto", chunk_size: ChunkOpt = 512, quiet: QuietOpt = False,
):
    """Embed every patch with frozen backbones and cache the features (resumes after an interruption)."""
    import workflow

    features = workflow.embed(data, _specs(backbone, backbone_config, no_pretrained), cache_dir, tta=tta,
                              batch_size=batch_size, num_workers=workers, device=device, chunk_size=chunk_size,
                              progress=not quiet)
    table = Table(title=f"embeddings of {data}")
    for column in ("backbone", "weights", "width", "cache file"):
        table.add_column(column)
    for block in features.blocks:
        table.add_row(block["spec"]["name"], str(block["identity"]["weights"]), str(block["stop"] - block["start"]), block["path"])
    out.print(table)


@app.command()
@_friendly_errors
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="CSV (ID + genes) or .h5ad of predictions, e.g. from predict or oof_predictions.csv.")],
    truth: Annotated[Path, typer.Argument(help="Truth: CSV (ID + genes), a training dataset, or an .h5ad.")],
    n_top: Annotated[int, typer.Option(help="Genes in the HEG/HVG panels.")] = 50,
    genes: Annotated[Optional[Path], typer.Option(help="File of gene names (one per line): also report mean Pearson over them.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where to write scores JSON and per-gene CSV (default: beside predictions).")] = None,
):
    """Challenge score (MeanCorr spots, MaxCorr genes, HEG, HVG) plus per-gene Pearson."""
    import workflow

    report = workflow.evaluate(predictions, truth, out_dir=out_dir, n_top=n_top, gene_list_path=genes)
    keys = ["score", "mean_corr_cells", "max_corr_genes", "heg_corr", "hvg_corr", "mean_corr_genes", "mean_corr_hvg",
            "mean_corr_gene_list", "n_spots", "n_genes", "n_constant_spots", "n_constant_genes", "scores_json", "per_gene_csv"]
    _print_mapping(f"{predictions} vs {truth}", {k: report[k] for k in keys if k in report})


def main():  # console-script entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    sys.exit(main())
