"""Backbones by timm name: a spec (name, weights, model kwargs, preprocessing) -> model + preprocessing.

The only module that imports timm. Each backbone carries its own preprocessing, resolved from
timm's data config (``timm.data.resolve_model_data_config``) and overridable per spec; there are
no model-specific branches anywhere.

Weights, per spec:
* ``"pretrained"``: timm's pretrained weights (Hugging Face hub or the local hub cache);
* ``"none"``: random initialisation (seeded, so features are reproducible); a warning is printed;
* a path to a ``.safetensors`` / ``.pth`` / ``.bin`` file: loaded offline, checked key by key.
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

from embedder.errors import ModelError
from embedder.files import read_config

DEFAULT_BACKBONES = ("efficientnet_b1", "vit_small_patch16_224.augreg_in1k")
PRETRAINED = "pretrained"
RANDOM_INIT = "none"
RANDOM_INIT_SEED = 0
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "timm/")
_SPEC_KEYS = {"weights", "mean", "std", "size", "interpolation", "crop_pct"}


class BackboneError(ModelError):
    """A backbone cannot be created or its weights cannot be loaded; the message says how to fix it."""


class RandomInitWarning(UserWarning):
    """Features come from randomly initialised weights."""


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

    def __hash__(self):
        return hash(self.to_json())

    @property
    def label(self) -> str:
        """Short, file-name-safe label."""
        base = self.name.split("/")[-1].replace(":", "_")
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
        return cls(**d)

    def identity(self) -> dict:
        """What a fitted head must match: the spec with the weights replaced by their content id."""
        d = self.to_dict()
        d["weights"] = weights_identity(self.weights)
        return d


def weights_identity(weights: str) -> str:
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
        raise BackboneError(f"weights file {p} not found. Give an existing .safetensors/.pth file, 'pretrained' or 'none'.")
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
    Hub names keep their colon: ``hf-hub:MahmoodLab/UNI:weights=none``.
    """
    text = text.strip()
    prefix = next((p for p in _HUB_PREFIXES if text.startswith(p) and p.endswith(":")), "")
    rest = text[len(prefix):]
    name, _, options = rest.partition(":")
    name = prefix + name
    if not name or name == prefix:
        raise BackboneError(f"backbone {text!r}: empty model name")
    fields: dict = {"name": name, "weights": default_weights, "model_kwargs": {}}
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


def _unwrap_state_dict(obj) -> dict:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap_state_dict(obj[key])
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_weights_file(model: torch.nn.Module, spec: BackboneSpec) -> None:
    import timm.models

    path = Path(spec.weights)
    if not path.is_file():
        raise BackboneError(f"backbone {spec.name!r}: weights file {path} not found")
    try:
        state = _unwrap_state_dict(timm.models.load_state_dict(str(path), use_ema=True))
    except Exception as exc:  # noqa: BLE001
        raise BackboneError(f"backbone {spec.name!r}: cannot read weights file {path}: {exc}") from exc
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise BackboneError(
            f"backbone {spec.name!r}: weights in {path} do not fit the model ({str(exc).splitlines()[1:3]}). "
            "Check the model name and model kwargs (e.g. img_size, pad_type) the weights were trained with."
        ) from exc
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    classifier_prefixes = tuple(c + "." for c in ([classifier] if isinstance(classifier, str) else classifier))
    unexpected = [k for k in result.unexpected_keys if not k.startswith(classifier_prefixes)]
    if result.missing_keys or unexpected:
        raise BackboneError(
            f"backbone {spec.name!r}: weights in {path} do not match the model: {len(result.missing_keys)} model "
            f"tensors missing from the file (e.g. {result.missing_keys[:3]}), {len(unexpected)} unexpected tensors "
            f"(e.g. {unexpected[:3]}). Check the model name and kwargs."
        )


def create_backbone(spec: BackboneSpec, device: str | torch.device = "cpu") -> LoadedBackbone:
    """Create the frozen, pooled (``num_classes=0``) feature extractor for ``spec``."""
    import timm

    kwargs = {**spec.model_kwargs, "num_classes": 0}
    sha = None
    try:
        if spec.weights == PRETRAINED:
            if not hub_reachable():
                _go_offline()
            try:
                model = timm.create_model(spec.name, pretrained=True, **kwargs)
            except (OSError, ValueError) as exc:  # LocalEntryNotFound, connection errors, hub errors
                raise BackboneError(_offline_message(spec, exc)) from exc
            source = "timm-pretrained:" + str(getattr(model, "pretrained_cfg", {}).get("hf_hub_id") or spec.name)
        else:
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(spec.name, pretrained=False, **kwargs)
            if spec.is_random_init:
                source = f"random-init(seed={RANDOM_INIT_SEED})"
                warnings.warn(
                    f"{spec.name}: randomly initialised weights (no pretrained weights) - features are for testing, "
                    "not for accuracy", RandomInitWarning, stacklevel=2,
                )
            else:
                _load_weights_file(model, spec)
                sha = file_sha256(spec.weights)
                source = f"file:{Path(spec.weights).resolve()}"
    except RuntimeError as exc:
        if isinstance(exc, BackboneError):
            raise
        if "Unknown model" in str(exc) or "unknown model" in str(exc).lower():
            raise BackboneError(f"{spec.name!r} is not a timm model name (see timm.list_models())") from exc
        raise BackboneError(f"backbone {spec.name!r}: {exc}") from exc
    except TypeError as exc:
        raise BackboneError(f"backbone {spec.name!r}: bad model kwargs {spec.model_kwargs}: {exc}") from exc
    model.eval().requires_grad_(False)
    preprocess = resolve_preprocess(model, spec)
    model = model.to(device).to(memory_format=torch.channels_last)
    return LoadedBackbone(spec, model, preprocess, int(model.num_features), source, sha)


def resolve_specs(backbones: list[str] | None = None, config: str | Path | None = None, no_pretrained: bool = False) -> list[BackboneSpec]:
    """Specs from CLI strings and/or a config file; the default pair when neither is given.

    ``no_pretrained`` switches every spec that does not name its weights to random initialisation.
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
