"""The one public entry point: `export()` writes a file (the pipeline) or a serving folder (a
folder writer, which runs the pipeline for its vision file)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import Method, Target
from .folders import FOLDER_FORMATS, write_folder
from .models.encoder import LoadedEncoder
from .pipeline import ExportResult, export_file


def export(model: str | LoadedEncoder, target: Target | str | Path, method: Method = Method(), *,
           report: Callable[[str], None] = print, verbose: bool = False) -> ExportResult:
    """Export `model` (built-in name, checkpoint folder or LoadedEncoder) with the IPCV `method` to
    `target` (a Target, or just the output path): a file (pipeline.export_file), or, for a format in
    FOLDER_FORMATS, a serving folder from a chat model (built-in name or checkpoint folder).
    `verbose` reports per-grid diffs and every static-check finding. Raises UsageError (bad input),
    ParityError (the output disagrees with the reference), IncompatibleGraph, or
    tensorrt.TensorRTMissing (an engine was asked for; the checked ONNX file was written instead).
    """
    target = target if isinstance(target, Target) else Target(target)
    if target.format in FOLDER_FORMATS:
        return write_folder(model, target, method, report)
    return export_file(model, target, method, report=report, verbose=verbose)
