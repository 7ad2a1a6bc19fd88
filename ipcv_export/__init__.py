"""ipcv-export: compile IPCV token compression into a vision encoder and ship it as one file.

The public names are imported on first use (PEP 562), so that `ipcv-export --help`, `--version`
and usage errors answer without loading torch, transformers and onnx.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {"IpcvConfig": "config", "Method": "config", "Target": "config", "UsageError": "config",
           "ExportResult": "pipeline", "export": "api", "load": "runtime", "Pipeline": "llm.pipeline",
           "GenerationReport": "llm.pipeline", "IvcPrune": "llm.prune_hooks"}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
