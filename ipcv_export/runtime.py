"""Run an exported encoder file with the call `encoder(pixel_values, grid_thw) -> embeddings`.

Nothing here is needed at serving time: a runtime feeds the file the three inputs that
`ipcv_export.inputs` documents. This module is the convenience and test harness in Python.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .inputs import engine_inputs


class OnnxEncoder:
    """An exported `.onnx` encoder in ONNX Runtime, prepared inputs and checks included."""

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime

        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(self.path), providers=providers or ["CPUExecutionProvider"])
        pixels = self.session.get_inputs()[0]
        self.input_width = pixels.shape[1]
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.merge_size = int(metadata.get("merge_size", 2))
        self.min_tokens = int(metadata.get("min_tokens", 1))

    def __call__(self, pixel_values: torch.Tensor | np.ndarray, grid_thw: torch.Tensor) -> torch.Tensor:
        """The merged embeddings [N / merge^2, hidden], as the stock module's forward returns them."""
        return self.run_all(pixel_values, grid_thw)[0]

    def run_all(self, pixel_values: torch.Tensor | np.ndarray, grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every output of the file: embeddings, then kept_index and neighbor_index."""
        positions, segments = engine_inputs(grid_thw, self.merge_size)
        pixels = torch.as_tensor(pixel_values)
        if pixels.dtype != torch.float32:
            raise ValueError(f"pixel_values must be float32, got {pixels.dtype}")
        if pixels.ndim != 2 or pixels.shape[1] != self.input_width:
            raise ValueError(f"pixel_values must have shape [N, {self.input_width}], got {list(pixels.shape)}")
        if pixels.shape[0] != len(segments):
            raise ValueError(f"pixel_values has {pixels.shape[0]} rows but grid_thw describes {len(segments)} patches")
        if len(segments) < self.min_tokens:
            raise ValueError(f"this file needs at least {self.min_tokens} patches per call, got {len(segments)}")
        feeds = {"pixel_values": pixels.numpy(), "position_ids": positions.numpy(), "segment_ids": segments.numpy()}
        return tuple(torch.from_numpy(out) for out in self.session.run(None, feeds))


def load(path: str | Path) -> OnnxEncoder:
    """Open an exported encoder file for `encoder(pixel_values, grid_thw)`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no encoder file at {path}")
    if path.suffix == ".onnx":
        return OnnxEncoder(path)
    raise ValueError(f"cannot load {path.name}: supported formats are .onnx")
