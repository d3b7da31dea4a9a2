"""Atomic writes of files and folders, and config reading, shared by every stage.

Readers never see a half-written output: each file is written under a temporary name beside its
final path (unique per process, so concurrent writers never share one) and renamed into place
only when complete; a folder is built beside its final path and swapped in at the end. Outputs get
the permissions an ordinary ``open``/``mkdir`` gives (0666/0777 less the umask), never the 0600/0700
of ``tempfile``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from hexpr.embedder.errors import DataError, OutputExistsError

CSV_FLOAT_FORMAT = "%.6g"   # predictions written as CSV: float32 precision, half the size and time of full repr


def umask_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds
    (with umask permissions). On any error or interruption the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def temp_dir_beside(path: str | Path, tag: str = "tmp") -> Path:
    """A new, empty folder beside ``path`` (hidden, unique) with umask permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{tag}-", dir=path.parent))
    os.chmod(tmp, umask_mode(directory=True))
    return tmp


def swap_in_dir(built: Path, final: Path) -> Path:
    """Replace ``final`` (if any) by the folder ``built``: old aside, new in, old removed."""
    built, final = Path(built), Path(final)
    if final.exists():
        if not final.is_dir():
            raise OutputExistsError(f"{final} exists and is not a folder")
        trash = temp_dir_beside(final, "old")
        os.replace(final, trash / "old")
        os.replace(built, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(built, final)
    return final


@contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temporary folder beside ``path``; when the block succeeds it replaces
    ``path`` as a whole. On any error or Ctrl-C ``path`` is left exactly as it was and the
    temporary folder is removed."""
    tmp = temp_dir_beside(path)
    try:
        yield tmp
        swap_in_dir(tmp, Path(path))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def json_ready(obj):
    """``obj`` with NaN/inf floats as None and numpy/tuple values as plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return json_ready(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def hexpr_version() -> str:
    """The installed hexpr's version ("0+unknown" for a source tree that was not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hexpr")
    except PackageNotFoundError:
        return "0+unknown"


def write_json(path: str | Path, obj) -> Path:
    """Pretty, strict JSON (NaN/inf as null) written atomically; the one JSON writer of hexpr. A JSON
    object records the hexpr version that wrote it (``hexpr_version``, first) unless it already does."""
    if isinstance(obj, Mapping) and "hexpr_version" not in obj:
        obj = {"hexpr_version": hexpr_version(), **obj}
    text = json.dumps(json_ready(obj), indent=2, default=str, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_csv(path: str | Path, frame, **to_csv) -> Path:
    """A pandas frame as CSV written atomically (``to_csv`` options, e.g. ``float_format``, passed on)."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, **to_csv))


def read_config(path: str | Path):
    """A JSON or YAML file (by suffix: .yaml/.yml is YAML) parsed into Python values."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError's parse errors
        raise DataError(f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} ({exc})") from None
    except Exception as exc:  # yaml.YAMLError is not a ValueError
        raise DataError(f"{path}: not valid YAML ({exc})") from None
