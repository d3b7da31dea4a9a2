"""embedder/files.py: atomic files and folders, the JSON writer, the config reader."""
import json
import math

import numpy as np
import pytest

from hexpr.embedder.errors import DataError, OutputExistsError
import hexpr
from hexpr.embedder.files import atomic_dir, atomic_path, atomic_write, hexpr_version, read_config, write_json


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_replaces_the_folder_only_when_the_block_succeeds(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp != out and tmp.parent == out.parent
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").read_text() == "old"     # still the old folder while building
    assert _listing(out) == ["new.txt"]
    assert _listing(tmp_path) == ["out"]                  # no temporary or old folder left beside it


def test_atomic_dir_leaves_the_old_folder_untouched_when_the_block_raises(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("boom")
    assert _listing(out) == ["old.txt"]
    assert (out / "old.txt").read_text() == "old"
    assert _listing(tmp_path) == ["out"]


def test_atomic_dir_refuses_to_replace_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(OutputExistsError, match="not a folder"):
        with atomic_dir(out) as tmp:
            (tmp / "x").write_text("x")
    assert out.read_text() == "a file"
    assert _listing(tmp_path) == ["out"]


def test_atomic_path_keeps_the_old_file_on_error_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    atomic_write(target, lambda tmp: tmp.write_text("v1"))
    assert target.read_text() == "v1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name != target.name
            tmp.write_text("half of v2")
            raise KeyboardInterrupt
    assert target.read_text() == "v1"
    assert _listing(target.parent) == ["table.csv"]


def test_write_json_writes_nan_and_inf_as_null_and_numpy_as_plain_values(tmp_path):
    path = write_json(tmp_path / "r.json", {"score": float("nan"), "inf": -math.inf, "arr": np.array([1.5, np.nan]),
                                            "n": np.int64(3), "pair": (1, 2), 4: "int key"})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"hexpr_version": hexpr_version(), "score": None, "inf": None, "arr": [1.5, None], "n": 3,
                                "pair": [1, 2], "4": "int key"}
    assert list(json.loads(text))[0] == "hexpr_version" and hexpr_version() == hexpr.__version__   # each JSON records it
    assert json.loads(write_json(tmp_path / "l.json", [1, 2]).read_text()) == [1, 2]           # (a list stays a list)


def test_read_config_reads_json_and_yaml_by_suffix(tmp_path):
    (tmp_path / "a.json").write_text('{"alpha": [0.1, 1.0], "epochs": 3}')
    (tmp_path / "b.yaml").write_text("alpha:\n  - 0.1\n  - 1.0\nepochs: 3\n")
    assert read_config(tmp_path / "a.json") == read_config(tmp_path / "b.yaml") == {"alpha": [0.1, 1.0], "epochs": 3}


@pytest.mark.parametrize("name, text, kind", [
    ("bad.yaml", "alpha: [0.1, 1.0\nepochs: 3\n", "YAML"),      # unclosed flow sequence
    ("bad.yml", "a: b: c\n", "YAML"),                          # mapping values not allowed here
    ("bad.json", '{"alpha": [0.1, }', "JSON"),
])
def test_read_config_rejects_bad_files_with_a_data_error_naming_the_file(tmp_path, name, text, kind):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_config(path)
    assert str(path) in str(info.value) and f"not valid {kind}" in str(info.value)


def test_read_config_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="missing.yaml: cannot read it"):
        read_config(tmp_path / "missing.yaml")
