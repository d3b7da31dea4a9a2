"""README stays short and true; the documentation's command lines name commands and options that exist.

The site itself is built in strict mode by CI (`python3 -m mkdocs build --strict`: broken links and
references fail); these tests need no MkDocs."""
import re
import shlex

import typer

from conftest import REPO
from hexpr.pipeline import app

DOCS = REPO / "docs"


def _commands() -> dict:
    return typer.main.get_command(app).commands


def _hexpr_lines(text: str) -> list[str]:
    """Every `hexpr ...` command line inside the ```bash blocks of a markdown text (comments dropped)."""
    lines = []
    for block in re.findall(r"```(?:bash|console|sh)\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            for part in re.split(r"&&|\|", line):
                part = part.strip()
                if part.startswith("hexpr "):
                    lines.append(part)
    return lines


def test_readme_is_short_and_keeps_the_two_quickstart_commands():
    readme = (REPO / "README.md").read_text()
    assert readme.count("\n") < 250
    assert "python3 -m pip install -e . && hexpr demo" in readme
    assert 'python3 -m pip install -e ".[test]" && lint-imports && HF_HUB_OFFLINE=1 python3 -m pytest -q' in readme
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):        # every docs link points at a page
        assert (REPO / link).is_file(), link


def test_every_page_in_the_nav_exists_and_every_page_is_in_the_nav():
    nav = set(re.findall(r":\s*(\S+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert nav == pages


def test_documented_command_lines_use_real_commands_and_options():
    """Each `hexpr CMD --option` shown in README and the docs names a command and options that exist,
    so a renamed option cannot leave a stale example behind."""
    commands = _commands()
    checked = 0
    for path in [REPO / "README.md", *DOCS.rglob("*.md")]:
        for line in _hexpr_lines(path.read_text()):
            try:
                words = shlex.split(line)
            except ValueError:
                words = line.split()
            if len(words) < 2 or words[1].startswith("-"):
                continue
            name = words[1]
            assert name in commands, f"{path.name}: `{line}` uses an unknown command {name!r}"
            options = {o for p in commands[name].params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
            used = {w.split("=")[0] for w in words[2:] if w.startswith("-") and not re.fullmatch(r"-\d.*", w)}
            assert used <= options | {"--help"}, f"{path.name}: `{line}` uses {sorted(used - options)}"
            checked += 1
    assert checked >= 20
