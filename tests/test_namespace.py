"""One namespace: installed, hexpr is `hexpr` only; generic top-level names never reach site-packages."""
import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

GENERIC = ("workflow", "embedder", "heads", "pipeline")


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter outside the repository (so the checkout is not on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_generic_names_do_not_resolve_to_hexpr_and_the_api_does(tmp_path):
    code = f"""
import importlib, json, pathlib
repo = pathlib.Path({str(REPO)!r}).resolve()
found = {{}}
for name in {GENERIC!r}:
    try:
        module = importlib.import_module(name)
        found[name] = str(pathlib.Path(module.__file__).resolve())
    except ModuleNotFoundError:
        found[name] = None
import hexpr, hexpr.workflow
print(json.dumps({{"generic": found, "hexpr": hexpr.__file__, "version": hexpr.__version__,
                  "fit_head_is_workflows": hexpr.fit_head is hexpr.workflow.fit_head,
                  "api": sorted(hexpr.workflow.__all__)}}))
"""
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for name, path in report["generic"].items():
        assert path is None or not path.startswith(str(REPO.resolve())), f"`import {name}` resolves to hexpr: {path}"
    assert report["hexpr"].startswith(str(REPO.resolve()))
    assert report["fit_head_is_workflows"] and report["version"][0].isdigit()
    assert {"embed", "fit_head", "predict", "predict_slide", "evaluate", "import_dataset"} <= set(report["api"])


def test_every_public_function_has_a_docstring_example():
    import hexpr
    from hexpr import workflow

    for name in workflow.__all__:
        doc = getattr(hexpr, name).__doc__ or ""
        assert ">>> " in doc, f"hexpr.{name} has no docstring example"


def test_python_dash_m_hexpr_is_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hexpr", "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fit-head" in result.stdout and "predict-slide" in result.stdout


def test_the_wheel_holds_the_hexpr_package_only(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "No module named" in result.stderr:
        pytest.skip(f"cannot build a wheel here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("hexpr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"hexpr", next(t for t in top if t.endswith(".dist-info"))}, top
    for module in ("hexpr/__init__.py", "hexpr/__main__.py", "hexpr/pipeline.py", "hexpr/embedder/errors.py",
                   "hexpr/heads/base.py", "hexpr/workflow/fit.py", "hexpr/embedder/importers/run.py",
                   "hexpr/workflow/outputs/anndata.py", "hexpr/workflow/outputs/viewer_assets/openseadragon.min.js"):
        assert module in names
    assert not [n for n in names if n.startswith(("hexpr/tests/", "hexpr/benchmarks/"))]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "hexpr = hexpr.pipeline:main" in entry_points
