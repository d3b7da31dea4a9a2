"""Shared by the benchmark scripts: repo/shared paths and process memory readings (Linux)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HEXPR_SHARED") or REPO.parent / "shared")  # as tests/conftest.py
HER2ST = SHARED / "data" / "her2st"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenetv2_100_tflite_in1k.safetensors"
MOBILENET_SPEC = f"mobilenetv2_100:weights={MOBILENET_WEIGHTS},pad_type=same,mean=0.5/0.5/0.5,std=0.5/0.5/0.5"


def backbone_spec(args) -> str:
    """The shared MobileNetV2, with ``--stages`` (intermediate stages pooled after its own features) when given."""
    return MOBILENET_SPEC + (f",stages={args.stages}" if args.stages else "")


def backbone_label(args) -> str:
    return "MobileNetV2" + (f" + stages {args.stages}" if args.stages else "")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory() -> bool:
    """Reset the process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mib() -> float:
    hwm = _status_kib("VmHWM")
    if hwm is None:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(hwm / 1024, 1)


def resident_mib() -> float | None:
    rss = _status_kib("VmRSS")
    return None if rss is None else round(rss / 1024, 1)


def her2st_workdir(work: Path | None, prefix: str) -> Path:
    """The benchmark's work folder (kept when given, else a new temporary one); exits when the shared
    her2st data is absent."""
    import tempfile

    if not HER2ST.is_dir():
        sys.exit(f"{HER2ST} not found: this benchmark needs the shared her2st data")
    return Path(work) if work else Path(tempfile.mkdtemp(prefix=prefix))


def open_her2st(work: Path):
    """All four her2st sections imported once under ``work/her2st`` (default import settings), opened."""
    from hexpr.embedder.datasets import open_dataset
    from hexpr.embedder.importers import import_dataset

    data = work / "her2st"
    if not (data / "patches").is_dir():
        import_dataset(HER2ST, data, progress=False)
    return open_dataset(data)
