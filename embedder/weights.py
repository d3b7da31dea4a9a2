"""Weights from where users have them, loaded without a second copy in memory.

* ``locate_preset_weights``: a file, a downloaded folder (``--local-dir`` or a hub snapshot), the
  local Hugging Face hub cache (found offline, no network), or a hub download when online. Offline
  and not found, it fails at once with what to do (request access, download, ``weights=``).
* ``read_state_dict``: ``.safetensors`` / ``.bin`` / ``.pth`` into tensors (``.bin``/``.pth`` memory-mapped).
* ``assign_state_dict``: load into a model built on the meta device (``assign=True``): the file's
  tensors become the parameters, so peak memory stays near one copy of the weights.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from hexpr.embedder.errors import ModelError
from hexpr.embedder.hub_ids import HUB_ID, parse_hub_id  # noqa: F401  (re-exported)
from hexpr.embedder.presets import Preset, hub_cache_dirs, snapshot_dirs, weights_in_folder


class WeightsError(ModelError):
    """Weights cannot be found or do not fit; the message says what to do. (backbones re-raises as BackboneError.)"""


def _unwrap(obj) -> dict:
    """The tensor dict inside a checkpoint: EMA weights first, then state_dict/model/module; 'module.' stripped."""
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key])
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | Path) -> dict:
    """Tensors of a weights file (safetensors, or a torch zip checkpoint memory-mapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return _unwrap(obj)


def assign_state_dict(model: torch.nn.Module, state: dict, ignore_prefixes: tuple = ()) -> None:
    """Put ``state`` into ``model`` (built on the meta device) by assignment; every tensor must be covered.

    Raises WeightsError naming missing and unexpected tensors (those under ``ignore_prefixes`` are
    dropped first), or shape mismatches.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{len(missing)} model tensors missing from the file (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"tensors (e.g. {unexpected[:3]}), {len(shapes)} shape mismatches (e.g. {shapes[:2]})")
    model.load_state_dict(state, strict=True, assign=True)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise WeightsError(f"tensors not in the checkpoint and not computable: {leftovers[:3]}")


def _hub_download(preset: Preset) -> Path:
    """Download the preset's weights file (and config) from the hub with the user's token."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with timm
        raise WeightsError("huggingface_hub is not installed: pip install huggingface_hub") from exc
    last = None
    for filename in preset.weight_files:
        try:
            path = Path(hf_hub_download(preset.hub_repo, filename))
        except (GatedRepoError, RepositoryNotFoundError) as exc:
            raise WeightsError(
                f"{preset.hub_repo} is gated or private and this account has no access: request access at "
                f"https://huggingface.co/{preset.hub_repo}, then `huggingface-cli login` (or set HF_TOKEN)") from exc
        except Exception as exc:  # noqa: BLE001 - file absent in this repo: try the next name
            last = exc
            continue
        try:
            hf_hub_download(preset.hub_repo, "config.json")
        except Exception:  # noqa: BLE001 - config is optional
            pass
        return path
    raise WeightsError(f"none of {list(preset.weight_files)} could be downloaded from {preset.hub_repo}: {last}")


def not_found_message(preset: Preset, spec_text: str) -> str:
    caches = ", ".join(str(d / ("models--" + preset.hub_repo.replace("/", "--"))) for d in hub_cache_dirs())
    access = (f"request access at https://huggingface.co/{preset.hub_repo} (gated), then " if preset.gated
              else "")
    return (
        f"backbone {spec_text!r}: weights for {preset.name} ({preset.hub_repo}) not found locally and the Hugging Face "
        f"hub is unreachable (offline). Looked in: {caches}. To fix: {access}download them on a machine with internet: "
        f"`huggingface-cli download {preset.hub_repo} --local-dir /models/{preset.name}` and give "
        f"-b '{preset.name}:weights=/models/{preset.name}' (a folder or the weights file), or copy the hub cache and "
        "set HF_HOME. For tests only: weights=none (random).")


def locate_preset_weights(preset: Preset, weights: str, online: bool, spec_text: str) -> Path:
    """The weights file for a preset: ``weights`` is 'pretrained', a file or a folder."""
    if weights != "pretrained":
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            found = weights_in_folder(path, preset.weight_files)
            if found is None and (path / "snapshots").is_dir():  # a models--org--name cache folder
                found = next((weights_in_folder(s, preset.weight_files) for s in sorted((path / "snapshots").iterdir())
                              if weights_in_folder(s, preset.weight_files)), None)
            if found is None:
                raise WeightsError(f"backbone {spec_text!r}: no weights file ({', '.join(preset.weight_files) or '*.safetensors'}) "
                                   f"in folder {path}")
            return found
        raise WeightsError(f"backbone {spec_text!r}: weights {path} not found (give a file, a downloaded folder, "
                           "'pretrained' or 'none')")
    for snapshot in snapshot_dirs(preset.hub_repo):
        found = weights_in_folder(snapshot, preset.weight_files)
        if found is not None:
            return found
    if not online:
        raise WeightsError(not_found_message(preset, spec_text))
    return _hub_download(preset)


def config_json_beside(weights_file: Path) -> dict | None:
    """The config.json next to a weights file (hub snapshots and --local-dir downloads carry one)."""
    import json

    config = weights_file.parent / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text())
        except (OSError, ValueError):
            return None
    return None


# --------------------------------------------------------------------------------------------
# hexpr models by Hugging Face repo id (the same offline behaviour as the presets' weights)
# --------------------------------------------------------------------------------------------
def locate_hub_model(repo_id: str, revision: str | None, online: bool, required: str = "config.json") -> Path:
    """The local folder of model repository ``repo_id`` at ``revision`` (default: main): a snapshot of
    the local hub cache (found offline, no network), else a download when online. Offline and not
    cached, it fails at once naming the caches it searched and what to do."""
    from huggingface_hub import snapshot_download

    for cache in hub_cache_dirs():
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in this cache (or an incomplete snapshot): try the next
            continue
        if (folder / required).is_file():
            return folder
    where = f"{repo_id}@{revision}" if revision else repo_id
    if not online:
        caches = ", ".join(str(d / ("models--" + repo_id.replace("/", "--"))) for d in hub_cache_dirs())
        raise WeightsError(
            f"model {where!r}: not found in the local Hugging Face cache and the hub is unreachable (offline). Looked "
            f"in: {caches}. To fix: on a machine with internet run `huggingface-cli download {repo_id}"
            f"{' --revision ' + revision if revision else ''}` and copy the hub cache (set HF_HOME or HF_HUB_CACHE to "
            "it), or download into a folder (--local-dir) and give that folder instead of the id")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision))
    except Exception as exc:  # noqa: BLE001 - unknown repo, gated, no such revision: one message
        raise WeightsError(f"model {where!r} could not be downloaded from the Hugging Face hub "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check the id "
                           "and revision, and for a private repo `huggingface-cli login`") from None
    if not (folder / required).is_file():
        raise WeightsError(f"model {where!r} has no {required}: it is not a hexpr model repository")
    return folder
