"""All-or-nothing output of an import: files are written under temporary names and renamed into
place only when every sample succeeded (:meth:`Staging.commit`); :meth:`Staging.abort` removes them."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from hexpr.embedder.files import swap_in_dir


class Staging:
    """Temporary outputs, renamed into place only by commit()."""

    def __init__(self, out_dir: Path, output: str):
        self.out_dir = out_dir
        self.output = output
        self.token = uuid.uuid4().hex[:8]
        self.moves: list[tuple[Path, Path]] = []
        self.temps: list[Path] = []
        self.stage_dir: Path | None = None
        out_dir.mkdir(parents=True, exist_ok=True)
        if output == "hest":
            (out_dir / "patches").mkdir(exist_ok=True)
            (out_dir / "st").mkdir(exist_ok=True)
        else:
            self.stage_dir = out_dir / f".hexpr-import-{self.token}"
            self.stage_dir.mkdir()

    def temp_file(self, final: Path) -> Path:
        tmp = final.with_name(f".{final.name}.tmp-{self.token}")
        self.temps.append(tmp)
        self.moves.append((tmp, final))
        return tmp

    def sample_dir(self, sample: str) -> Path:
        assert self.stage_dir is not None
        d = self.stage_dir / sample
        d.mkdir()
        self.moves.append((d, self.out_dir / sample))
        return d

    def commit(self) -> None:
        for src, dst in self.moves:
            if src.is_dir():
                swap_in_dir(src, dst)  # the one folder swap of embedder.files
            else:
                os.replace(src, dst)
        if self.stage_dir is not None:
            shutil.rmtree(self.stage_dir, ignore_errors=True)

    def abort(self) -> None:
        for t in self.temps:
            try:
                t.unlink()
            except OSError:
                pass
        if self.stage_dir is not None:
            shutil.rmtree(self.stage_dir, ignore_errors=True)
