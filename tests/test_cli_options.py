"""Every command's options, tried as a newcomer would: a bad value fails before any work with one
`Error:` line (a usage mistake, such as a bad choice, reads alike), exit code 2, no traceback and nothing written."""
import re
import typing
from pathlib import Path

import click
import pytest
import torch
import typer
from typer.testing import CliRunner

from hexpr import pipeline
from hexpr import workflow
from hexpr.embedder.demo_data import write_demo_dataset
from hexpr.embedder.errors import ModelError, OutputExistsError, UsageError
from hexpr.pipeline import app

runner = CliRunner()
BACKBONE = "test_resnet:weights=none,size=32"
ERROR, USAGE = "error", "usage"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with tiny generated data, a fitted model, a slide image, and files/folders in the way."""
    root = tmp_path_factory.mktemp("options")
    write_demo_dataset(root / "data", n_train=8, n_test=4, n_genes=4, size=16, seed=0)
    r = run("fit-head", root / "data" / "train.csv", "-b", BACKBONE, "--no-pretrained", "--folds", 2,
            "--out", root / "model", "--cache-dir", root / "model-cache", "--quiet")
    assert r.exit_code == 0, r.output
    (root / "a-file.txt").write_text("in the way\n")
    (root / "a-folder").mkdir()
    (root / "a-folder" / "keep.txt").write_text("x\n")
    for name, payload in (("truncated", (root / "model" / "model.safetensors").read_bytes()[:200]),
                          ("foreign", b"not a model at all\n")):
        (root / name).mkdir()
        (root / name / "config.json").write_bytes((root / "model" / "config.json").read_bytes())
        (root / name / "model.safetensors").write_bytes(payload)
    (root / "foreign" / "config.json").write_text("not json\n")
    (root / "broken-ft").mkdir()
    (root / "broken-ft" / "finetuned.pt").write_bytes(b"PK\x03\x04 truncated")
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 120, 160)).save(root / "slide.png")
    return root


# (command line after the command name, with {w} = the work folder; kind)
TRAIN, TEST, MODEL = "{w}/data/train.csv", "{w}/data/test.csv", "{w}/model"
EMBED = ["embed", TRAIN, "-b", BACKBONE, "--no-pretrained", "--cache-dir", "{w}/cache", "--quiet"]
FIT = ["fit-head", TRAIN, "-b", BACKBONE, "--no-pretrained", "--cache-dir", "{w}/cache", "--out", "{w}/new-model", "--quiet"]
PREDICT = ["predict", MODEL, TEST, "--cache-dir", "{w}/cache", "--out", "{w}/pred.csv", "--quiet"]
SLIDE = ["predict-slide", MODEL, "{w}/slide.png", "--um-per-px", "1", "--cache-dir", "{w}/cache", "--out", "{w}/maps", "--quiet"]
FINETUNE = ["finetune", TRAIN, "-b", BACKBONE, "--no-pretrained", "--out", "{w}/ft", "--quiet"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

CASES = [
    (EMBED + ["--device", "cuda"], ERROR, "no CUDA device is available here"),
    (EMBED + ["--device", "gpu0"], ERROR, "--device 'gpu0' is not a device"),
    (EMBED + ["--precision", "fp16"], USAGE, "Error: --precision: "),
    (EMBED + ["--workers", "-3"], ERROR, "--workers must be"),
    (EMBED + ["--batch-size", "0"], ERROR, "--batch-size must be"),
    (EMBED + ["--chunk-size", "0"], ERROR, "--chunk-size must be"),
    (["inspect", TRAIN, "--out", "{w}/insp", "--method", "umap"], USAGE, "Error: --method: "),
    (["inspect", TRAIN, "--out", "{w}/insp", "--n-top", "0"], ERROR, "--n-top must be"),
    (["inspect", TRAIN, "--out", "{w}/a-file.txt"], ERROR, "is an existing file"),
    (PREDICT + ["--format", "xyz"], USAGE, "Error: --format: "),
    (PREDICT + ["--out", "{w}/a-folder"], ERROR, "is an existing folder"),
    (PREDICT + ["--out", "{w}/a-file.txt/p.csv"], ERROR, "is a file, not a folder"),
    (PREDICT + ["--batch-size", "0"], ERROR, "--batch-size must be"),
    (PREDICT + ["--device", "cuda"], ERROR, "no CUDA device is available here"),
    (["predict", "{w}/truncated", TEST, "--cache-dir", "{w}/cache", "--quiet"], ERROR, "checksum mismatch"),
    (["predict", "{w}/foreign/config.json", TEST, "--cache-dir", "{w}/cache", "--quiet"], ERROR, "not a readable hexpr model config"),
    (["predict", "{w}/broken-ft", TEST, "--cache-dir", "{w}/cache", "--quiet"], ERROR, "pass --trust-pickle"),
    (SLIDE + ["--tile-um", "0"], ERROR, "--tile-um must be a number > 0"),
    (SLIDE + ["--tile-um-per-px", "0"], ERROR, "--tile-um-per-px must be a number > 0"),
    (SLIDE + ["--stride-um", "-5"], ERROR, "--stride-um must be"),
    (SLIDE + ["--min-tissue", "1.5"], ERROR, "--min-tissue must be a number >= 0 and <= 1"),
    (SLIDE + ["--um-per-px", "0"], ERROR, "--um-per-px must be"),
    (SLIDE + ["--out", "{w}/a-file.txt"], ERROR, "is an existing file"),
    (SLIDE + ["--workers", "-1"], ERROR, "--workers must be"),
    (SLIDE + ["--precision", "half"], USAGE, "Error: --precision: "),
    (FIT + ["--head", "rigde"], USAGE, "unknown head 'rigde'"),
    (FIT + ["--transform", "log1p+zscore"], USAGE, "unknown target transform"),
    (FIT + ["--folds", "1"], ERROR, "--folds must be an integer >= 2"),
    (FIT + ["--seed", "-1"], ERROR, "--seed must be"),
    (FIT + ["--jobs", "0"], ERROR, "--jobs must be"),
    (FIT + ["--neighbours", "-1"], ERROR, "--neighbours must be"),
    (FIT + ["--trials", "0"], ERROR, "--trials must be"),
    (FIT + ["--batch-size", "0"], ERROR, "--batch-size must be"),
    (FIT + ["--out", "{w}/a-file.txt"], ERROR, "not a folder"),
    (FINETUNE + ["--loss", "l1"], USAGE, "Error: --loss: "),
    (FINETUNE + ["--schedule", "step"], USAGE, "Error: --schedule: "),
    (FINETUNE + ["--transform", "minmax+x"], USAGE, "unknown target transform"),
    (FINETUNE + ["--epochs", "-1"], ERROR, "epochs"),
    (FINETUNE + ["--lr", "0"], ERROR, "lr=0.0 is not accepted"),
    (FINETUNE + ["--folds", "1"], ERROR, "folds"),
    (FINETUNE + ["--patience", "0"], ERROR, "patience"),
    (FINETUNE + ["--val-fold", "-5"], ERROR, "val_fold"),
    (FINETUNE + ["--device", "cuda"], ERROR, "no CUDA device is available here"),
    (FINETUNE + ["--workers", "-2"], ERROR, "--workers must be"),
    (FINETUNE + ["--out", "{w}/a-file.txt"], ERROR, "is an existing file"),
    (["evaluate", "{w}/data/test_truth.csv", "{w}/data/test_truth.csv", "--n-top", "0"], ERROR, "--n-top must be"),
    (["evaluate", "{w}/data/test_truth.csv", "{w}/data/test_truth.csv", "--out-dir", "{w}/a-file.txt"], ERROR,
     "is an existing file"),
    (["plot", "{w}/data/test_truth.csv", "{w}/data/test_truth.csv", "--out", "{w}/plots", "--n-genes", "0"], ERROR,
     "--n-genes must be"),
    (["plot", "{w}/data/test_truth.csv", "{w}/data/test_truth.csv", "--out", "{w}/a-file.txt"], ERROR, "is an existing file"),
    (["demo", "--workdir", "{w}/demo", "--head", "nope"], USAGE, "unknown head 'nope'"),
    (["demo", "--workdir", "{w}/demo", "--folds", "1"], ERROR, "--folds must be"),
    (["demo", "--workdir", "{w}/demo", "--n-train", "2"], ERROR, "n_train"),
    (["demo-data", "{w}/dd", "--seed", "-1"], ERROR, "seed"),
    (["demo-data", "{w}/dd", "--size", "8"], ERROR, "size"),
    (["import", "{w}/data", "--out", "{w}/imp", "--kind", "merfish"], USAGE, "Error: --kind: "),
    (["import", "{w}/data", "--out", "{w}/imp", "--normalize", "cpm"], USAGE, "Error: --normalize: "),
    (["import", "{w}/data", "--out", "{w}/imp", "--output", "zarr"], USAGE, "Error: --output: "),
    (["import", "{w}/data", "--out", "{w}/imp", "--patch-um", "0"], ERROR, "patch_um"),
    (["import", "{w}/data", "--out", "{w}/a-file.txt"], ERROR, "is an existing file"),
]


@pytest.mark.parametrize("args,kind,says", [
    pytest.param(a, k, s, marks=NO_CUDA if "cuda" in a else (), id=" ".join(a[:1] + a[-2:]).replace("{w}/", ""))
    for a, k, s in CASES])
def test_bad_option_fails_before_any_work(work, monkeypatch, args, kind, says):
    monkeypatch.chdir(work)  # default outputs (cache/, inspect/, ...) would land here too
    before = files_under(work)
    r = run(*[a.replace("{w}", str(work)) for a in args])
    output = " ".join(r.output.split())  # undo rich's wrapping
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, (AssertionError, TypeError, AttributeError))
    assert says in output, r.output
    error_lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, r.output
    if kind == USAGE:   # typer's usage errors read like hexpr's: one line, no usage box
        assert "Usage:" not in r.output and "not one of 'pca'" not in r.output, r.output
    assert files_under(work) == before  # no cache, no output folder, nothing half-written


def test_python_callers_get_the_same_checks(work):
    with pytest.raises(UsageError, match="--batch-size"):
        workflow.embed(work / "data" / "train.csv", workflow.backbone_specs([BACKBONE], None, True),
                       work / "cache", batch_size=0)
    with pytest.raises(UsageError, match="--tile-um"):
        workflow.predict_slide(work / "model", [work / "slide.png"], work / "maps", tile_um=0.0)
    with pytest.raises(OutputExistsError):
        workflow.predict(work / "model", work / "data" / "test.csv", out=work / "a-folder")
    with pytest.raises(ModelError, match="checksum mismatch"):
        workflow.load_predictor(work / "truncated")
    with pytest.raises(ModelError, match="unknown loss 'mse\\+pearsn'"):
        workflow.finetune(work / "data" / "train.csv", [], work / "ft", loss="mse+pearsn")
    assert not (work / "cache").exists() and not (work / "maps").exists() and not (work / "ft").exists()


def commands() -> dict[str, click.Command]:
    return typer.main.get_command(app).commands


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {p.opts[0]}" for name, cmd in commands().items() for p in cmd.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("name", sorted(commands()))
def test_help_reads_whole(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = run(name, "--help")
    text = re.sub(r"\b[A-Z_]+\.\.\.", "", r.output)     # argument names that take several values: SLIDES...
    assert r.exit_code == 0 and "…" not in text and "..." not in text, r.output
    if "--backbone" in r.output:  # the whole -b spec syntax
        text = " ".join(r.output.split())
        for key in ("weights = PATH | pretrained | none", "mean = a/b/c", "size = N", "crop_pct", "timm.create_model"):
            assert key in text.replace("│ ", ""), r.output


def test_cli_choices_are_the_librarys():
    from hexpr.embedder.extract import PRECISIONS
    from hexpr.embedder.importers import KINDS
    from hexpr.embedder.importers.options import NORMALIZATIONS, OUTPUTS
    from hexpr.heads.finetune_model import LRSchedule
    from hexpr.heads.mlp import LOSSES
    from hexpr.heads.targets import TRANSFORMS
    from hexpr.workflow.explore import MAP_METHODS
    from hexpr.workflow.prediction import PREDICTION_FORMATS

    pairs = [(pipeline.Precision, PRECISIONS), (pipeline.PredictionFormat, PREDICTION_FORMATS),
             (pipeline.MapMethod, MAP_METHODS), (pipeline.ImportKind, KINDS), (pipeline.Normalization, NORMALIZATIONS),
             (pipeline.ImportOutput, OUTPUTS), (pipeline.FinetuneLoss, tuple(LOSSES)), (pipeline.Schedule, LRSchedule.KINDS)]
    for literal, library in pairs:
        assert tuple(typing.get_args(literal)) == tuple(library)
    for name in workflow.head_names():
        assert f" {name} " in pipeline.HEAD_HELP.replace("|", " ").replace(",", " ")
    for name in TRANSFORMS:
        assert name in pipeline.TRANSFORM_HELP
