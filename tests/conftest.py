"""Shared fixtures: offline mode, small generated datasets, the ../shared folder."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

# HEXPR_TEST_THREADS=N runs torch and BLAS on N threads: CI runs the estimator checks under several thread
# counts and BLAS kernels, so that a result depending on the CPU shows up there first (.ci/run)
_THREADS = os.environ.get("HEXPR_TEST_THREADS")
torch.set_num_threads(int(_THREADS) if _THREADS else max(1, min(2, os.cpu_count() or 1)))
# BLAS on one thread by default: on a shared 2-core machine OpenBLAS's two spinning threads made a 1,024-wide
# eigh (ridge on neighbour-context features) 8.5 s instead of 0.25 s; tests check results, benchmarks measure speed
threadpool_limits(int(_THREADS) if _THREADS else 1, user_api="blas")

REPO = Path(__file__).resolve().parents[1]
import hexpr  # noqa: E402

if Path(hexpr.__file__).resolve().parent != REPO:
    raise RuntimeError(f"`import hexpr` gives {Path(hexpr.__file__).parent}, not this checkout ({REPO}): "
                       f"run `python3 -m pip install -e .` here, or test in that checkout")
# the real data and weights: ../shared beside the repository, or the folder HEXPR_SHARED names
# (HEXPR_SHARED=/nonexistent hides it: every test needing it must then skip cleanly)
SHARED = Path(os.environ.get("HEXPR_SHARED") or REPO.parent / "shared")
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenetv2_100_tflite_in1k.safetensors"
HER2ST = SHARED / "data" / "her2st"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (real data and weights) is absent")

# a small, fast, randomly initialised backbone for tests where pretrained weights are not the point
TINY_BACKBONE = "resnet18:weights=none,size=64"


def write_challenge_dataset(root: Path, n: int = 12, n_genes: int = 4, size: int = 40, seed: int = 0,
                            with_targets: bool = True, groups: int = 0) -> Path:
    """PNG patches + challenge CSV; gene values depend on image colour so they are learnable."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        colour = rng.uniform(0, 255, 3)
        image = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "img" / f"spot{i}.png")
        row = {"ID": f"spot{i}", "path": f"img/spot{i}.png"}
        if groups:
            row["group"] = f"slide{i % groups}"
        if with_targets:
            for g in range(n_genes):
                row[f"G{g}"] = float(colour[g % 3] / 255.0 * (g + 1) + rng.normal(0, 0.05))
        rows.append(row)
    csv = root / "data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


@pytest.fixture
def tiny_csv(tmp_path):
    return write_challenge_dataset(tmp_path / "data")
