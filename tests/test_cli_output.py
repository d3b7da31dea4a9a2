"""The command line's look (cli_support): help at 80 columns, one Error: line for usage mistakes,
upper-case metavars, --version, plain tab-separated output in a pipe, --json reports."""
import json
import subprocess
import sys

import pytest
import typer
from rich.table import Table
from typer.testing import CliRunner

import hexpr
from hexpr import cli_support
from hexpr.pipeline import app

runner = CliRunner()


def run(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def commands():
    return typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(commands()))
def test_help_at_80_columns_shows_every_option_name_whole(name):
    r = run(name, "--help", env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    words = set(r.output.replace(",", " ").replace("/", " ").split())
    names = [o for p in commands()[name].params for o in (*p.opts, *getattr(p, "secondary_opts", ())) if o.startswith("-")]
    assert [n for n in names if n not in words] == []           # (convert-model has arguments only)
    assert [line for line in r.output.splitlines() if len(line) > 80] == []
    assert "…" not in r.output
    arguments = r.output.splitlines()[0].split("[OPTIONS]")[1].split()    # DATA, not {data}
    assert [a for a in arguments if a.strip("[].") != a.strip("[].").upper() or "{" in a] == []


def test_usage_mistakes_print_one_error_line_like_hexpr_errors(tmp_path):
    cases = [
        (["inspect", tmp_path, "--method", "umap"], "Error: --method: 'umap' is not one of: pca, tsne"),
        (["inspect"], "Error: missing argument DATA"),
        (["fit-head", tmp_path, "--hed", "ridge"], "Error: no such option: --hed"),
        (["fit-head", tmp_path, "--folds", "many"], "Error: --folds:"),
    ]
    for args, says in cases:
        r = run(*args)
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(says), r.output
        assert "Usage:" not in r.output and "╭" not in r.output
    library = run("fit-head", tmp_path / "absent.csv", "-b", "resnet18:weights=none,size=48")
    assert library.exit_code == 2 and library.output.startswith("Error: ") and len(library.output.strip().splitlines()) == 1


def test_version_is_the_installed_package_version():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"hexpr {hexpr.__version__}"


def test_backbones_in_a_pipe_are_tab_separated_rows_grep_finds():
    done = subprocess.run([sys.executable, "-m", "hexpr", "backbones"], capture_output=True, text=True, timeout=300,
                          env={"COLUMNS": "80", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines() if not line.startswith("#")]
    header, body = rows[0], rows[1:]
    assert header[:2] == ["name", "dim"] and all(len(r) == len(header) for r in body)
    gigapath = [r for r in body if r[0] == "prov-gigapath"]           # `grep -w prov-gigapath` finds one whole row
    assert len(gigapath) == 1 and gigapath[0][1] == "1536"
    as_json = json.loads(run("backbones", "--json").stdout)
    assert [p["name"] for p in as_json["presets"]] == [r[0] for r in body]
    assert {p["name"]: str(p["dim"]) for p in as_json["presets"]} == {r[0]: r[1] for r in body}


def test_tables_fold_long_paths_on_a_terminal_and_never_cut_them(monkeypatch, capsys):
    path = "/a/rather/long/folder/of/slide/predictions/" + "5714_slide_name_that_goes_on" * 3 + "/tiles.geojson"
    table = Table(title="t")
    table.add_column("slide")
    table.add_column("output")
    table.add_row("5714", path)
    monkeypatch.setattr(cli_support, "stdout_is_terminal", lambda: True)
    output = cli_support.Output()
    output._console = cli_support.Console(file=sys.stdout, width=80)
    output.print(table)
    text = capsys.readouterr().out
    assert "…" not in text
    assert path in "".join(line.split("│")[2].strip() for line in text.splitlines() if line.count("│") == 3)
    monkeypatch.setattr(cli_support, "stdout_is_terminal", lambda: False)
    cli_support.Output().print(table)
    assert capsys.readouterr().out.splitlines() == ["# t", "slide\toutput", f"5714\t{path}"]


def test_long_lines_are_not_wrapped_in_a_pipe(capsys, monkeypatch):
    monkeypatch.setattr(cli_support, "stdout_is_terminal", lambda: False)
    line = "model saved in " + "/x" * 60 + " (out-of-fold predictions: " + "/y" * 30 + ")"
    cli_support.Output().print(line)
    assert capsys.readouterr().out == line + "\n"


QUICK_MISTAKES = [
    (["fit-head", "{w}/trian.csv"], "Error: DATA: path"),
    (["predict", "{w}/no-model", "{w}/test.csv"], "Error: MODEL: no fitted model"),
    (["import", "{w}/her2st", "--out", "{w}/dataset"], "Error: SOURCE: path"),
    (["inspect", "{w}/train.csv", "--method", "umap"], "Error: --method: 'umap' is not one of: pca, tsne"),
    (["fit-head", "{w}/train.csv", "--head", "rigde"], "Error: --head: unknown head 'rigde'; did you mean ridge?"),
    (["fit-head", "{w}/train.csv", "--hed", "ridge"], "Error: no such option: --hed"),
]


@pytest.mark.parametrize("args, says", QUICK_MISTAKES, ids=[" ".join(a[:1] + a[-1:]) for a, _ in QUICK_MISTAKES])
def test_mistyped_paths_and_options_are_reported_before_heavy_libraries_load(tmp_path, args, says):
    """(How fast, in seconds: benchmarks/cli_latency.py.) Here: no torch, sklearn, pandas or timm is imported."""
    (tmp_path / "train.csv").write_text("ID,path,G0\nspot0,img/0.png,1.0\n")
    probe = ("import sys\nfrom hexpr.pipeline import main\nsys.argv = ['hexpr', *sys.argv[1:]]\ntry:\n    main()\n"
             "except SystemExit as exc:\n    heavy = sorted(m for m in ('torch', 'sklearn', 'pandas', 'timm', 'h5py') if m in sys.modules)\n"
             "    print('EXIT', exc.code, 'HEAVY', ','.join(heavy) or '-', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe, *[a.replace("{w}", str(tmp_path)) for a in args]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "EXIT 2 HEAVY -", done.stderr
    assert len(lines) == 2 and lines[0].startswith(says), done.stderr


def test_a_missing_model_names_fit_head_and_lists_the_saved_models(tmp_path, monkeypatch):
    for name in ("train__ridge", "train__mlp"):
        (tmp_path / "cache" / "models" / name).mkdir(parents=True)
        (tmp_path / "cache" / "models" / name / "model.joblib").write_bytes(b"x")
    (tmp_path / "cache" / "models" / "not-a-model").mkdir()
    monkeypatch.chdir(tmp_path)
    r = run("predict", "cache/models/train__rigde", tmp_path)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "hexpr fit-head" in r.output
    assert "models in cache/models/: cache/models/train__mlp, cache/models/train__ridge" in r.output


def test_progress_goes_to_stderr_and_results_to_stdout(tmp_path):
    from conftest import TINY_BACKBONE, write_challenge_dataset

    data = write_challenge_dataset(tmp_path / "data", n=6)
    r = run("embed", data, "-b", TINY_BACKBONE, "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    assert "embed data" in r.stderr and "img/s" in r.stderr             # the progress bar
    lines = r.stdout.splitlines()
    assert lines[0].startswith("# embeddings of") and all("\t" in line for line in lines[1:])     # the table alone
    assert lines[1].split("\t") == ["backbone", "weights", "field of view", "width", "cache file"] and len(lines) == 3


def test_the_embedding_progress_bar_keeps_its_numbers_at_80_columns():
    import io

    from hexpr.embedder import extract

    for width in (60, 80):
        console = cli_support.Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
        bar = extract._progress_bar(True)
        task = bar.add_task("embed train (resnet18:size=48, vit_small_patch16_224.augreg_in1k)", total=600, rate=7.7)
        bar.update(task, advance=120)
        console.print(bar.make_tasks_table(bar.tasks))
        line = console.file.getvalue().rstrip("\n")
        assert len(line) <= width and "120/600" in line and "7.7 img/s" in line and "ETA" in line, line


def test_changelog_starts_at_the_installed_version():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    releases = [line.split("]")[0].removeprefix("## [") for line in text.splitlines() if line.startswith("## [")]
    assert releases[0] == "Unreleased" and releases[1] == hexpr.__version__


def test_import_of_an_unknown_layout_names_the_kind_option(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("not a dataset\n")
    r = run("import", tmp_path / "raw", "--out", tmp_path / "out", "--quiet")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "--kind legacy_st | visium | hest" in r.output and "kind=..." not in r.output.split("(kind=")[0]
    assert not (tmp_path / "out").exists()
