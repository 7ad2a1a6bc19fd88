"""The manifest written beside every file (`<file>.json`): everything a runtime or a reader needs
to use and trust the file (README, "The file's contract"). The pipeline adds the checks' and the
verification's records as they run."""

from __future__ import annotations

import torch

from . import __version__
from .config import IpcvConfig, ShapeProfile
from .layouts import layout_of
from .models.encoder import LoadedEncoder
from .strategies import strategy_of


def build_manifest(encoder: LoadedEncoder, config: IpcvConfig, format: str, precision: str, opset: int,
                   runtime: str, profile: ShapeProfile, compute: dict, smallest: int, diagnostics: bool) -> dict:
    """The manifest of a file for `config` before it is checked: `smallest` the fewest patches it
    takes (compress.min_patches), `diagnostics` whether it returns kept_index and neighbor_index."""
    import onnx
    import onnxruntime
    import transformers

    inputs, outputs = strategy_of(config).manifest_io(layout_of(encoder), encoder, config, smallest)
    return {
        "tool": {"name": "ipcv-export", "version": __version__},
        "format": format,
        "source": encoder.source,
        "architecture": encoder.description.architecture,
        "ipcv": {"retention": config.retention, "prune_layer": config.prune_layer,
                 "as_depth": config.as_depth, "neighbors": config.neighbors, "selection": config.selection,
                 "ngr_weighting": config.ngr_weighting, "per_image_selection": config.per_image_selection,
                 "mixed_cell": config.mixed_cell},
        "inputs": inputs,
        "outputs": outputs if diagnostics else outputs[:-2],
        "preprocessing": encoder.preprocessing,
        "precision": precision, "opset": opset if format in ("onnx", "engine") else None,
        "profile": vars(profile),
        "compute": compute,
        "packages": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "runtime": runtime,
    }
