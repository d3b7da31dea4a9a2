"""Models on disk that cannot run code: arrays in safetensors, everything else in versioned JSON.

A model folder holds
  * ``config.json``        -- ``{"format": "hexpr-model", "schema_version", "kind", "hexpr_version",
    "files": {name: sha256}, "content": ...}``; ``content`` is the model written as JSON values;
  * ``model.safetensors``  -- every array (numpy arrays, torch weights) the content refers to;
  * ``lightgbm/*.txt``     -- LightGBM boosters in LightGBM's own text model format.

How an object becomes JSON (``encode``), the scikit-learn way: an estimator is its class's name in
``ESTIMATOR_CLASSES`` (the allow-list: the head registry plus the steps and scikit-learn parts heads
hold), its constructor parameters (``get_params(deep=False)``) and its fitted state (``__getstate__``
without the parameters: the trailing-underscore attributes; torch heads hand over their networks as
CPU ``state_dict``s there). A head therefore declares what it saves by being a scikit-learn estimator;
there is no per-head code here. Values: JSON scalars, lists and string-keyed dicts as they are;
everything else as a one-key-tagged object -- ``@array``/``@tensor`` (a safetensors entry),
``@scalar`` (a numpy scalar), ``@float`` (NaN/inf), ``@tuple``, ``@dict`` (non-string keys),
``@strings`` (a string array), ``@lightgbm`` (a booster file), ``@estimator``.

Loading (``read_folder``) never unpickles: it refuses a folder holding any file that parses as a
pickle (``pickle_files``), checks every listed file's sha256, refuses unknown keys, tags and classes
and a schema newer than this hexpr reads, then rebuilds the objects with ``cls(**params)`` and
``__setstate__(state)``. Every problem is one ``ModelError`` naming the file and what to do.

Old folders holding only ``model.joblib`` (a pickle) load through ``load_legacy_pickle`` alone, which
the caller reaches only when the user says ``--trust-pickle``; it maps the module paths of models
saved before the ``hexpr`` namespace (``heads.ridge``) to the current ones.
"""
from __future__ import annotations

import _compat_pickle
import bz2
import gzip
import hashlib
import importlib
import io
import json
import lzma
import pickle
import pickletools
import sys
import zipfile
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from hexpr.embedder.errors import ModelError, brief
from hexpr.embedder.files import atomic_write, write_json
from hexpr.heads.base import HEAD_CLASSES

FORMAT = "hexpr-model"
SCHEMA_VERSION = 1
CONFIG_FILE = "config.json"
ARRAYS_FILE = "model.safetensors"
LIGHTGBM_DIR = "lightgbm"
LEGACY_FILE = "model.joblib"
CONFIG_KEYS = ("format", "schema_version", "kind", "hexpr_version", "files", "content")

# the classes a model file may name (name in the file -> "module:Class"): nothing else is ever built
ESTIMATOR_CLASSES: dict[str, str] = {
    **HEAD_CLASSES,
    "feature_pca": "hexpr.heads.base:FeaturePCA",
    "feature_reduced": "hexpr.heads.base:FeatureReduced",
    "target_transformed": "hexpr.heads.targets:TargetTransformed",
    "transform_none": "hexpr.heads.targets:Identity",
    "transform_log1p": "hexpr.heads.targets:Log1p",
    "transform_standardize": "hexpr.heads.targets:Standardize",
    "transform_minmax": "hexpr.heads.targets:MinMax",
    "transform_robust": "hexpr.heads.targets:Robust",
    "transform_chain": "hexpr.heads.targets:Chain",
    "transform_base": "hexpr.heads.targets:TargetTransform",
    "sklearn_ridge": "sklearn.linear_model._ridge:Ridge",
    "sklearn_pca": "sklearn.decomposition._pca:PCA",
}
_CLASS_NAMES = {path: name for name, path in ESTIMATOR_CLASSES.items()}
TAGS = {"@array": {"order"}, "@tensor": {"dtype"}, "@scalar": {"value"}, "@float": set(), "@tuple": set(),
        "@dict": set(), "@strings": {"shape"}, "@lightgbm": {"best_iteration"}, "@estimator": {"params", "state"}}
_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def hexpr_version() -> str:
    try:
        return metadata.version("hexpr")
    except metadata.PackageNotFoundError:   # a source tree that was not installed
        return "0+unknown"


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _join(path: str, key) -> str:
    """The name of a value inside ``path``: safetensors keys and LightGBM file names (model.head_.coef_)."""
    return f"{path}.{key}" if path else str(key)


class _Encoder:
    """Turns objects into JSON values, collecting arrays and LightGBM texts on the way."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.texts: dict[str, str] = {}

    def encode(self, value, path: str):
        if value is None or isinstance(value, (bool, str, int)) and not isinstance(value, np.generic):
            return value
        if isinstance(value, float) and not isinstance(value, np.generic):
            return value if np.isfinite(value) else {"@float": str(value)}
        if isinstance(value, np.generic):
            return self._scalar(value, path)
        if isinstance(value, np.ndarray):
            return self._array(value, path)
        if isinstance(value, tuple):
            return {"@tuple": [self.encode(v, _join(path, i)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, _join(path, i)) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("@") for k in value):
                return {k: self.encode(v, _join(path, k)) for k, v in value.items()}
            return {"@dict": [[self.encode(k, _join(path, f"key{i}")), self.encode(v, _join(path, i))]
                              for i, (k, v) in enumerate(value.items())]}
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        lgb = sys.modules.get("lightgbm")
        if lgb is not None and isinstance(value, lgb.Booster):
            name = f"{LIGHTGBM_DIR}/{path.replace('/', '_')}.txt"
            self.texts[name] = value.model_to_string(num_iteration=-1)
            return {"@lightgbm": name, "best_iteration": int(value.best_iteration)}
        name = _CLASS_NAMES.get(f"{type(value).__module__}:{type(value).__qualname__}")
        if name is not None:
            return self._estimator(name, value, path)
        raise ModelError(f"cannot save a {type(value).__module__}.{type(value).__qualname__} (at {path}) without "
                         "pickle; hexpr saves its heads, arrays, JSON values and LightGBM boosters only")

    def _scalar(self, value: np.generic, path: str):
        if value.dtype.kind not in "biuf":
            raise ModelError(f"cannot save a numpy {value.dtype} scalar (at {path})")
        item = value.item()
        if isinstance(item, float) and not np.isfinite(item):
            item = str(item)
        return {"@scalar": value.dtype.str, "value": item}

    def _array(self, value: np.ndarray, path: str):
        if value.dtype.kind in "US" or (value.dtype.kind == "O" and all(isinstance(v, str) for v in value.ravel())):
            return {"@strings": [str(v) for v in value.ravel()], "shape": list(value.shape)}
        if value.dtype.kind not in "biuf":
            raise ModelError(f"cannot save an array of {value.dtype} (at {path}) without pickle")
        fortran = value.ndim > 1 and value.flags.f_contiguous and not value.flags.c_contiguous
        self.arrays[path] = np.ascontiguousarray(value.T if fortran else value)
        return {"@array": path, "order": "F" if fortran else "C"}

    def _tensor(self, value, path: str):
        tensor = value.detach().cpu().contiguous()
        try:
            array = tensor.numpy()
        except TypeError:   # bfloat16 and the like: numpy has no such type, keep the bits
            import torch

            array = tensor.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]).numpy()
        self.arrays[path] = array.copy()
        return {"@tensor": path, "dtype": str(tensor.dtype).removeprefix("torch.")}

    def _estimator(self, name: str, value, path: str):
        params = value.get_params(deep=False)
        state = value.__getstate__()
        state = {k: v for k, v in state.items() if k not in params}
        return {"@estimator": name, "params": self.encode(params, _join(path, "(params)")),
                "state": self.encode(state, path)}


def write_folder(folder, content: dict, kind: str) -> Path:
    """Write ``content`` (JSON-able values, arrays, estimators, boosters) into ``folder`` as
    ``model.safetensors`` + ``lightgbm/*.txt`` + ``config.json`` (written last); returns the config path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = _Encoder()
    encoded = encoder.encode(content, "")
    files = {}
    blob = save_arrays(encoder.arrays, metadata={"format": FORMAT})
    atomic_write(folder / ARRAYS_FILE, lambda tmp: Path(tmp).write_bytes(blob))
    files[ARRAYS_FILE] = hashlib.sha256(blob).hexdigest()
    for name, text in encoder.texts.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / name, lambda tmp, text=text: Path(tmp).write_text(text))
        files[name] = hashlib.sha256(text.encode()).hexdigest()
    config = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "kind": kind, "hexpr_version": hexpr_version(),
              "files": files, "content": encoded}
    return write_json(folder / CONFIG_FILE, config)


# --------------------------------------------------------------------------------------------
# refusing pickles
# --------------------------------------------------------------------------------------------
_DECOMPRESSORS = (
    (b"\x1f\x8b", lambda data: gzip.GzipFile(fileobj=io.BytesIO(data)).read(1 << 16)),
    (b"BZh", lambda data: bz2.BZ2Decompressor().decompress(data)),
    (b"\xfd7zXZ", lambda data: lzma.LZMADecompressor().decompress(data)),
    (b"x", lambda data: zlib.decompressobj().decompress(data)),
)


def _parses_as_pickle(data: bytes, whole: bool) -> bool:
    """Whether ``data`` is a pickle stream: its opcodes parse up to STOP, or (``whole`` False: the
    first MB of a bigger file) start with PROTO and parse up to the cut. Only the opcode parser
    runs: nothing is built or imported."""
    ops, first = 0, None
    try:
        for opcode, _, _ in pickletools.genops(io.BytesIO(data)):
            ops += 1
            first = first or opcode.name
            if opcode.name == "STOP":
                return ops > 1
    except Exception:  # noqa: BLE001 - not an opcode stream (or cut off inside one)
        # a cut-off prefix counts when it starts like pickles of protocol 2+ (joblib, torch) do
        return not whole and first == "PROTO" and ops > 2
    return False


def looks_like_pickle(path) -> bool:
    """True for a plain, compressed (gzip, bz2, xz, zlib: joblib's) or zipped (torch.save) pickle."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        whole = not f.read(1)
    if _parses_as_pickle(head, whole):
        return True
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                return any(n.endswith(".pkl") for n in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    for magic, decompress in _DECOMPRESSORS:
        if head.startswith(magic):
            try:
                return _parses_as_pickle(decompress(head)[: 1 << 16], False)
            except Exception:  # noqa: BLE001 - not that compression after all
                return False
    return False


def pickle_files(folder) -> list[Path]:
    """The files of a model folder (its top level and ``lightgbm/``) that are pickles."""
    folder = Path(folder)
    candidates = [p for p in folder.iterdir() if p.is_file()]
    if (folder / LIGHTGBM_DIR).is_dir():
        candidates += [p for p in (folder / LIGHTGBM_DIR).iterdir() if p.is_file()]
    try:
        return [p for p in sorted(candidates) if looks_like_pickle(p)]
    except OSError as exc:
        raise ModelError(f"{folder}: cannot read the model folder's files ({brief(exc)})") from None


def refuse_pickles(folder, allow: tuple[str, ...] = ()) -> None:
    """ModelError when the folder holds a pickle (other than the names in ``allow``)."""
    found = [p for p in pickle_files(folder) if p.name not in allow]
    if found:
        raise ModelError(f"{found[0]} is a pickle: loading a pickle runs any code its author put in it, so hexpr "
                         f"refuses model folders that hold one ({len(found)} found). Remove it, or get the model "
                         "again in hexpr's safetensors format")


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
class _Decoder:
    def __init__(self, folder: Path, arrays: dict[str, np.ndarray]):
        self.folder = folder
        self.arrays = arrays
        self.where = folder / CONFIG_FILE

    def fail(self, what: str) -> ModelError:
        return ModelError(f"{self.where}: {what}; the file is damaged or was edited -- get the model again")

    def decode(self, value):
        if value is None or isinstance(value, (bool, str, int, float)):
            return value
        if isinstance(value, list):
            return [self.decode(v) for v in value]
        if not isinstance(value, dict):
            raise self.fail(f"unexpected value {value!r}")
        tags = [k for k in value if k.startswith("@")]
        if not tags:
            return {k: self.decode(v) for k, v in value.items()}
        tag = tags[0]
        if len(tags) > 1 or tag not in TAGS or not set(value) - {tag} <= TAGS[tag]:
            raise self.fail(f"unknown key(s) {sorted(set(value) - {tag} - TAGS.get(tag, set())) or tags} in a tagged value")
        return getattr(self, "_" + tag[1:])(value)

    def _float(self, value):
        if value["@float"] not in _NON_FINITE:
            raise self.fail(f"bad @float {value['@float']!r}")
        return _NON_FINITE[value["@float"]]

    def _scalar(self, value):
        try:
            dtype = np.dtype(value["@scalar"])
        except TypeError:
            raise self.fail(f"bad scalar type {value['@scalar']!r}") from None
        if dtype.kind not in "biuf":
            raise self.fail(f"bad scalar type {value['@scalar']!r}")
        item = value.get("value")
        return dtype.type(_NON_FINITE.get(item, item) if isinstance(item, str) else item)

    def _tuple(self, value):
        return tuple(self.decode(v) for v in value["@tuple"])

    def _dict(self, value):
        return {self.decode(k): self.decode(v) for k, v in value["@dict"]}

    def _strings(self, value):
        return np.asarray(value["@strings"], dtype=object).reshape(value.get("shape", [-1]))

    def _stored(self, key):
        if key not in self.arrays:
            raise self.fail(f"array {key!r} is not in {ARRAYS_FILE}")
        return self.arrays[key]

    def _array(self, value):
        array = self._stored(value["@array"])
        return array.T if value.get("order") == "F" else array

    def _tensor(self, value):
        import torch

        array = self._stored(value["@tensor"])
        dtype = getattr(torch, str(value.get("dtype", "")), None)
        if not isinstance(dtype, torch.dtype):
            raise self.fail(f"bad tensor type {value.get('dtype')!r}")
        tensor = torch.from_numpy(np.array(array))
        return tensor if tensor.dtype == dtype else tensor.view(dtype)

    def _lightgbm(self, value):
        import lightgbm as lgb

        name = str(value["@lightgbm"])
        path = self.folder / name
        if not name.startswith(LIGHTGBM_DIR + "/") or ".." in Path(name).parts or not path.is_file():
            raise self.fail(f"LightGBM model file {name!r} is missing")
        try:
            booster = lgb.Booster(model_str=path.read_text())
        except Exception as exc:  # noqa: BLE001 - a damaged text model fails inside LightGBM
            raise ModelError(f"{path}: not a readable LightGBM model ({brief(exc)}); get the model again") from None
        booster.best_iteration = int(value.get("best_iteration", -1))
        return booster

    def _estimator(self, value):
        name = value["@estimator"]
        if name not in ESTIMATOR_CLASSES:
            raise ModelError(f"{self.where}: names a model part {name!r} this hexpr does not know; "
                             "it may need a newer hexpr (pip install -U hexpr)")
        module, qualname = ESTIMATOR_CLASSES[name].split(":")
        cls = getattr(importlib.import_module(module), qualname)
        params, state = self.decode(value.get("params", {})), self.decode(value.get("state", {}))
        if not isinstance(params, dict) or not isinstance(state, dict):
            raise self.fail(f"{name}: params and state must be mappings")
        bad = [k for k in state if not isinstance(k, str) or not k.isidentifier() or k.startswith("__")]
        if bad:
            raise self.fail(f"{name}: bad attribute name {bad[0]!r}")
        try:
            obj = cls(**params)
            obj.__setstate__(state)
        except Exception as exc:  # noqa: BLE001 - wrong params or state for that class
            raise self.fail(f"{name} cannot be rebuilt from the saved values ({brief(exc)})") from None
        return obj


def read_config(folder) -> dict:
    """``config.json`` of a model folder, checked: the format, the schema version, no unknown keys."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: not a readable hexpr model config ({brief(exc)}); get the model again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelError(f"{path}: not a hexpr model config (no \"format\": \"{FORMAT}\")")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ModelError(f"{path}: unknown key(s) {', '.join(unknown)}; this hexpr reads schema version "
                         f"{SCHEMA_VERSION} -- the file was edited, or needs a newer hexpr (pip install -U hexpr)")
    version = config.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelError(f"{path}: bad schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise ModelError(f"{path}: written by hexpr {config.get('hexpr_version', '?')} in model schema version {version}; "
                         f"this hexpr ({hexpr_version()}) reads up to version {SCHEMA_VERSION}: pip install -U hexpr")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ModelError(f"{path}: missing key(s) {', '.join(missing)}")
    return config


def read_folder(folder, kind: str):
    """The content ``write_folder`` wrote into ``folder``, rebuilt without unpickling anything."""
    folder = Path(folder)
    refuse_pickles(folder)
    config = read_config(folder)
    if config["kind"] != kind:
        raise ModelError(f"{folder / CONFIG_FILE}: holds a {config['kind']!r} model, expected a {kind!r} one")
    files = config["files"]
    if not isinstance(files, dict) or ARRAYS_FILE not in files:
        raise ModelError(f"{folder / CONFIG_FILE}: \"files\" must list {ARRAYS_FILE} with its sha256")
    for name, expected in files.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute() or not path.is_file():
            raise ModelError(f"{path}: missing (the model's config lists it); copy the whole model folder")
        if sha256_file(path) != expected:
            raise ModelError(f"{path}: checksum mismatch (sha256 differs from {CONFIG_FILE}): the file was changed "
                             "or damaged after the model was saved; get the model again")
    try:
        arrays = load_arrays((folder / ARRAYS_FILE).read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise ModelError(f"{folder / ARRAYS_FILE}: not a readable safetensors file ({brief(exc)})") from None
    try:
        return _Decoder(folder, arrays).decode(config["content"])
    except RecursionError:
        raise ModelError(f"{folder / CONFIG_FILE}: nested too deeply to be a hexpr model") from None


# --------------------------------------------------------------------------------------------
# old pickled models (only with --trust-pickle)
# --------------------------------------------------------------------------------------------
OLD_TOP_LEVEL = ("heads", "embedder", "workflow", "pipeline")      # module paths before the hexpr namespace
TRUSTED_MODULES = ("hexpr", "numpy", "sklearn", "scipy", "lightgbm", "torch", "collections", "copyreg", "joblib",
                   "_codecs", "pathlib", "datetime")
SAFE_BUILTINS = {"list", "dict", "tuple", "set", "frozenset", "slice", "range", "complex", "bytearray", "bytes",
                 "str", "int", "float", "bool", "object", "getattr"}


def current_module(module: str) -> str:
    """``heads.ridge`` (saved before the namespace) -> ``hexpr.heads.ridge``; other names unchanged."""
    top = module.split(".")[0]
    return "hexpr." + module if top in OLD_TOP_LEVEL else module


def find_trusted_class(module: str, name: str):
    """What an old pickle may name: classes of hexpr (old paths mapped) and of the libraries its
    models are built from; anything else (os.system, subprocess...) is refused."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))   # protocol 0-2: Python 2 names
    module = current_module(_compat_pickle.IMPORT_MAPPING.get(module, module))
    top = module.split(".")[0]
    if top == "builtins" and name in SAFE_BUILTINS or top in TRUSTED_MODULES:
        return getattr(importlib.import_module(module), name)
    raise pickle.UnpicklingError(f"the pickle asks for {module}.{name}, which no hexpr model holds")


class TrustedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` restricted by ``find_trusted_class`` (used for old ``finetuned.pt`` via torch.load)."""

    def find_class(self, module, name):
        return find_trusted_class(module, name)


def trusted_torch_load(path):
    """``torch.load`` of an old pickled ``finetuned.pt`` through ``TrustedUnpickler``. THIS RUNS THE
    PICKLE: only on the user's explicit trust (``--trust-pickle``, ``hexpr convert-model``)."""
    import types

    import torch

    module = types.ModuleType("hexpr_trusted_pickle")
    module.Unpickler = TrustedUnpickler
    module.load = lambda f, **kw: TrustedUnpickler(f, **kw).load()
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)  # trusted only
    except Exception as exc:  # noqa: BLE001 - a truncated, foreign or incompatible file fails in many ways
        raise ModelError(f"{path}: not a readable old hexpr fine-tuned model ({brief(exc)})") from None


def load_legacy_pickle(path):
    """The object in an old ``model.joblib``. THIS RUNS THE PICKLE: call it only on the user's explicit
    trust (``--trust-pickle``, ``hexpr convert-model``). Classes are limited by ``find_trusted_class``."""
    from joblib.numpy_pickle import NumpyUnpickler

    class _Unpickler(NumpyUnpickler):
        def find_class(self, module, name):
            return find_trusted_class(module, name)

    path = Path(path)
    try:
        with open(path, "rb") as f:
            try:
                unpickler = _Unpickler(str(path), f, True)
            except TypeError:   # joblib < 1.5 has no ensure_native_byte_order argument
                unpickler = _Unpickler(str(path), f)
            return unpickler.load()
    except Exception as exc:  # noqa: BLE001 - a truncated, foreign or incompatible file fails in many ways
        raise ModelError(f"{path}: not a readable old hexpr model ({brief(exc)})") from None


# --------------------------------------------------------------------------------------------
# one head on its own
# --------------------------------------------------------------------------------------------
def save_head(head, folder) -> Path:
    """Write a (fitted or unfitted) head into ``folder`` (config.json + model.safetensors)."""
    return write_folder(folder, {"head": head}, "head")


def load_head(folder):
    """The head ``save_head`` wrote into ``folder``."""
    return read_folder(folder, "head")["head"]
