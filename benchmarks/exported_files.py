"""The files a benchmark measures: one verified export per retention, in a folder the user may
give (then files already there are reused, so a long study can be re-run without re-exporting)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import ipcv_export
from ipcv_export.models.encoder import LoadedEncoder


def exported_files(encoder: LoadedEncoder, retentions: Iterable[float], folder: Path | None, prefix: str = "",
                   per_image_selection: bool = False, selection: str = "score", mixed_cell: int = 2,
                   **target_options) -> dict[float, Path]:
    """retention -> `folder/{prefix}rho{retention}.onnx`, exported with this tool (verified as
    usual; `selection`: the method's, rho = 1 being the original for every selection;
    `target_options`: ipcv_export.Target's fields) unless it exists; a temporary folder when
    `folder` is None; `mixed_cell`: mixed selection's cell side. Prints each export's time."""
    folder = folder or Path(tempfile.mkdtemp(prefix="ipcv-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for retention in dict.fromkeys(retentions):
        path = files[retention] = folder / f"{prefix}rho{retention}.onnx"
        if not path.exists():
            start = time.perf_counter()
            method = ipcv_export.Method(retention=retention, per_image_selection=per_image_selection,
                                        selection=selection, mixed_cell=mixed_cell if retention < 1 else 2)
            ipcv_export.export(encoder, ipcv_export.Target(path, **target_options), method, report=lambda _line: None)
            print(f"exported rho={retention} in {time.perf_counter() - start:.0f} s")
    return files
