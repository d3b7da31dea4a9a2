"""H&E augmentations for fine-tuning, on uint8 image tensors, reproducible from a numpy Generator.

One draw of parameters per image is applied to every backbone's view of it, so backbones with
different input sizes see the same crop, orientation and colour:

* random resized crop (mild: most of the spot is kept, aspect ratio close to 1), inside the
  backbone's centre crop when its spec sets ``crop_pct``;
* one of the 8 dihedral transforms (90-degree rotations and flips; flips only for non-square views);
* stain jitter in haematoxylin-eosin-DAB optical-density space (Tellez et al. 2018): each stain
  channel scaled by ``1 +- stain_scale`` and shifted by ``+- stain_shift``;
* mild brightness, contrast and saturation jitter.

Crop and resize happen first, so the colour work is done at the (usually smaller) model size.
Every call takes its own ``numpy.random.Generator``; seeding it from (seed, epoch, image index)
makes an epoch's augmentations independent of data-loader workers and of interruptions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hexpr.embedder.backbones import Preprocess
from hexpr.embedder.torch_install import require_torchvision

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.color.rgb_from_hed
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_FLOOR = 1.0 / 255.0


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.75, 1.0)     # fraction of the area kept
    crop_ratio: tuple[float, float] = (0.85, 1 / 0.85)  # aspect ratio range of the crop
    dihedral: bool = True
    stain_scale: float = 0.05
    stain_shift: float = 0.02
    brightness: float = 0.08
    contrast: float = 0.08
    saturation: float = 0.08

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_AUGMENT = AugmentConfig()


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one image's augmentation in one epoch."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def _crop_box(rng: np.random.Generator, height: int, width: int, config: AugmentConfig) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop (the whole image when nothing fits after 10 tries)."""
    area = height * width
    log_ratio = (math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*config.crop_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return 0, 0, height, width


def _draw(rng: np.random.Generator, height: int, width: int, config: AugmentConfig) -> dict:
    return {
        "box": _crop_box(rng, height, width, config),
        "rot90": int(rng.integers(4)) if config.dihedral else 0,
        "flip": bool(rng.random() < 0.5) if config.dihedral else False,
        "stain_alpha": rng.uniform(1 - config.stain_scale, 1 + config.stain_scale, 3),
        "stain_beta": rng.uniform(-config.stain_shift, config.stain_shift, 3),
        "brightness": float(rng.uniform(1 - config.brightness, 1 + config.brightness)),
        "contrast": float(rng.uniform(1 - config.contrast, 1 + config.contrast)),
        "saturation": float(rng.uniform(1 - config.saturation, 1 + config.saturation)),
    }


def stain_jitter(rgb: torch.Tensor, alpha, beta) -> torch.Tensor:
    """(3, H, W) float RGB in [0, 1] -> the same with each H/E/D stain scaled by alpha, shifted by beta."""
    od = -torch.log(rgb.clamp(min=_OD_FLOOR)).permute(1, 2, 0).double()            # (H, W, 3) optical density
    stains = od @ _HED_FROM_RGB
    stains = stains * torch.as_tensor(alpha, dtype=torch.float64) + torch.as_tensor(beta, dtype=torch.float64)
    return torch.exp(-(stains @ _RGB_FROM_HED)).permute(2, 0, 1).float().clamp(0.0, 1.0)


def colour_jitter(rgb: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """(3, H, W) float in [0, 1]: brightness, then contrast (about the mean grey), then saturation."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    rgb = rgb * brightness
    grey = (rgb * weights).sum(0, keepdim=True)
    rgb = (rgb - grey.mean()) * contrast + grey.mean()
    grey = (rgb * weights).sum(0, keepdim=True)
    rgb = (rgb - grey) * saturation + grey
    return rgb.clamp(0.0, 1.0)


def _apply(view: torch.Tensor, params: dict, config: AugmentConfig) -> torch.Tensor:
    """Orientation and colour of one resized (3, h, w) uint8 view."""
    if params["rot90"] and view.shape[1] == view.shape[2]:
        view = torch.rot90(view, params["rot90"], dims=(1, 2))
    if params["flip"]:
        view = torch.flip(view, dims=(2,))
    rgb = view.float() / 255.0
    if config.stain_scale or config.stain_shift:
        rgb = stain_jitter(rgb, params["stain_alpha"], params["stain_beta"])
    rgb = colour_jitter(rgb, params["brightness"], params["contrast"], params["saturation"])
    return (rgb * 255.0).round_().to(torch.uint8).contiguous()


def augmented_views(image: np.ndarray, preprocesses: list[Preprocess], rng: np.random.Generator,
                    config: AugmentConfig = DEFAULT_AUGMENT) -> tuple[torch.Tensor, ...]:
    """(H, W, 3) uint8 -> one augmented (3, h, w) uint8 view per preprocessing, same draw for all."""
    require_torchvision()
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    height, width = tensor.shape[1:]
    params = _draw(rng, height, width, config)
    views = []
    for p in preprocesses:
        source = tensor
        if p.crop_pct is not None:  # stay inside the region the backbone looks at
            side = max(1, int(round(min(height, width) * p.crop_pct)))
            source = tvf.center_crop(tensor, [side, side])
        sh, sw = source.shape[1:]
        top, left, h, w = params["box"]
        # the box was drawn on the full image: rescale it to this source
        top, left = int(top * sh / height), int(left * sw / width)
        h, w = max(1, int(round(h * sh / height))), max(1, int(round(w * sw / width)))
        view = tvf.resized_crop(source, top, left, h, w, [p.height, p.width],
                                interpolation=InterpolationMode(p.interpolation), antialias=True)
        views.append(_apply(view, params, config))
    return tuple(views)


def plain_views(image: np.ndarray, preprocesses: list[Preprocess]) -> tuple[torch.Tensor, ...]:
    """No augmentation: exactly what the frozen embedder feeds each backbone."""
    return tuple(p.resize_uint8(image) for p in preprocesses)
