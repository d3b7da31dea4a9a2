"""All-or-nothing output of an import: the whole dataset folder is built beside ``out_dir`` under a
temporary name and swapped in as a whole by :meth:`Staging.commit` (an existing ``out_dir``, which
only ``overwrite`` allows, is replaced entirely, never mixed with the new samples);
:meth:`Staging.abort` removes the temporary folder and leaves ``out_dir`` as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

from hexpr.embedder.errors import OutputExistsError
from hexpr.embedder.files import swap_in_dir, temp_dir_beside


def check_import_target(out_dir: Path, overwrite: bool) -> None:
    """A non-empty ``out_dir`` is refused unless ``overwrite`` (then it is replaced as a whole)."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"--out {out_dir} already holds a dataset (or other files); pass --overwrite to "
                                "replace the whole folder with this import, or choose another folder")


class Staging:
    """The dataset under construction: ``stage_dir`` mirrors ``out_dir`` until commit() swaps it in."""

    def __init__(self, out_dir: Path, output: str):
        self.out_dir = out_dir
        self.output = output
        self.stage_dir = temp_dir_beside(out_dir, "import")
        if output == "hest":
            (self.stage_dir / "patches").mkdir()
            (self.stage_dir / "st").mkdir()

    def temp_file(self, final: Path) -> Path:
        """Where the file that ends up at ``final`` (under ``out_dir``) is written now."""
        staged = self.stage_dir / Path(final).relative_to(self.out_dir)
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def sample_dir(self, sample: str) -> Path:
        d = self.stage_dir / sample
        d.mkdir()
        return d

    def commit(self) -> None:
        swap_in_dir(self.stage_dir, self.out_dir)   # the one folder swap of embedder.files

    def abort(self) -> None:
        shutil.rmtree(self.stage_dir, ignore_errors=True)
