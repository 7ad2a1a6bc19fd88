"""ExportedProgram -> ONNX file, through `torch.onnx.export(..., dynamo=True)`.

`ipcv::segment_attention` is decomposed first into a masked scaled-dot-product attention, so the
file holds only standard ONNX operators. N stays a symbolic dimension. Models over 2 GB use the
external-data format (`<file>.data` beside the file).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import ops
from ..config import DEFAULT_OPSET

INPUT_NAMES = ["pixel_values", "position_ids", "segment_ids"]
TWO_GB = 2 * 1024**3


def to_onnx(program: torch.export.ExportedProgram, path: Path, output_names: list[str],
            opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None) -> Path:
    """Write `program` as an ONNX model at `path` (the caller makes the write atomic), with
    `metadata` as the model's metadata properties (what a runtime needs to prepare inputs)."""
    program = ops.decompose(program)
    large = sum(p.numel() * p.element_size() for p in program.state_dict.values()) > TWO_GB
    input_names = INPUT_NAMES[:len(program.graph_signature.user_inputs)]  # batched towers: pixel_values only
    onnx_program = torch.onnx.export(program, input_names=input_names, output_names=output_names,
                                     opset_version=opset, dynamo=True, verbose=False, optimize=True)
    onnx_program.model.metadata_props.update(metadata or {})
    onnx_program.save(str(path), external_data=large)
    return path
