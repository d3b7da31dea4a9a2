"""A torch and torchvision that do not work together: one Error: line with both versions and the fix."""
import os
import subprocess
import sys
from importlib import metadata

import torch

from conftest import REPO, TINY_BACKBONE, write_challenge_dataset
from hexpr.embedder.torch_install import matching_torchvision, pairing_advice

BROKEN_TORCHVISION = 'raise RuntimeError("operator torchvision::nms does not exist")\n'


def test_the_installed_pair_follows_the_pairing_rule():
    # PyTorch's compatibility table: torch 2.N is built with torchvision 0.(N+15); this install must obey it
    series = matching_torchvision(torch.__version__)
    assert series is not None
    assert metadata.version("torchvision").startswith(series + ".")


def test_the_advice_pins_the_series_of_the_installed_torch():
    advice = pairing_advice("2.13.0+cpu")
    assert "'torch==2.13.*'" in advice and "'torchvision==0.28.*'" in advice
    assert "pip install --upgrade torch torchvision" in pairing_advice("3.0.0")   # no known rule: let pip pick


def test_a_torchvision_built_for_another_torch_gives_one_error_line(tmp_path):
    csv = write_challenge_dataset(tmp_path / "data", n=4, size=16)
    fake = tmp_path / "fake" / "torchvision"          # a torchvision whose C++ operators do not register
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(BROKEN_TORCHVISION)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(fake.parent)}
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "hexpr", "embed", str(csv), "-b", TINY_BACKBONE,
                             "--workers", "0", "--cache-dir", str(cache)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    assert f"torch {metadata.version('torch')}" in line and f"torchvision {metadata.version('torchvision')}" in line
    assert "operator torchvision::nms does not exist" in line and "pip install" in line
    assert not list(cache.rglob("*.h5")), "nothing is written when the model cannot be built"
