"""The command line's shared look, so that every command of ``pipeline.py`` gets it without code of its own.

* ``HexprTyper``: the typer app. Its commands print plain help that fits 80 columns (no option name is
  ever cut), show upper-case metavars (``DATA``, ``PATH``, ``[pca|tsne]``), and report a usage mistake
  (a bad choice, a missing argument, an unknown option) as the same one ``Error:`` line, exit 2, that a
  ``HexprError`` gives; ``hexpr --version`` prints the version.
* ``Output``: results on stdout. On a terminal, rich tables and lines (columns fold, never truncate);
  in a pipe, plain lines that never wrap, and tables as tab-separated rows (``hexpr backbones | grep -w``).
* ``json_option`` adds ``--json`` to a command; the command hands its report to ``emit(report, render)``,
  which prints either the report as one JSON object or the human rendering.
* ``error_line`` / ``notice`` print to stderr (progress, warnings, notes and errors never mix with results).

Only typer, rich and the error root are imported here: ``--help``, ``--version`` and usage errors stay fast.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import json
import re
import sys
from typing import Annotated, Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

try:    # typer >= 0.22 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:     # pragma: no cover - older typer on click
    from click.exceptions import NoArgsIsHelpError, UsageError

err = Console(stderr=True)


def hexpr_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hexpr")
    except PackageNotFoundError:    # a source tree that was not installed
        return "0+unknown"


# ----------------------------------------------------------------------------- stdout and stderr
def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _plain(cell) -> str:
    """A table cell as plain text (rich markup removed), one line."""
    text = cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain
    return " ".join(text.split("\n"))


def table_rows(table: Table) -> list[list[str]]:
    """The header (when shown) and the rows of a rich table, as plain strings."""
    columns = [[_plain(c) for c in column.cells] for column in table.columns]
    rows = [list(r) for r in zip(*columns)] if columns else []
    if table.show_header:
        rows.insert(0, [_plain(column.header) for column in table.columns])
    return rows


class Output:
    """stdout for results. ``print(table)`` gives a rich table on a terminal (columns fold long
    values, never cut them) and tab-separated rows in a pipe (the title as a ``# title`` line);
    other objects print unwrapped in a pipe, so that one result is one line for grep."""

    def __init__(self):
        self._console = None

    @property
    def console(self) -> Console:
        if self._console is None or self._console.file is not sys.stdout:   # CliRunner swaps sys.stdout
            self._console = Console(file=sys.stdout)
        return self._console

    def print(self, *objects, **options) -> None:
        terminal = stdout_is_terminal()
        if len(objects) == 1 and isinstance(objects[0], Table):
            table = objects[0]
            if terminal:
                for column in table.columns:
                    column.overflow = "fold"
                self.console.print(table)
            else:
                if table.title:
                    sys.stdout.write(f"# {_plain(table.title)}\n")
                sys.stdout.write("".join("\t".join(row) + "\n" for row in table_rows(table)))
            return
        if not terminal:
            options.setdefault("soft_wrap", True)
        options.setdefault("highlight", False)
        self.console.print(*objects, **options)


def notice(text: str, label: str = "") -> None:
    """One unwrapped line on stderr (a note or a warning): ``label`` in colour, then ``text`` as is."""
    err.print(f"{label} {escape(text)}" if label else escape(text), highlight=False, soft_wrap=True)


def error_line(message: str) -> None:
    """The one look of every mistake: ``Error: <message>`` on stderr, one line."""
    err.print(f"[bold red]Error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- --json
_JSON = contextvars.ContextVar("hexpr_json_output", default=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout instead of "
                                                      "the tables (progress and notes still go to stderr).")]


def json_option(func: Callable) -> Callable:
    """Add ``--json`` to a command; its ``emit(report, render)`` then prints the report as JSON."""
    signature = inspect.signature(func, eval_str=True)
    param = inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonOpt)

    @functools.wraps(func)
    def wrapper(*args, json_output: bool = False, **kwargs):
        token = _JSON.set(json_output)
        try:
            return func(*args, **kwargs)
        finally:
            _JSON.reset(token)

    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), param])
    wrapper.__annotations__ = {**{p.name: p.annotation for p in signature.parameters.values()}, "json_output": JsonOpt}
    return wrapper


def json_text(report) -> str:
    """``report`` as strict JSON (NaN as null, numpy values as numbers, paths as strings)."""
    from hexpr.embedder.files import json_ready

    return json.dumps(json_ready(report), default=str, allow_nan=False)


def emit(report: dict, render: Callable[[dict], None]) -> None:
    """A command's result: the report as JSON on stdout under ``--json``, else ``render(report)``."""
    if _JSON.get():
        sys.stdout.write(json_text(report) + "\n")
        sys.stdout.flush()
    else:
        render(report)


# ----------------------------------------------------------------------------- usage errors, help, version
_SCALARS = {"path": "PATH", "str": "TEXT", "float": "FLOAT", "int": "INTEGER", "bool": "BOOLEAN"}


def _metavar(param) -> str | None:
    """Upper-case metavar: arguments by name (DATA), options by type (PATH, FLOAT, [pca|tsne])."""
    if param.param_type_name == "argument":
        return param.name.upper() + ("..." if param.nargs != 1 else "")
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None and descriptor.is_choice:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in descriptor.choices) + "]"
    try:
        label = str(param.display_type(None)).strip("<>")
    except Exception:   # pragma: no cover - older typer: click's own metavar is already upper-case
        return None
    inner = re.fullmatch(r"list\[(\w+)\]", label, flags=re.IGNORECASE)
    return _SCALARS.get((inner.group(1) if inner else label).lower(), label.upper())


class HexprCommand(TyperCommand):
    """A command with upper-case metavars and a usage line that reads ``hexpr import [OPTIONS] SOURCE...``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None:
                param.metavar = _metavar(param)
            if param.param_type_name == "argument":      # help lists "SLIDES...", not "SLIDES <list[Path]>"
                param.display_type_rich = lambda ctx=None: None

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


def _choices_text(message: str) -> str:
    """typer's "Value error, 'umap' is not one of 'pca', 'tsne'." -> "'umap' is not one of: pca, tsne"."""
    message = re.sub(r"^Value error, ", "", message.strip())
    match = re.fullmatch(r"(.+?) is not one of (.+?)\.?", message)
    if match:
        choices = [c.strip().strip("'\"") for c in match.group(2).split(",")]
        return f"{match.group(1)} is not one of: {', '.join(choices)}"
    return message.rstrip(".")


def usage_message(exc: UsageError) -> str:
    """One line for a usage mistake, naming the option and where help is."""
    param = getattr(exc, "param", None)
    hint = getattr(exc, "param_hint", None)
    if hint is None and param is not None:
        opts = [o for o in getattr(param, "opts", []) if o.startswith("--")] or getattr(param, "opts", [])
        hint = opts[0] if opts and param.param_type_name == "option" else (param.metavar or param.name or "").upper()
    if isinstance(hint, (list, tuple)):
        hint = " / ".join(hint)
    hint = str(hint).strip("'\"").removesuffix("...") if hint else ""
    kind = type(exc).__name__
    text = _choices_text(exc.message)
    if text[:1].isupper() and text[1:2].islower():     # "No such option" -> "no such option"; "CUDA ..." stays
        text = text[:1].lower() + text[1:]
    if kind == "MissingParameter":
        text = f"missing {'option' if hint.startswith('-') else 'argument'} {hint}"
    elif hint:
        text = f"{hint}: {text}"
    ctx = getattr(exc, "ctx", None)
    where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    return " ".join(f"{text}{where}".split())


class OneLineUsageError(UsageError):
    """A usage error printed as the one ``Error:`` line every hexpr mistake uses (exit code 2)."""

    def __init__(self, original: UsageError):
        super().__init__(usage_message(original), ctx=getattr(original, "ctx", None))

    def show(self, file=None) -> None:
        error_line(self.message)


def _one_line(exc: UsageError) -> UsageError:
    if isinstance(exc, (NoArgsIsHelpError, OneLineUsageError)):
        return exc
    return OneLineUsageError(exc)


class HexprGroup(TyperGroup):
    """The ``hexpr`` group: a usage mistake of any command (or an unknown command) becomes one ``Error:`` line."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise _one_line(exc) from None


class HexprTyper(typer.Typer):
    """``typer.Typer`` whose commands are ``HexprCommand``s and whose group is ``HexprGroup``; help is
    plain click text (it wraps to the terminal and never cuts an option name)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("cls", HexprGroup)
        kwargs.setdefault("rich_markup_mode", None)
        super().__init__(**kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", HexprCommand)
        return super().command(*args, **kwargs)


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"hexpr {hexpr_version()}\n")
        raise typer.Exit()


VersionOpt = Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print hexpr's version and exit.")]
