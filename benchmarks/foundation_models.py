"""Foundation-model presets: load time, peak memory against the weights' size, and CPU images/s.

Per preset, offline: a subprocess saves random full-size weights (the preset's architecture, keys as
the hub checkpoint has them) to a temporary .safetensors file; a fresh subprocess then loads them
through ``create_backbone`` (meta device + assignment) and embeds random 224 px images at the default
precision (bf16 autocast on CPUs with native bf16, else fp32). Peak RSS is the process's VmHWM
after the load; "net" subtracts the RSS the process had after importing torch and hexpr.

    python -m benchmarks.foundation_models --presets uni h-optimus-0 --n-images 16 --batch-size 8

Prints a table and writes JSON (default benchmarks/results/foundation_models.json).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import REPO, peak_memory_mib, reset_peak_memory, resident_mib

DEFAULT_PRESETS = ("kaiko-vits16", "phikon", "uni")


def make_weights(name: str, path: str) -> None:
    """Save random full-size weights for preset ``name`` with the key names of its published checkpoint."""
    import torch
    from safetensors.torch import save_file

    from hexpr.embedder.backbones import build_architecture, parse_backbone
    from hexpr.embedder.presets import get_preset

    torch.manual_seed(0)
    model = build_architecture(parse_backbone(f"{name}:weights=none"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if get_preset(name).backend == "conch":
        state = {"visual." + k: v for k, v in state.items()}
    save_file(state, path)


def load_and_run(name: str, path: str, n_images: int, batch_size: int) -> dict:
    import torch

    from hexpr.embedder.backbones import create_backbone, parse_backbone
    from hexpr.embedder.extract import resolve_precision

    baseline = resident_mib()
    reset_peak_memory()
    started = time.perf_counter()
    backbone = create_backbone(parse_backbone(f"{name}:weights={path}"))
    load_s = time.perf_counter() - started
    peak_load = peak_memory_mib()
    device = torch.device("cpu")
    autocast_dtype = resolve_precision("auto", device)
    size = backbone.preprocess.height
    images = torch.randint(0, 255, (batch_size, 3, size, size), dtype=torch.uint8)
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        backbone.model(backbone.preprocess.normalize(images[:1]))  # warm-up
        started = time.perf_counter()
        done = 0
        while done < n_images:
            backbone.model(backbone.preprocess.normalize(images).contiguous(memory_format=torch.channels_last))
            done += batch_size
        run_s = time.perf_counter() - started
    return {"load_s": round(load_s, 2), "baseline_rss_mib": baseline, "peak_rss_mib": peak_load,
            "peak_rss_after_run_mib": peak_memory_mib(), "images": done, "img_per_s": round(done / run_s, 2),
            "precision": "bf16-autocast" if autocast_dtype is not None else "fp32", "input": size,
            "threads": torch.get_num_threads()}


def _subprocess(args: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "benchmarks.foundation_models", *args], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
    return result.stdout.strip().splitlines()[-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    parser.add_argument("--n-images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "foundation_models.json")
    parser.add_argument("--_make", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_load", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._make:
        make_weights(*args._make)
        print("ok")
        return
    if args._load:
        print(json.dumps(load_and_run(*args._load, args.n_images, args.batch_size)))
        return

    from hexpr.embedder.presets import get_preset

    rows = []
    print(f"{'preset':<16}{'weights MiB':>12}{'load s':>8}{'peak RSS':>10}{'net':>8}{'net/w':>7}{'img/s':>8}")
    for name in args.presets:
        if get_preset(name) is None:
            raise SystemExit(f"unknown preset {name!r}")
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / f"{name}.safetensors")
            made = time.perf_counter()
            try:
                _subprocess(["--_make", name, path])
                row = json.loads(_subprocess(["--_load", name, path, "--n-images", str(args.n_images),
                                              "--batch-size", str(args.batch_size)]))
            except RuntimeError as exc:
                print(f"{name:<16} failed: {exc}")
                rows.append({"preset": name, "error": str(exc)})
                continue
            weights_mib = round(Path(path).stat().st_size / 2**20, 1)
        net = round(row["peak_rss_mib"] - row["baseline_rss_mib"], 1)
        row.update(preset=name, weights_mib=weights_mib, net_load_rss_mib=net, net_over_weights=round(net / weights_mib, 2),
                   peak_over_weights=round(row["peak_rss_mib"] / weights_mib, 2),
                   make_weights_s=round(time.perf_counter() - made - row["load_s"], 1))
        rows.append(row)
        print(f"{name:<16}{weights_mib:>12.0f}{row['load_s']:>8.1f}{row['peak_rss_mib']:>10.0f}{net:>8.0f}"
              f"{row['net_over_weights']:>7.2f}{row['img_per_s']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import platform

    import torch

    payload = {"n_images": args.n_images, "batch_size": args.batch_size, "platform": platform.platform(),
               "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
