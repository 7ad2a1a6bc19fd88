"""Serving folders: output formats that write a model folder a serving runtime loads, one writer
module per runtime. A writer calls the file pipeline for its vision file (`pipeline.export_file`)
and adds the rest of the folder; the pipeline never calls a writer.

Adding a serving runtime: write `folders/<name>.py` with `write_folder(model, target, method,
report) -> ExportResult`, and name it in WRITERS under its `--format` value.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the writers import torch and their runtime; only the chosen one is loaded
    from ..config import Method, Target
    from ..pipeline import ExportResult

WRITERS = {"ort-genai": "ort_genai"}
"""`--format` value -> the writer module in this package."""
FOLDER_FORMATS = tuple(WRITERS)


def write_folder(model: str, target: Target, method: Method, report: Callable[[str], None]) -> ExportResult:
    """Write the serving folder `target.output` in the format `target.format` (one of FOLDER_FORMATS)."""
    writer = importlib.import_module(f".{WRITERS[target.format]}", __name__)
    return writer.write_folder(model, target, method, report)
