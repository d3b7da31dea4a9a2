"""Pathology foundation models (and the ImageNet defaults) by name: one table of presets.

Each row says how the model card builds the model (backend, architecture, constructor kwargs),
how it wants its input (size, mean/std, interpolation), which token pooling it recommends, what
comes out (dimension) and where its weights live (hub repo, file names, licence). Class-valued
constructor kwargs are written by name ("SwiGLUPacked", "SiLU") and resolved by
``embedder.backbones`` when the model is built, so specs and cache keys stay plain JSON.

Values were checked against each model card (the ``source`` URL); where a card and its code (the
hub config or the authors' loader) disagree the code wins and ``notes`` says so. ``params`` is the
published parameter count as the card writes it (its precision is the tolerance the tests use).

``preset_rows()`` is the data behind ``hexpr backbones``; ``markdown_table()`` writes README's table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)

BACKENDS = ("timm", "transformers", "conch")
POOLINGS = ("cls", "mean", "cls+mean")
# pip extra that provides each backend's library (timm is a core dependency)
BACKEND_EXTRAS = {"timm": None, "transformers": "transformers", "conch": None}


@dataclass(frozen=True)
class Preset:
    """One named model: how its card builds it and feeds it, and where its weights are."""

    name: str
    backend: str  # timm | transformers | conch
    architecture: str  # timm model name, transformers model class, or "ViT-B-16" for CONCH
    kwargs: tuple  # ((key, value), ...) exact constructor kwargs; class values by name
    size: int  # square input side the card feeds
    mean: tuple
    std: tuple
    interpolation: str
    pool: str | None  # recommended token pooling (None: the model pools itself)
    dim: int  # output feature width with that pooling
    params: str | None  # published parameter count, as written on the card ("303M", "1.1B")
    licence: str
    gated: bool
    hub_repo: str | None  # Hugging Face repo holding the weights (None: timm's own pretrained tag)
    weight_files: tuple = ()  # file names in the repo, preferred first
    source: str = ""  # model card URL
    notes: str = ""
    ignore_prefixes: tuple = ()  # checkpoint tensors the feature extractor does not use
    params_with_head: bool = False  # the published count includes an ImageNet classifier

    @property
    def is_plain_timm_name(self) -> bool:
        """Named like its timm model: listed here, but parsed as a plain timm spec (old cache keys stay)."""
        return self.backend == "timm" and self.name == self.architecture

    @property
    def model_kwargs(self) -> dict:
        return dict(self.kwargs)

    @property
    def params_count(self) -> float | None:
        """Published parameter count as a number."""
        if not self.params:
            return None
        text = self.params.strip().lstrip("~")
        scale = {"K": 1e3, "M": 1e6, "B": 1e9}[text[-1]]
        return float(text[:-1]) * scale

    @property
    def params_tolerance(self) -> float | None:
        """Absolute tolerance the published count's rounding allows (half its last digit) plus 1%."""
        if not self.params:
            return None
        text = self.params.strip().lstrip("~")[:-1]
        decimals = len(text.split(".")[1]) if "." in text else 0
        scale = self.params_count / float(text)
        return 0.5 * 10 ** -decimals * scale + 0.01 * self.params_count


def _kw(**kwargs) -> tuple:
    return tuple(kwargs.items())


_SWIGLU = _kw(mlp_layer="SwiGLUPacked", act_layer="SiLU")
_KAIKO_NOTE = ("timm port by 1aurent of kaiko-ai/towards_large_pathology_fms; card transform: Resize(224) + "
               "CenterCrop(224) (bilinear), mean/std 0.5; features = the model's CLS output")



def _kaiko(name: str, architecture: str, dim: int, params: str, img_size: int = 224, note: str = "") -> "Preset":
    """A kaiko.ai model as 1aurent's timm port publishes it (one repo per architecture)."""
    repo = f"1aurent/{architecture}.kaiko_ai_towards_large_pathology_fms"
    return Preset(name, "timm", architecture, _kw(img_size=img_size, dynamic_img_size=True), 224, HALF, HALF, "bilinear",
                  "cls", dim, params, "other (kaiko.ai, see card)", False, repo, ("model.safetensors",),
                  f"https://huggingface.co/{repo}", _KAIKO_NOTE + note)


PRESETS: tuple[Preset, ...] = (
    Preset("efficientnet_b1", "timm", "efficientnet_b1", (), 240, HALF, HALF, "bicubic", None, 1280,
           "7.8M", "Apache-2.0", False, None, source="https://huggingface.co/timm/efficientnet_b1.ra4_e3600_r240_in1k",
           notes="ImageNet default; published count includes the classifier hexpr drops", params_with_head=True),
    Preset("vit_small_patch16_224.augreg_in1k", "timm", "vit_small_patch16_224.augreg_in1k", (), 224, HALF, HALF,
           "bicubic", "cls", 384, "22.1M", "Apache-2.0", False, None,
           source="https://huggingface.co/timm/vit_small_patch16_224.augreg_in1k", notes="ImageNet default",
           params_with_head=True),
    Preset("uni", "timm", "vit_large_patch16_224",
           _kw(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True), 224, IMAGENET_MEAN,
           IMAGENET_STD, "bilinear", "cls", 1024, "303M", "CC-BY-NC-ND-4.0", True, "MahmoodLab/UNI",
           ("pytorch_model.bin",), "https://huggingface.co/MahmoodLab/UNI",
           "card transform: Resize(224) + CenterCrop(224) (torchvision default bilinear), ImageNet mean/std"),
    Preset("uni2-h", "timm", "vit_giant_patch14_224",
           _kw(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
               mlp_ratio=2.66667 * 2, no_embed_class=True, **dict(_SWIGLU), reg_tokens=8, dynamic_img_size=True),
           224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", "cls", 1536, "681M", "CC-BY-NC-ND-4.0", True,
           "MahmoodLab/UNI2-h", ("pytorch_model.bin",), "https://huggingface.co/MahmoodLab/UNI2-h",
           "card: timm_kwargs with mlp_layer=SwiGLUPacked, act_layer=SiLU, 8 register tokens; CLS output"),
    Preset("virchow", "timm", "vit_huge_patch14_224",
           _kw(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, **dict(_SWIGLU)),
           224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", "cls+mean", 2560, "632M", "Apache-2.0", True,
           "paige-ai/Virchow", ("pytorch_model.bin", "model.safetensors"), "https://huggingface.co/paige-ai/Virchow",
           "card embedding: CLS concatenated with the mean of the patch tokens (1280 + 1280)"),
    Preset("virchow2", "timm", "vit_huge_patch14_224",
           _kw(img_size=224, init_values=1e-5, reg_tokens=4, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
               **dict(_SWIGLU)),
           224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", "cls+mean", 2560, "632M", "CC-BY-NC-ND-4.0", True,
           "paige-ai/Virchow2", ("pytorch_model.bin", "model.safetensors"), "https://huggingface.co/paige-ai/Virchow2",
           "card embedding: CLS + mean of patch tokens 5: (the 4 register tokens excluded)"),
    Preset("h-optimus-0", "timm", "vit_giant_patch14_reg4_dinov2",
           _kw(img_size=224, init_values=1e-5, dynamic_img_size=False, global_pool="token"), 224, HOPTIMUS_MEAN,
           HOPTIMUS_STD, "bicubic", "cls", 1536, "1.1B", "Apache-2.0", True, "bioptimus/H-optimus-0",
           ("pytorch_model.bin", "model.safetensors"), "https://huggingface.co/bioptimus/H-optimus-0",
           "card feeds 224 px tiles at 0.5 um/px (no resize) with its own mean/std; timm's DINOv2 default of 518 px "
           "is overridden by img_size=224 from the hub config"),
    Preset("h-optimus-1", "timm", "vit_giant_patch14_reg4_dinov2",
           _kw(img_size=224, init_values=1e-5, dynamic_img_size=False, global_pool="token"), 224, HOPTIMUS_MEAN,
           HOPTIMUS_STD, "bicubic", "cls", 1536, "1.1B", "other (Bioptimus, non-commercial)", True,
           "bioptimus/H-optimus-1", ("pytorch_model.bin", "model.safetensors"),
           "https://huggingface.co/bioptimus/H-optimus-1", "same architecture and normalisation as H-optimus-0"),
    Preset("h0-mini", "timm", "vit_base_patch14_reg4_dinov2",
           _kw(img_size=224, global_pool="", **dict(_SWIGLU)), 224, HOPTIMUS_MEAN, HOPTIMUS_STD, "bicubic",
           "cls+mean", 1536, None, "CC-BY-NC-ND-4.0", True, "bioptimus/H0-mini",
           ("pytorch_model.bin", "model.safetensors"), "https://huggingface.co/bioptimus/H0-mini",
           "card: output (1, 261, 768); features = CLS + mean of tokens from num_prefix_tokens (1536); no published "
           "parameter count (71.6M as built)"),
    Preset("prov-gigapath", "timm", "vit_giant_patch14_dinov2",
           _kw(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
               mlp_ratio=5.33334),
           224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", "cls", 1536, "1.1B", "Apache-2.0", True,
           "prov-gigapath/prov-gigapath", ("pytorch_model.bin",), "https://huggingface.co/prov-gigapath/prov-gigapath",
           "tile encoder; hub config keeps the name vit_giant_patch14_dinov2 but sets patch_size=16 (the code wins "
           "over the name). Card transform: Resize(256) + CenterCrop(224), bicubic: hexpr resizes the patch to 224"),
    Preset("phikon", "transformers", "ViTModel",
           _kw(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
               patch_size=16, qkv_bias=True, layer_norm_eps=1e-12, add_pooling_layer=False),
           224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", "cls", 768, "86M", "other (Owkin non-commercial)", False,
           "owkin/phikon", ("model.safetensors", "pytorch_model.bin"), "https://huggingface.co/owkin/phikon",
           "card: ViTModel(add_pooling_layer=False), last_hidden_state[:, 0]; a snapshot's config.json wins over "
           "these kwargs", ignore_prefixes=("pooler.",)),
    Preset("phikon-v2", "transformers", "Dinov2Model",
           _kw(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, image_size=224,
               patch_size=16, layer_norm_eps=1e-6, use_swiglu_ffn=False),
           224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", "cls", 1024, "300M", "other (Owkin non-commercial)", False,
           "owkin/phikon-v2", ("model.safetensors",), "https://huggingface.co/owkin/phikon-v2",
           "card: AutoModel, last_hidden_state[:, 0]; ViT-L/16 trained with DINOv2"),
    Preset("hibou-b", "transformers", "Dinov2WithRegistersModel",
           _kw(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, image_size=224,
               patch_size=14, num_register_tokens=4, layer_norm_eps=1e-6),
           224, HIBOU_MEAN, HIBOU_STD, "bicubic", "cls", 768, "86M", "Apache-2.0", False, "histai/hibou-b",
           ("model.safetensors",), "https://huggingface.co/histai/hibou-b",
           "card loads custom code (trust_remote_code); hexpr builds transformers' Dinov2WithRegistersModel instead "
           "(no remote code); card features = pooler_output = normalised CLS"),
    Preset("hibou-l", "transformers", "Dinov2WithRegistersModel",
           _kw(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, image_size=224,
               patch_size=14, num_register_tokens=4, layer_norm_eps=1e-6),
           224, HIBOU_MEAN, HIBOU_STD, "bicubic", "cls", 1024, "304M", "Apache-2.0", True, "histai/hibou-L",
           ("model.safetensors",), "https://huggingface.co/histai/hibou-L",
           "as hibou-b (ViT-L/14 with 4 registers)"),
    _kaiko("kaiko-vits16", "vit_small_patch16_224", 384, "22M"),
    _kaiko("kaiko-vits8", "vit_small_patch8_224", 384, "22M"),
    _kaiko("kaiko-vitb16", "vit_base_patch16_224", 768, "86M"),
    _kaiko("kaiko-vitb8", "vit_base_patch8_224", 768, "86M"),
    _kaiko("kaiko-vitl14", "vit_large_patch14_reg4_dinov2", 1024, "304M", img_size=518,
           note="; built at 518 px (its position embeddings), fed 224 px (dynamic_img_size interpolates)"),
    Preset("lunit-vits8", "timm", "vit_small_patch8_224", _kw(img_size=224, dynamic_img_size=True), 224, LUNIT_MEAN,
           LUNIT_STD, "bicubic", "cls", 384, "22M", "other (Lunit, non-commercial)", False,
           "1aurent/vit_small_patch8_224.lunit_dino", ("model.safetensors",),
           "https://huggingface.co/1aurent/vit_small_patch8_224.lunit_dino",
           "Lunit-io/benchmark-ssl DINO ViT-S/8 (timm port); Lunit's own mean/std"),
    Preset("midnight", "transformers", "Dinov2Model",
           _kw(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, image_size=224,
               patch_size=14, layer_norm_eps=1e-6, use_swiglu_ffn=True),
           224, HALF, HALF, "bilinear", "cls+mean", 3072, "1.1B", "MIT", False, "kaiko-ai/midnight",
           ("model.safetensors",), "https://huggingface.co/kaiko-ai/midnight",
           "card: AutoModel; classification embedding = CLS + mean of patch tokens (3072); Resize(224) + "
           "CenterCrop(224), mean/std 0.5"),
    Preset("conch", "conch", "ViT-B-16",
           _kw(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
               dynamic_img_size=True, pool_dim=512, pool_heads=8),
           448, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic", None, 512, None, "CC-BY-NC-ND-4.0", True,
           "MahmoodLab/CONCH", ("pytorch_model.bin",), "https://huggingface.co/MahmoodLab/CONCH",
           "image encoder only, as the card's encode_image(proj_contrast=False, normalize=False): timm ViT-B/16 "
           "trunk at 448 px + attention pooler (1 query, 8 heads, 512-d) + LayerNorm; built by hexpr (CONCH's "
           "package is not on PyPI); the text tower's tensors are ignored. Card gives the vision encoder as ViT-B/16 "
           "(~90M); the caption pooler hexpr drops is part of that, 87.6M as built",
           ignore_prefixes=("attn_pool_caption.", "ln_caption.", "proj_contrast")),  # after "visual." is stripped
)

_BY_NAME = {p.name: p for p in PRESETS}


def get_preset(name: str) -> Preset | None:
    """The preset called ``name`` (case-insensitive), or None."""
    return _BY_NAME.get(name.strip().lower()) or _BY_NAME.get(name.strip())


def preset_names() -> list[str]:
    return [p.name for p in PRESETS]


# ----------------------------------------------------------------------------- local weights


def hub_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps downloads, read from the environment (no import, no network)."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    dirs.append(hf_home / "hub")
    return list(dict.fromkeys(dirs))


def snapshot_dirs(repo_id: str) -> list[Path]:
    """Snapshot folders of ``repo_id`` in the local hub caches, the one ``refs/main`` names first."""
    found = []
    for cache in hub_cache_dirs():
        repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
        snapshots = repo_dir / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = repo_dir / "refs" / "main"
        main = ref.read_text().strip() if ref.is_file() else None
        candidates = sorted(snapshots.iterdir(), key=lambda p: (p.name != main, -p.stat().st_mtime))
        found += [c for c in candidates if c.is_dir()]
    return found


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def weights_in_folder(folder: Path, preferred: tuple = ()) -> Path | None:
    """The weights file in a downloaded model folder: a preferred name first, else the only weights file."""
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return files[0] if len(files) == 1 else None


def find_local_weights(preset: Preset) -> Path | None:
    """The preset's weights file in a local hub cache snapshot, or None (offline, no network)."""
    if not preset.hub_repo:
        return None
    for snapshot in snapshot_dirs(preset.hub_repo):
        path = weights_in_folder(snapshot, preset.weight_files)
        if path is not None:
            return path
    return None


# ----------------------------------------------------------------------------- listing


def preset_rows(check_local: bool = True) -> list[dict]:
    """One dict per preset for ``hexpr backbones`` (and README): what it is and whether weights are here."""
    rows = []
    for p in PRESETS:
        local = find_local_weights(p) if check_local else None
        rows.append({
            "name": p.name, "backend": p.backend, "architecture": p.architecture, "dim": p.dim,
            "input": f"{p.size}px", "params": p.params or "-", "pooling": p.pool or "model",
            "licence": p.licence + (" (gated)" if p.gated else ""), "hub_repo": p.hub_repo or "timm",
            "weights_local": str(local) if local else "",
            "source": p.source,
        })
    return rows


def markdown_table() -> str:
    """README's preset table (``python -c "from embedder.presets import markdown_table; print(markdown_table())"``)."""
    columns = ("name", "backend", "dim", "input", "params", "pooling", "licence", "hub_repo")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in preset_rows(check_local=False):
        lines.append("| " + " | ".join(f"`{row[c]}`" if c in ("name", "hub_repo") else str(row[c]) for c in columns) + " |")
    return "\n".join(lines)
