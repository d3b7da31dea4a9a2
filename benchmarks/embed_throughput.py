"""Images/s of `hexpr embed` against a naive reference loop, side by side in one run.

Naive loop: per image, PIL open (once) + torchvision transform (resize, ToTensor, Normalize) per
backbone in the main process, one fp32 forward pass per image per backbone. hexpr: `embed_dataset`
end to end with its defaults (content hash, decode once per image, batched inference_mode forward,
channels_last, bf16 autocast where the device supports it, chunked cache write).
Same backbones (random init: weights do not change speed), same images (the generated demo set).

    python -m benchmarks.embed_throughput                 # CPU, default backbones, 128 images
    python -m benchmarks.embed_throughput --device cuda --n-images 4096

Prints a table and writes JSON (default benchmarks/results/embed_throughput.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from hexpr.embedder.backbones import DEFAULT_BACKBONES, create_backbone, parse_backbone
from hexpr.embedder.datasets import open_dataset
from hexpr.embedder.demo_data import write_demo_dataset
from hexpr.embedder.extract import cpu_supports_bf16, embed_dataset, resolve_device


def naive_loop(dataset, backbones, device) -> float:
    pipelines = [
        transforms.Compose([
            transforms.Resize((b.preprocess.height, b.preprocess.width), interpolation=transforms.InterpolationMode(b.preprocess.interpolation)),
            transforms.ToTensor(),
            transforms.Normalize(b.preprocess.mean, b.preprocess.std),
        ])
        for b in backbones
    ]
    start = time.perf_counter()
    models = [b.model.to(memory_format=torch.contiguous_format) for b in backbones]  # plain layout, as a user would
    with torch.no_grad():
        for path in dataset.image_paths:
            image = Image.open(path).convert("RGB")
            for model, pipeline in zip(models, pipelines):
                model(pipeline(image).unsqueeze(0).to(device)).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=128)
    parser.add_argument("--backbone", action="append", help="timm name (default: the two default backbones)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default: hexpr's (16 on CPU, 128 on CUDA)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--naive-images", type=int, default=None, help="images for the naive loop (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "embed_throughput.json")
    args = parser.parse_args()

    device = resolve_device(args.device)
    specs = [parse_backbone(name, "none") for name in (args.backbone or DEFAULT_BACKBONES)]
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_dataset(Path(tmp) / "data", n_train=args.n_images, n_test=1, n_genes=10, size=224, seed=0)
        dataset = open_dataset(Path(tmp) / "data" / "train.csv")
        n_naive = min(args.naive_images or len(dataset), len(dataset))
        backbones = [create_backbone(s, device) for s in specs]
        # warm-up: one image through each model (allocations, kernel selection)
        with torch.no_grad():
            for b in backbones:
                b.model(torch.zeros(1, 3, b.preprocess.height, b.preprocess.width, device=device))
        naive_dataset = open_dataset(Path(tmp) / "data" / "train.csv")
        naive_dataset.image_paths = naive_dataset.image_paths[:n_naive]
        naive_s = naive_loop(naive_dataset, backbones, device)

        start = time.perf_counter()
        embed_dataset(dataset, specs, Path(tmp) / "cache", batch_size=args.batch_size, num_workers=args.workers,
                      device=str(device), precision=args.precision, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        hexpr_s = time.perf_counter() - start

    naive_rate, hexpr_rate = n_naive / naive_s, len(dataset) / hexpr_s
    result = {
        "backbones": [s.name for s in specs],
        "input_sizes": [b.preprocess.height for b in backbones],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "precision": args.precision,
        "bf16_capable_cpu": cpu_supports_bf16(),
        "naive": {"images": n_naive, "seconds": round(naive_s, 3), "images_per_s": round(naive_rate, 2)},
        "hexpr": {"images": len(dataset), "seconds": round(hexpr_s, 3), "images_per_s": round(hexpr_rate, 2)},
        "speedup": round(hexpr_rate / naive_rate, 2),
        "torch": torch.__version__,
    }
    print(f"\nembed throughput, {', '.join(result['backbones'])} together, device {result['device']} ({result['device_name']})")
    print(f"{'method':<8} {'images':>7} {'seconds':>9} {'images/s':>9}")
    for name in ("naive", "hexpr"):
        r = result[name]
        print(f"{name:<8} {r['images']:>7} {r['seconds']:>9.2f} {r['images_per_s']:>9.2f}")
    print(f"speed-up hexpr / naive: {result['speedup']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
