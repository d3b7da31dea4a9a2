"""A torch and torchvision that work together, or one clear error saying how to get a matching pair.

A torchvision built for another torch (a pinned torch beside the registry's newest torchvision, a
conda/pip mix, a CPU wheel beside a CUDA one) fails deep inside ``import timm`` with
``operator torchvision::nms does not exist``. hexpr loads torchvision (and timm, which imports it)
through :func:`require_torchvision` first, so that mistake is one ``Error:`` line naming both
versions and the pip command that installs a pair made for each other.
"""
from __future__ import annotations

import functools
from importlib import metadata

from hexpr.embedder.errors import HexprError, brief


class TorchInstallError(HexprError, RuntimeError):
    """torch and torchvision are installed but do not work together."""


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (from its metadata, without importing it), or '?'."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"


def matching_torchvision(torch_version: str) -> str | None:
    """The torchvision series built for ``torch_version``: torch 2.N pairs with torchvision 0.(N+15)."""
    parts = torch_version.split("+")[0].split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None
    return f"0.{minor + 15}" if major == 2 else None


def pairing_advice(torch_version: str) -> str:
    """The pip command that installs a torchvision made for this torch (or lets pip pick both)."""
    series = matching_torchvision(torch_version)
    if series is None:
        return "python3 -m pip install --upgrade torch torchvision (pip then resolves a matching pair)"
    torch_series = ".".join(torch_version.split("+")[0].split(".")[:2])
    return (f"python3 -m pip install 'torch=={torch_series}.*' 'torchvision=={series}.*' "
            "(torch 2.N pairs with torchvision 0.(N+15)), or install both in one command so pip resolves them together")


def _torchvision_ops_loaded() -> None:
    import torch
    import torchvision  # noqa: F401  (a mismatched build raises here)

    torch.ops.torchvision.nms  # noqa: B018  (raises when the C++ operators did not register)


@functools.cache
def require_torchvision() -> None:
    """Import torchvision and check that its C++ operators loaded; a mismatch is a TorchInstallError."""
    try:
        _torchvision_ops_loaded()
    except (ImportError, RuntimeError, OSError, AttributeError) as exc:
        torch_version = installed_version("torch")
        raise TorchInstallError(
            f"torch {torch_version} and torchvision {installed_version('torchvision')} do not work together "
            f"({brief(exc)}). Install a matching pair: {pairing_advice(torch_version)}") from None
