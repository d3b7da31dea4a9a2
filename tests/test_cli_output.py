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
    assert names and [n for n in names if n not in words] == []
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
    done = subprocess.run([sys.executable, "-m", "hexpr", "backbones"], capture_output=True, text=True, timeout=60,
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
