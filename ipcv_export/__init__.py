"""ipcv-export: compile IPCV token compression into a vision encoder and ship it as one file."""

__version__ = "0.1.0"

from .config import IpcvConfig, UsageError  # noqa: E402
from .llm.pipeline import GenerationReport, Pipeline  # noqa: E402
from .llm.prune_hooks import IvcPrune  # noqa: E402
from .pipeline import ExportResult, export  # noqa: E402
from .runtime import load  # noqa: E402

__all__ = ["IpcvConfig", "UsageError", "ExportResult", "export", "load", "Pipeline", "GenerationReport",
           "IvcPrune", "__version__"]
