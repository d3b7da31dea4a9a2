"""What import-linter's contracts (`lint-imports`) do not say: the command line imports exactly the use
cases and the error root; no library module or test imports a benchmark; the Architecture page lists every module."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"hexpr", "benchmarks"}


def project_imports(path: Path) -> set[str]:
    """Every project module a file imports, at any depth of its code (function-local ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "hexpr":
            found |= {f"hexpr.{a.name}" for a in node.names}      # from hexpr import workflow
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] in PROJECT}


def test_cli_imports_only_workflow_and_the_error_root():
    assert project_imports(ROOT / "pipeline.py") == {"hexpr.workflow", "hexpr.embedder.errors", "hexpr.cli_support"}
    # the command line's shared look loads no use case (--help, --version and usage errors stay fast)
    assert project_imports(ROOT / "cli_support.py") == {"hexpr.embedder.files"}


def test_no_test_or_library_module_imports_a_benchmark():
    users = [p for folder in ("tests", "embedder", "heads", "workflow") for p in (ROOT / folder).rglob("*.py")
             if any(m.split(".")[0] == "benchmarks" for m in project_imports(p))]
    assert users == []


def test_architecture_page_lists_every_module():
    """The documentation's Architecture page names every module of the three packages (by file name,
    in a line of its folder's block), so it stays true when a module is added."""
    words = set((ROOT / "docs" / "architecture.md").read_text().split())
    missing = [str(p.relative_to(ROOT)) for pkg in ("embedder", "heads", "workflow") for p in (ROOT / pkg).rglob("*.py")
               if p.name != "__init__.py" and p.name not in words]
    assert missing == []
