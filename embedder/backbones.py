"""Backbones by timm name: a spec (name, weights, model kwargs, preprocessing) -> model + preprocessing.

The only module that imports timm. Each backbone carries its own preprocessing, resolved from
timm's data config (``timm.data.resolve_model_data_config``) and overridable per spec; there are
no model-specific branches anywhere.

Weights, per spec:
* ``"pretrained"``: timm's pretrained weights (Hugging Face hub or the local hub cache);
* ``"none"``: random initialisation (seeded, so features are reproducible); a warning is printed;
* a path to a ``.safetensors`` / ``.pth`` / ``.bin`` file: loaded offline, checked key by key.

Named presets (``embedder.presets``: ``uni``, ``virchow2``, ``phikon``, ``conch`` ...) expand to a full
spec (architecture, exact kwargs, input size, mean/std, pooling); their weights may also be a
downloaded folder or sit in the local hub cache. ViT specs take ``pool=cls|mean|cls+mean``.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from hexpr.embedder.errors import ModelError, RandomInitWarning  # noqa: F401 (RandomInitWarning: re-exported)
from hexpr.embedder.files import read_config
from hexpr.embedder.presets import POOLINGS, Preset, get_preset, preset_names
from hexpr.embedder.torch_install import require_torchvision
from hexpr.embedder.weights import WeightsError, assign_state_dict, config_json_beside, locate_preset_weights, read_state_dict

DEFAULT_BACKBONES = ("efficientnet_b1", "vit_small_patch16_224.augreg_in1k")
PRETRAINED = "pretrained"
RANDOM_INIT = "none"
RANDOM_INIT_SEED = 0
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "timm/")
_SPEC_KEYS = {"weights", "mean", "std", "size", "interpolation", "crop_pct", "pool", "preset", "stages"}
_OPTIONAL_KEYS = ("pool", "preset", "stages")  # left out of the spec's dict when unset, so older cache keys stay
# constructor kwargs whose string values name a class (timm.layers first, then torch.nn)
_CLASS_KWARGS = ("mlp_layer", "act_layer", "norm_layer", "embed_layer", "block_fn")


class BackboneError(ModelError):
    """A backbone cannot be created or its weights cannot be loaded; the message says how to fix it."""


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that determines a backbone's features (besides the images)."""

    name: str
    weights: str = PRETRAINED
    model_kwargs: dict = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    size: int | None = None  # square input side; None = the model's own input size
    interpolation: str | None = None
    crop_pct: float | None = None  # None = resize the whole patch (default); 0.875 = centre crop like timm eval
    pool: str | None = None  # ViT token pooling: cls | mean | cls+mean; None = the model's own output
    preset: str | None = None  # the preset this spec was expanded from (its backend and weights location)
    stages: tuple[int, ...] | None = None  # intermediate stages whose mean-pooled outputs follow the model's own features

    def __hash__(self):
        return hash(self.to_json())

    @property
    def label(self) -> str:
        """Short, file-name-safe label."""
        base = (self.preset or self.name).split("/")[-1].replace(":", "_")
        return "".join(c if c.isalnum() or c in "._-" else "_" for c in base)

    @property
    def is_random_init(self) -> bool:
        return self.weights == RANDOM_INIT

    @property
    def weights_is_file(self) -> bool:
        return self.weights not in (PRETRAINED, RANDOM_INIT)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean) if self.mean is not None else None
        d["std"] = list(self.std) if self.std is not None else None
        d["stages"] = list(self.stages) if self.stages is not None else None
        for key in _OPTIONAL_KEYS:
            if d[key] is None:
                del d[key]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        unknown = set(d) - {"name", "model_kwargs", *_SPEC_KEYS}
        if unknown:
            raise BackboneError(f"unknown backbone spec field(s) {sorted(unknown)} in {d}")
        d = dict(d)
        for key in ("mean", "std"):
            if d.get(key) is not None:
                d[key] = tuple(float(v) for v in d[key])
        d["model_kwargs"] = dict(d.get("model_kwargs") or {})
        if d.get("stages") is not None:
            d["stages"] = _check_stages(d.get("name"), d["stages"])
        if d.get("pool") is not None and d["pool"] not in POOLINGS:
            raise BackboneError(f"backbone {d.get('name')!r}: pool={d['pool']!r}; use one of {', '.join(POOLINGS)}")
        if d.get("preset") is not None and get_preset(d["preset"]) is None:
            raise BackboneError(f"unknown backbone preset {d['preset']!r}; presets: {', '.join(preset_names())}")
        return cls(**d)

    def identity(self) -> dict:
        """What a fitted head must match: the spec with the weights replaced by their content id."""
        d = self.to_dict()
        d["weights"] = weights_identity(self.weights, self.preset)
        return d


def _check_stages(name, stages) -> tuple[int, ...] | None:
    """Stage indices as a sorted tuple of distinct non-negative ints (None when empty)."""
    try:
        values = [int(v) for v in stages]
        ok = all(float(v) == int(v) for v in stages) and all(v >= 0 for v in values)
    except (TypeError, ValueError):
        ok = False
    if not ok or len(set(values)) != len(values):
        raise BackboneError(f"backbone {name!r}: stages={stages!r}; give distinct stage numbers from 0 up, e.g. stages=2/3/4")
    return tuple(sorted(values)) or None


def weights_identity(weights: str, preset: str | None = None) -> str:
    row = get_preset(preset) if preset else None
    if row is not None and row.hub_repo and weights == PRETRAINED:
        return f"hub:{row.hub_repo}"
    if weights not in (PRETRAINED, RANDOM_INIT) and Path(weights).is_dir():

        if row is None:
            raise BackboneError(f"weights {weights} is a folder: only presets take a folder; give the weights file")
        try:
            weights = str(locate_preset_weights(row, weights, online=False, spec_text=preset))
        except WeightsError as exc:
            raise BackboneError(str(exc)) from exc
    if weights in (PRETRAINED, RANDOM_INIT):
        return f"random-init(seed={RANDOM_INIT_SEED})" if weights == RANDOM_INIT else "timm-pretrained"
    return "sha256:" + file_sha256(weights)


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise BackboneError(f"weights file {p} not found. Give an existing .safetensors/.pth/.bin file, 'pretrained' or 'none'.")
    st = p.stat()
    return _sha256_cached(str(p.resolve()), st.st_size, st.st_mtime)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_backbone(text: str, default_weights: str = PRETRAINED) -> BackboneSpec:
    """Parse ``NAME[:key=value,key=value...]``.

    Keys: ``weights`` (pretrained | none | path), ``mean``/``std`` (``0.5/0.5/0.5``), ``size``,
    ``interpolation``, ``crop_pct``; any other key is passed to ``timm.create_model`` (values are
    read as JSON when they parse, e.g. ``drop_rate=0.1``, else as strings, e.g. ``pad_type=same``).
    ``pool`` (cls | mean | cls+mean) pools a ViT's tokens. ``stages`` (``2/3/4``) appends the
    mean-pooled outputs of those intermediate stages (timm's ``forward_intermediates`` numbering,
    0 = the stem) to the model's own features: mid-level texture that ImageNet's last layer has
    already abstracted away. Hub names keep their colon:
    ``hf-hub:MahmoodLab/UNI:weights=none``. A preset name (``uni``, ``virchow2``, see
    ``embedder.presets``) expands to its card's full spec; options then override single values
    (``uni:weights=/models/uni.bin``, ``uni:depth=2``).
    """
    text = text.strip()
    prefix = next((p for p in _HUB_PREFIXES if text.startswith(p) and p.endswith(":")), "")
    rest = text[len(prefix):]
    name, _, options = rest.partition(":")
    name = prefix + name
    if not name or name == prefix:
        raise BackboneError(f"backbone {text!r}: empty model name")
    fields: dict = {"name": name, "weights": default_weights, "model_kwargs": {}}
    preset = get_preset(name) if not prefix else None
    if preset is not None and not preset.is_plain_timm_name:
        fields.update(name=preset.architecture, preset=preset.name, model_kwargs=preset.model_kwargs,
                      mean=preset.mean, std=preset.std, size=preset.size, interpolation=preset.interpolation,
                      pool=preset.pool)
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise BackboneError(f"backbone {text!r}: option {item!r} is not key=value")
        key, value = key.strip(), value.strip()
        if key in ("mean", "std"):
            try:
                fields[key] = tuple(float(v) for v in value.split("/"))
            except ValueError as exc:
                raise BackboneError(f"backbone {text!r}: {key} must look like 0.5/0.5/0.5") from exc
        elif key == "size":
            fields[key] = int(value)
        elif key == "crop_pct":
            fields[key] = float(value)
        elif key in ("weights", "interpolation"):
            fields[key] = value
        elif key == "pool":
            fields[key] = None if value in ("", "none", "model") else value
        elif key == "stages":
            try:
                fields[key] = tuple(int(v) for v in value.split("/") if v.strip()) if value not in ("", "none") else None
            except ValueError as exc:
                raise BackboneError(f"backbone {text!r}: stages must look like 2/3/4 (stage numbers)") from exc
        else:
            fields["model_kwargs"][key] = _parse_value(value)
    return BackboneSpec.from_dict(fields)


def load_backbone_config(path: str | Path) -> list[BackboneSpec]:
    """A JSON or YAML file: a list of spec dicts (or {"backbones": [...]})."""
    data = read_config(path)
    if isinstance(data, dict):
        data = data.get("backbones", data)
    if not isinstance(data, list) or not data:
        raise BackboneError(f"{path}: expected a non-empty list of backbone specs")
    return [BackboneSpec.from_dict(d) if isinstance(d, dict) else parse_backbone(str(d)) for d in data]


# ----------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """How one backbone wants its input: uint8 resize in workers, normalisation on the device."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float | None

    def to_dict(self) -> dict:
        return asdict(self)

    def resize_uint8(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, height, width) uint8 tensor: optional centre crop, then resize."""
        require_torchvision()
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as tvf

        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        if self.crop_pct is not None:
            h, w = tensor.shape[1:]
            side = max(1, int(round(min(h, w) * self.crop_pct)))
            tensor = tvf.center_crop(tensor, [side, side])
        if tuple(tensor.shape[1:]) == (self.height, self.width):
            return tensor.contiguous()
        mode = InterpolationMode(self.interpolation)
        return tvf.resize(tensor, [self.height, self.width], interpolation=mode, antialias=True).contiguous()

    def normalize(self, batch_uint8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """(B, 3, H, W) uint8 on any device -> normalised float."""
        mean = torch.tensor(self.mean, device=batch_uint8.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=batch_uint8.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return ((batch_uint8.float() - mean) / std).to(dtype)


def resolve_preprocess(model: torch.nn.Module, spec: BackboneSpec) -> Preprocess:
    require_torchvision()
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    _, h, w = config["input_size"]
    if spec.size is not None:
        h = w = int(spec.size)
    mean = tuple(spec.mean or config["mean"])
    std = tuple(spec.std or config["std"])
    if len(mean) != 3 or len(std) != 3:
        raise BackboneError(f"{spec.name}: mean and std need 3 values (RGB), got {mean} / {std}")
    interpolation = spec.interpolation or config.get("interpolation", "bicubic")
    return Preprocess(int(h), int(w), mean, std, interpolation, spec.crop_pct)


# ----------------------------------------------------------------------------- creation


@dataclass
class LoadedBackbone:
    spec: BackboneSpec
    model: torch.nn.Module
    preprocess: Preprocess
    num_features: int
    weights_source: str
    weights_sha256: str | None


_HUB_HOST = ("huggingface.co", 443)


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hugging Face hub be reached? Bounded in time (DNS included)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    result = []

    def probe():
        try:
            with socket.create_connection(_HUB_HOST, timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _go_offline() -> None:
    """Make huggingface_hub use its local cache only, so an offline load fails at once."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass


def _offline_message(spec: BackboneSpec, cause: Exception | None) -> str:
    return (
        f"backbone {spec.name!r}: pretrained weights could not be loaded "
        f"({type(cause).__name__ if cause else 'offline'}: {str(cause).splitlines()[0] if cause else 'hub unreachable'}). "
        "The model hub is unreachable and the weights are not in the local cache. Fixes: "
        f"(1) give a local weights file: --backbone '{spec.name}:weights=/path/to/weights.safetensors'; "
        "(2) copy the hub cache (~/.cache/huggingface) from a machine with internet; "
        "(3) use random initialisation for testing only: --no-pretrained."
    )


def _class_by_name(key: str, name: str):
    require_torchvision()
    import timm.layers

    for module in (timm.layers, torch.nn):
        obj = getattr(module, name, None)
        if callable(obj):  # a class, or a partial of one (timm.layers.SwiGLUPacked)
            return obj
    raise BackboneError(f"{key}={name!r}: no class of that name in timm.layers or torch.nn (e.g. SwiGLUPacked, SiLU, GELU)")


def constructor_kwargs(model_kwargs: dict) -> dict:
    """Spec kwargs -> constructor kwargs: class-valued ones ("SwiGLUPacked", "SiLU") resolved by name."""
    return {k: _class_by_name(k, v) if k in _CLASS_KWARGS and isinstance(v, str) else v for k, v in model_kwargs.items()}


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D) or (B, 2D): CLS, mean of patch tokens (prefix/register tokens excluded), or both."""
    cls = tokens[:, 0]
    if pool == "cls":
        return cls
    mean = tokens[:, num_prefix_tokens:].mean(dim=1)
    return mean if pool == "mean" else torch.cat([cls, mean], dim=1)


class TimmTokenPool(torch.nn.Module):
    """A timm ViT whose tokens (``forward_features``) are pooled as the spec says."""

    def __init__(self, model: torch.nn.Module, pool: str):
        super().__init__()
        self.model, self.pool = model, pool
        self.fc_norm = getattr(model, "fc_norm", None) or torch.nn.Identity()

    def forward(self, x):
        tokens = self.model.forward_features(x)
        pooled = pool_tokens(tokens, self.pool, int(self.model.num_prefix_tokens))
        if isinstance(self.fc_norm, torch.nn.Identity):
            return pooled
        return torch.cat([self.fc_norm(part) for part in pooled.split(self.model.num_features, dim=1)], dim=1)


class HFTokenPool(torch.nn.Module):
    """A Hugging Face transformers vision model whose ``last_hidden_state`` is pooled as the spec says."""

    def __init__(self, model: torch.nn.Module, pool: str):
        super().__init__()
        self.model, self.pool = model, pool
        self.num_prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)

    def forward(self, x):
        return pool_tokens(self.model(pixel_values=x).last_hidden_state, self.pool, self.num_prefix_tokens)


class AttentionPooler(torch.nn.Module):
    """Learned queries attending over the tokens (CONCH's contrastive pooler; same tensor names)."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int = 1):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(queries, dim))
        self.attn = torch.nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim)
        self.ln_q = torch.nn.LayerNorm(dim)
        self.ln_k = torch.nn.LayerNorm(context_dim)

    def forward(self, tokens):
        keys = self.ln_k(tokens).permute(1, 0, 2)  # (N, B, C): sequence first
        query = self.ln_q(self.query).unsqueeze(1).expand(-1, keys.shape[1], -1)
        return self.attn(query, keys, keys, need_weights=False)[0].permute(1, 0, 2)


class ConchImageEncoder(torch.nn.Module):
    """CONCH's image embedding without the contrastive projection: ViT trunk -> attention pooler -> LayerNorm."""

    def __init__(self, pool_dim: int = 512, pool_heads: int = 8, **trunk_kwargs):
        super().__init__()
        require_torchvision()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(num_classes=0, **trunk_kwargs)
        self.attn_pool_contrast = AttentionPooler(pool_dim, self.trunk.num_features, pool_heads)
        self.ln_contrast = torch.nn.LayerNorm(pool_dim)
        self.num_features = pool_dim

    def forward(self, x):
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


class TimmStagePool(torch.nn.Module):
    """A timm model's own pooled features followed by the spatial means of intermediate stages, in one
    forward pass (``forward_intermediates``, then the model's head on the final map)."""

    def __init__(self, model: torch.nn.Module, stages: tuple[int, ...]):
        super().__init__()
        self.model, self.stages = model, list(stages)

    def forward(self, x):
        final, intermediates = self.model.forward_intermediates(x, indices=self.stages)
        pooled = self.model.forward_head(final, pre_logits=True)
        return torch.cat([pooled] + [t.mean(dim=(2, 3)) for t in intermediates], dim=1)


def stage_widths(model: torch.nn.Module, spec: BackboneSpec) -> list[int]:
    """Channels of each of ``spec.stages`` (timm's ``feature_info``); a clear error when the model
    has no such stages."""
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "forward_head") or not info:
        raise BackboneError(f"backbone {spec.name!r}: stages= needs a timm model with intermediate stages "
                            "(forward_intermediates); drop stages=")
    channels = [int(entry["num_chs"]) for entry in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
    bad = [s for s in spec.stages if s >= len(channels)]
    if bad:
        raise BackboneError(f"backbone {spec.name!r}: stages {'/'.join(map(str, bad))} do not exist; this model has "
                            f"stages 0 to {len(channels) - 1} ({'/'.join(map(str, channels))} channels)")
    return [channels[s] for s in spec.stages]


def _width(spec: BackboneSpec, base: int) -> int:
    return 2 * base if spec.pool == "cls+mean" else base


def _pooled_timm(model: torch.nn.Module, spec: BackboneSpec) -> tuple[torch.nn.Module, int]:
    """Wrap a timm model for ``spec.pool``; refuse outputs that are not one vector per image."""
    if spec.stages and spec.pool is not None:
        raise BackboneError(f"backbone {spec.name!r}: stages= adds pooled intermediate stages to the model's own "
                            "output; it cannot be combined with pool=; drop one of them")
    if spec.stages:
        return TimmStagePool(model, spec.stages), int(model.num_features) + sum(stage_widths(model, spec))
    if spec.pool is None:
        if getattr(model, "global_pool", None) == "":
            raise BackboneError(
                f"backbone {spec.name!r}: global_pool='' makes the model return one vector per token, not per image; "
                f"add pool=cls, pool=mean or pool=cls+mean (e.g. '{spec.name}:global_pool=,pool=cls+mean')")
        return model, int(model.num_features)
    if not hasattr(model, "num_prefix_tokens") or not hasattr(model, "forward_features"):
        raise BackboneError(f"backbone {spec.name!r}: pool={spec.pool} needs a ViT (token outputs); this model pools "
                            "itself: drop pool=")
    return TimmTokenPool(model, spec.pool), _width(spec, int(model.num_features))


def _build_timm(spec: BackboneSpec, kwargs: dict, config: dict | None):
    require_torchvision()
    import timm

    model = timm.create_model(spec.name, pretrained=False, **kwargs, num_classes=0)
    return model, (lambda state: state)


def _build_transformers(spec: BackboneSpec, kwargs: dict, config: dict | None):
    try:
        import transformers
    except ImportError as exc:
        raise BackboneError(f"backbone {spec.label!r} needs Hugging Face transformers: pip install 'hexpr[transformers]'") from exc
    model_class = getattr(transformers, spec.name, None)
    if model_class is None:
        raise BackboneError(f"backbone {spec.label!r}: transformers {transformers.__version__} has no {spec.name}; "
                            "upgrade transformers")
    init_kwargs = {k: kwargs.pop(k) for k in ("add_pooling_layer",) if k in kwargs}
    preset = get_preset(spec.preset)
    if config:  # a downloaded snapshot's own config wins over the table; the user's overrides win over both
        overrides = {k: v for k, v in kwargs.items() if preset.model_kwargs.get(k) != v}
        config = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "model_type", "transformers_version")}
        kwargs = {**config, **overrides}
    model = model_class(model_class.config_class(**kwargs), **init_kwargs)
    prefix = getattr(model, "base_model_prefix", "") + "."

    def adapt(state):
        return {k.removeprefix(prefix) if prefix != "." else k: v for k, v in state.items()}

    return model, adapt


def _build_conch(spec: BackboneSpec, kwargs: dict, config: dict | None):
    model = ConchImageEncoder(**kwargs)
    return model, (lambda state: {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")})


_BUILDERS = {"timm": _build_timm, "transformers": _build_transformers, "conch": _build_conch}


def _wrap(model: torch.nn.Module, spec: BackboneSpec, backend: str) -> tuple[torch.nn.Module, int]:
    if backend == "timm":
        return _pooled_timm(model, spec)
    if spec.stages:
        raise BackboneError(f"backbone {spec.label!r}: stages= works with timm models; this preset is built by "
                            f"{backend}; drop stages=")
    if backend == "transformers":
        pool = spec.pool or "cls"
        return HFTokenPool(model, pool), _width(spec, int(model.config.hidden_size)) if spec.pool else int(model.config.hidden_size)
    if spec.pool is not None:
        raise BackboneError(f"backbone {spec.label!r}: CONCH pools with its own attention pooler; drop pool=")
    return model, int(model.num_features)


def _read_and_assign(build, spec: BackboneSpec, kwargs: dict, path: Path, ignore_prefixes: tuple, config=None):
    """Build on the meta device and assign the file's tensors: one copy of the weights in memory."""

    try:
        state = read_state_dict(path)
    except Exception as exc:  # noqa: BLE001
        raise BackboneError(f"backbone {spec.label!r}: cannot read weights file {path}: {exc}") from exc
    with torch.device("meta"):
        model, adapt = build(spec, dict(kwargs), config)
    try:
        assign_state_dict(model, adapt(state), ignore_prefixes)
    except WeightsError as exc:
        raise BackboneError(f"backbone {spec.label!r}: weights in {path} do not match the model: {exc}. "
                            "Check the model name and kwargs (e.g. img_size, depth) the weights were trained with.") from exc
    return model


def _timm_classifier_prefixes(spec: BackboneSpec, kwargs: dict) -> tuple:
    require_torchvision()
    import timm

    with torch.device("meta"):
        probe = timm.create_model(spec.name, pretrained=False, **kwargs)
    classifier = getattr(probe, "pretrained_cfg", {}).get("classifier") or "head"
    return tuple(c + "." for c in ([classifier] if isinstance(classifier, str) else classifier))


def _load_timm_file(spec: BackboneSpec, kwargs: dict) -> torch.nn.Module:
    """A plain timm spec with a weights file (as before, but built on the meta device)."""
    path = Path(spec.weights)
    if not path.is_file():
        raise BackboneError(f"backbone {spec.name!r}: weights file {path} not found")
    ignore = _timm_classifier_prefixes(spec, kwargs)
    try:
        return _read_and_assign(_build_timm, spec, kwargs, path, ignore)
    except BackboneError as exc:
        if "not computable" not in str(exc):
            raise
    # models with computed (non-persistent) buffers: build for real and copy the weights in

    model, _ = _build_timm(spec, kwargs, None)
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(ignore)}
    model.load_state_dict(state, strict=True)
    return model


def build_architecture(spec: BackboneSpec) -> torch.nn.Module:
    """The model a spec describes, unloaded and unpooled (build under ``torch.device("meta")`` to count parameters)."""
    preset = get_preset(spec.preset) if spec.preset else None
    build = _BUILDERS[preset.backend if preset else "timm"]
    model, _ = build(spec, constructor_kwargs(spec.model_kwargs), None)
    return model


def _random_init_warning(spec: BackboneSpec) -> None:
    warnings.warn(
        f"{spec.label}: randomly initialised weights (no pretrained weights) - features are for testing, "
        "not for accuracy", RandomInitWarning, stacklevel=3,
    )


def _create_preset(spec: BackboneSpec, preset: Preset):
    """(model, weights source, sha256) for a preset spec: weights from a file, folder, hub cache or the hub."""

    build = _BUILDERS[preset.backend]
    kwargs = constructor_kwargs(spec.model_kwargs)
    if spec.is_random_init:
        torch.manual_seed(RANDOM_INIT_SEED)
        model, _ = build(spec, dict(kwargs), None)
        _random_init_warning(spec)
        return model, f"random-init(seed={RANDOM_INIT_SEED})", None
    online = spec.weights == PRETRAINED and hub_reachable(1.0)
    try:
        path = locate_preset_weights(preset, spec.weights, online, spec.label)
    except WeightsError as exc:
        raise BackboneError(str(exc)) from exc
    config = config_json_beside(path) if preset.backend == "transformers" else None
    model = _read_and_assign(build, spec, kwargs, path, preset.ignore_prefixes, config)
    return model, f"file:{path.resolve()}", file_sha256(path)


def create_backbone(spec: BackboneSpec, device: str | torch.device = "cpu") -> LoadedBackbone:
    """Create the frozen feature extractor for ``spec``: one vector per image (pooled)."""
    require_torchvision()
    import timm

    preset = get_preset(spec.preset) if spec.preset else None
    sha = None
    try:
        if preset is not None:
            model, source, sha = _create_preset(spec, preset)
        elif spec.weights == PRETRAINED:
            kwargs = {**constructor_kwargs(spec.model_kwargs), "num_classes": 0}
            if not hub_reachable():
                _go_offline()
            try:
                model = timm.create_model(spec.name, pretrained=True, **kwargs)
            except (OSError, ValueError) as exc:  # LocalEntryNotFound, connection errors, hub errors
                raise BackboneError(_offline_message(spec, exc)) from exc
            source = "timm-pretrained:" + str(getattr(model, "pretrained_cfg", {}).get("hf_hub_id") or spec.name)
        elif spec.is_random_init:
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _ = _build_timm(spec, constructor_kwargs(spec.model_kwargs), None)
            source = f"random-init(seed={RANDOM_INIT_SEED})"
            _random_init_warning(spec)
        else:
            model = _load_timm_file(spec, constructor_kwargs(spec.model_kwargs))
            sha = file_sha256(spec.weights)
            source = f"file:{Path(spec.weights).resolve()}"
    except RuntimeError as exc:
        if isinstance(exc, BackboneError):
            raise
        if "Unknown model" in str(exc) or "unknown model" in str(exc).lower():
            raise BackboneError(f"{spec.name!r} is not a timm model name (see timm.list_models())") from exc
        raise BackboneError(f"backbone {spec.name!r}: {exc}") from exc
    except (TypeError, KeyError, AssertionError) as exc:
        raise BackboneError(f"backbone {spec.name!r}: bad model kwargs {spec.model_kwargs}: {type(exc).__name__}: {exc}") from exc
    preprocess = _preset_preprocess(spec) if preset is not None else resolve_preprocess(model, spec)
    model, num_features = _wrap(model, spec, preset.backend if preset else "timm")
    model.eval().requires_grad_(False)
    model = model.to(device).to(memory_format=torch.channels_last)
    return LoadedBackbone(spec, model, preprocess, num_features, source, sha)


def _preset_preprocess(spec: BackboneSpec) -> Preprocess:
    return Preprocess(int(spec.size), int(spec.size), tuple(spec.mean), tuple(spec.std), spec.interpolation, spec.crop_pct)


def resolve_specs(backbones: list[str] | None = None, config: str | Path | None = None, no_pretrained: bool = False) -> list[BackboneSpec]:
    """Specs from CLI strings and/or a config file; the default pair when neither is given.

    ``no_pretrained`` switches every spec that does not name its weights to random initialisation.
    Example::

        >>> specs = hexpr.backbone_specs(["resnet18:weights=none,size=64"])
        >>> specs[0].name
        # -> 'resnet18'
    """
    default_weights = RANDOM_INIT if no_pretrained else PRETRAINED
    specs = [parse_backbone(text, default_weights) for text in (backbones or [])]
    if config is not None:
        loaded = load_backbone_config(config)
        if no_pretrained:
            loaded = [BackboneSpec.from_dict({**s.to_dict(), "weights": RANDOM_INIT}) if s.weights == PRETRAINED else s for s in loaded]
        specs += loaded
    if not specs:
        specs = [parse_backbone(name, default_weights) for name in DEFAULT_BACKBONES]
    labels = [s.to_json() for s in specs]
    if len(set(labels)) != len(labels):
        raise BackboneError("the same backbone spec is given twice")
    return specs
