"""MkDocs hooks: pages that are generated from the code at build time, so that they cannot drift.

- ``<!-- hexpr:cli-reference -->``: every command of the typer app with its usage, help, arguments and
  options (names, metavar, default, help), read from the click command that typer builds.
- ``<!-- hexpr:import-contracts -->``: the import-linter contracts, quoted from ``pyproject.toml``.
- ``<!-- hexpr:changelog -->``: ``CHANGELOG.md`` from the repository root.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _param_row(param) -> str:
    import click

    if isinstance(param, click.Argument):
        name = f"`{param.human_readable_name}`"
    else:
        name = ", ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
    kind = "" if getattr(param, "is_flag", False) else _cell(param.make_metavar(click.Context(click.Command("x")))
                                                            if hasattr(param, "make_metavar") else "")
    default = param.default
    default = "" if default is None or callable(default) or getattr(param, "is_flag", False) and not default \
        else f"`{_cell(default)}`"
    return f"| {name} | {kind} | {default} | {_cell(getattr(param, 'help', '') or '')} |"


def cli_reference() -> str:
    import typer

    from hexpr.pipeline import app

    group = typer.main.get_command(app)
    lines = ["`hexpr --help` lists the commands; `hexpr COMMAND --help` prints the same as below.", ""]
    for name in sorted(group.commands):
        command = group.commands[name]
        if command.hidden:
            continue
        lines += [f"## `hexpr {name}`", "", _cell(command.help or ""), "",
                  "| parameter | value | default | meaning |", "|---|---|---|---|"]
        lines += [_param_row(p) for p in command.params if not getattr(p, "hidden", False) and p.name != "help"]
        lines.append("")
    return "\n".join(lines)


def import_contracts() -> str:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    lines = []
    for contract in config["contracts"]:
        lines.append(f"- **{contract['name']}** (`{contract['type']}`)")
        for key in ("layers", "source_modules", "forbidden_modules", "ancestors"):
            if key in contract:
                lines.append(f"    - {key}: " + ", ".join(f"`{m}`" for m in contract[key]))
    return "\n".join(lines)


def changelog() -> str:
    path = ROOT / "CHANGELOG.md"
    text = path.read_text() if path.exists() else "No release notes yet."
    return text.split("\n", 1)[1] if text.startswith("# ") else text


GENERATED = {"<!-- hexpr:cli-reference -->": cli_reference, "<!-- hexpr:import-contracts -->": import_contracts,
             "<!-- hexpr:changelog -->": changelog}


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
